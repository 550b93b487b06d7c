"""Triton gather / gather_visible / unshuffle against their torch references, forward and backward.

Runs under the Triton interpreter on CPU (see conftest.py); every kernel output is NaN-poisoned
before launch so an element the kernel forgets to write cannot pass.
"""

import os

import pytest
import torch

from urfm_fast.kernels import gather as G
from urfm_fast.kernels._triton import poison_outputs
from urfm_fast.model import ops

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# compiled kernels only: the interpreter rounds fp32 -> bf16 differently from the GPU
on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(autouse=True)
def _triton_backend():
    with ops.use_backend("triton"), poison_outputs():
        yield


def _grads(fn, inputs, grad_out):
    """Run fn on fresh leaf copies of inputs (floats require grad); return (out, grads)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


def _compare(fn_kernel, fn_ref, inputs, dtype, device, close_to_fp32, name):
    """Kernel in dtype vs torch reference in dtype and in fp32: output and every gradient."""
    cast = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs]
    cast32 = [t.float() if t.is_floating_point() else t for t in cast]
    with torch.no_grad():
        shape = fn_ref(*cast).shape
    g = torch.randn(shape, device=device)
    out, grads = _grads(fn_kernel, cast, g.to(dtype))
    ref, ref_grads = _grads(fn_ref, cast, g.to(dtype))
    ref32, ref32_grads = _grads(fn_ref, cast32, g)
    assert out.dtype == ref.dtype
    close_to_fp32(out, ref, ref32, ATOL[dtype], f"{name} out")
    for i, (a, b, c) in enumerate(zip(grads, ref_grads, ref32_grads, strict=True)):
        assert a is not None and a.dtype == b.dtype and a.shape == b.shape, (name, i)
        close_to_fp32(a, b, c, ATOL[dtype], f"{name} grad {i}")


# (B, N, K, D): N=1, K=1, the ViT-B/16 mask (196 -> 49), primes, D not a power of two
SHAPES = [(2, 1, 1, 5), (3, 50, 7, 33), (2, 196, 49, 64), (1, 13, 13, 96), (2, 31, 17, 1030)]
# the interpreter is slow: fp16 repeats only the small shapes
CASES = [(*s, torch.float32) for s in SHAPES] + [(*s, torch.float16) for s in SHAPES if s[1] * s[3] < 4000]
CASES += [(*s, torch.bfloat16) for s in SHAPES] + [(64, 196, 49, 768, torch.bfloat16)] if on_gpu else []


@pytest.mark.parametrize("B,N,K,D,dtype", CASES)
def test_gather_tokens_duplicates(B, N, K, D, dtype, kernel_device, close_to_fp32):
    x = torch.randn(B, N, D)
    idx = torch.randint(0, N, (B, K))  # with replacement: duplicates must accumulate
    idx[:, 0] = idx[:, -1]
    _compare(ops.gather_tokens, G.gather_tokens_ref, [x, idx], dtype, kernel_device, close_to_fp32, "gather")


def test_gather_tokens_more_picks_than_rows(kernel_device, close_to_fp32):
    x, idx = torch.randn(2, 3, 24), torch.randint(0, 3, (2, 11))
    _compare(ops.gather_tokens, G.gather_tokens_ref, [x, idx], torch.float32, kernel_device, close_to_fp32, "k>n")


def test_gather_tokens_strided_input(kernel_device):
    base = torch.randn(2, 40, 3, 48, device=kernel_device)
    x = base[:, ::2, 1]  # (2, 20, 48) with non-unit token and batch strides
    idx = torch.randint(0, 20, (2, 9), device=kernel_device)
    torch.testing.assert_close(ops.gather_tokens(x, idx), G.gather_tokens_ref(x, idx), rtol=0, atol=0)


def _visible_ids(B, N, K):
    return torch.rand(B, N).argsort(dim=1)[:, :K]


@pytest.mark.parametrize("B,N,K,D,dtype", CASES)
def test_gather_visible(B, N, K, D, dtype, kernel_device, close_to_fp32):
    x, pos, cls = torch.randn(B, N, D), torch.randn(N + 1, D), torch.randn(D)
    inputs = [x, _visible_ids(B, N, K), pos, cls]
    _compare(ops.gather_visible, G.gather_visible_ref, inputs, dtype, kernel_device, close_to_fp32, "visible")


def test_gather_visible_mae_shapes_and_duplicates(kernel_device, close_to_fp32):
    # MAE keeps cls_token as [1,1,D]; duplicate ids accumulate into x and pos gradients
    B, N, K, D = 3, 16, 6, 40
    idx = torch.randint(0, N, (B, K))
    inputs = [torch.randn(B, N, D), idx, torch.randn(N + 1, D), torch.randn(1, 1, D)]
    f = lambda *a: ops.gather_visible(*a)
    _compare(f, G.gather_visible_ref, inputs, torch.float32, kernel_device, close_to_fp32, "visible mae")


def test_gather_visible_mixed_dtypes(kernel_device):
    # fp16 tokens with fp32 parameters promote to fp32, as torch does
    B, N, K, D = 2, 9, 4, 24
    x = torch.randn(B, N, D, device=kernel_device, dtype=torch.float16)
    idx = _visible_ids(B, N, K).to(kernel_device)
    pos, cls = torch.randn(N + 1, D, device=kernel_device), torch.randn(D, device=kernel_device)
    out = ops.gather_visible(x, idx, pos, cls)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, G.gather_visible_ref(x, idx, pos, cls))


@pytest.mark.parametrize("B,N,K,D,dtype", CASES)
def test_unshuffle(B, N, K, D, dtype, kernel_device, close_to_fp32):
    ids_restore = torch.rand(B, N).argsort(dim=1).argsort(dim=1)
    inputs = [torch.randn(B, K + 1, D), torch.randn(D), ids_restore, torch.randn(N + 1, D)]
    _compare(ops.unshuffle, G.unshuffle_ref, inputs, dtype, kernel_device, close_to_fp32, "unshuffle")


def test_gather_visible_no_visible_tokens(kernel_device, close_to_fp32):
    # K=0: only the CLS row; the kernel must not read the empty index tensor
    B, N, D = 2, 5, 24
    inputs = [torch.randn(B, N, D), torch.zeros(B, 0, dtype=torch.long), torch.randn(N + 1, D), torch.randn(D)]
    _compare(ops.gather_visible, G.gather_visible_ref, inputs, torch.float32, kernel_device, close_to_fp32, "k=0")


@pytest.mark.parametrize("K", [0, 12])
def test_unshuffle_edge_counts(K, kernel_device, close_to_fp32):
    # K=0: every token masked; K=N: none masked (mask_token gets a zero gradient)
    B, N, D = 2, 12, 20
    ids_restore = torch.rand(B, N).argsort(dim=1).argsort(dim=1)
    inputs = [torch.randn(B, K + 1, D), torch.randn(1, 1, D), ids_restore, torch.randn(N + 1, D)]
    _compare(ops.unshuffle, G.unshuffle_ref, inputs, torch.float32, kernel_device, close_to_fp32, "edge")


def test_backward_is_deterministic(kernel_device):
    x = torch.randn(2, 7, 33, device=kernel_device, requires_grad=True)
    idx = torch.randint(0, 7, (2, 20), device=kernel_device)
    g = torch.randn(2, 20, 33, device=kernel_device)
    first = torch.autograd.grad(ops.gather_tokens(x, idx), x, g)[0]
    second = torch.autograd.grad(ops.gather_tokens(x, idx), x, g)[0]
    assert torch.equal(first, second)


def test_launcher_errors(kernel_device):
    dev = dict(device=kernel_device)
    x = torch.randn(2, 5, 8, **dev)
    if kernel_device.type == "cpu":
        # value checks (index range, permutation) need the values on the host: CPU tensors only,
        # a GPU launch would have to synchronise for them
        with pytest.raises(ValueError, match="idx"):
            G.gather_tokens_fwd(x, torch.tensor([[0, 5]], **dev).expand(2, -1))
        not_a_permutation = torch.zeros(2, 5, dtype=torch.long)
        with pytest.raises(ValueError, match="permutation"):
            G.unshuffle_fwd(torch.randn(2, 3, 8), torch.zeros(8), not_a_permutation, torch.zeros(6, 8))
    with pytest.raises(ValueError, match="int64"):
        G.gather_tokens_fwd(x, torch.zeros(2, 3, **dev))
    with pytest.raises(ValueError, match="3 dims"):
        G.gather_tokens_fwd(x[0], torch.zeros(2, 3, dtype=torch.long, **dev))
    idx = torch.zeros(2, 1, dtype=torch.long, **dev)
    with pytest.raises(ValueError, match="pos"):
        G.gather_visible_fwd(x, idx, torch.zeros(5, 8, **dev), torch.zeros(8, **dev))

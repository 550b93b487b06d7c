"""Triton flash attention against the explicit softmax reference, forward and dQ/dK/dV.

Tolerance: flash-attention's rule (conftest ``close_to_fp32``): the kernel's error against an fp32
reference may be at most twice torch's own error in the same dtype, plus a small atol. Runs under
the interpreter on CPU with tiny B*H; bf16 and the real shapes run only where CUDA is present, and
there the fp32 cases run in bf16 (fp32 attention on a GPU is SDPA's, see urfm_fast.model.ops).
"""

import pytest
import torch

from urfm_fast.kernels import attention as A
from urfm_fast.kernels._triton import poison_outputs
from urfm_fast.model import ops

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _triton_backend():
    with ops.use_backend("triton"), poison_outputs():
        yield


def _run(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _on_device(dtype, device):
    # the kernel's dtype for a case: fp32 cases become bf16 on a GPU
    return torch.bfloat16 if dtype == torch.float32 and device.type == "cuda" else dtype


def _check(q, k, v, close_to_fp32):
    dtype = q.dtype
    g = torch.randn_like(q)
    got = _run(ops.attention, q, k, v, g)
    same = _run(lambda *a: A.attention_math_ref(*a, upcast=False), q, k, v, g)
    ref32 = _run(lambda *a: A.attention_math_ref(*a, upcast=True), q.float(), k.float(), v.float(), g.float())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, same, ref32, strict=True):
        assert a.dtype == dtype, name
        close_to_fp32(a, b, c, ATOL[dtype] * max(1.0, c.abs().max().item()), name)  # atol relative to scale


# (B, H, N, Dh): N=1, the encoder's 50 tokens, a prime, the decoder/teacher's 197, ViT-L/H's 257
# at a small head, Dh 32/64/128 and the padded 80 of ViT-H/14
CASES = [
    (1, 2, 1, 32, torch.float32),
    (2, 1, 50, 64, torch.float32),
    (1, 2, 37, 32, torch.float32),
    (1, 1, 197, 64, torch.float32),
    (1, 1, 257, 32, torch.float32),
    (1, 1, 19, 128, torch.float32),
    (1, 1, 23, 80, torch.float32),
    (1, 2, 1, 32, torch.float16),
    (2, 1, 50, 64, torch.float16),
    (1, 1, 71, 32, torch.float16),
    (1, 1, 33, 128, torch.float16),
]


@pytest.mark.parametrize("B,H,N,Dh,dtype", CASES)
def test_attention_matches_reference(B, H, N, Dh, dtype, kernel_device, close_to_fp32):
    q, k, v = (torch.randn(B, H, N, Dh, device=kernel_device).to(_on_device(dtype, kernel_device)) for _ in range(3))
    _check(q, k, v, close_to_fp32)


def test_attention_peaked_scores(kernel_device, close_to_fp32):
    # large logits: the online softmax must rescale without overflow
    dtype = _on_device(torch.float32, kernel_device)
    q, k, v = ((torch.randn(1, 1, 45, 32, device=kernel_device) * s).to(dtype) for s in (6.0, 6.0, 1.0))
    _check(q, k, v, close_to_fp32)


def test_attention_on_packed_qkv_views(kernel_device):
    # the model's layout: q, k, v are strided views of one (B, N, 3, H, Dh) projection
    B, N, H, Dh = 2, 26, 2, 32
    dtype = _on_device(torch.float32, kernel_device)
    qkv = torch.randn(B, N, 3, H, Dh, device=kernel_device, dtype=dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ops.attention(q, k, v), A.attention_math_ref(q, k, v), atol=tol, rtol=tol)


@pytest.mark.parametrize("B,H,Lq,Lk,Dh", [(2, 2, 7, 19, 32), (1, 3, 147, 197, 64), (1, 1, 1, 50, 16),
                                          (2, 1, 33, 5, 80)])
def test_cross_attention_runs_on_sdpa_and_matches(B, H, Lq, Lk, Dh, monkeypatch, kernel_device, kernel_dtype,
                                                  close_to_fp32):
    """Lq != Lk (the prompting decoder) leaves the Triton kernel for SDPA even with URFM_KERNELS=triton;
    forward and gradients within the same tolerance rule as the kernel (on a GPU: bf16 SDPA)."""
    monkeypatch.setattr(A, "attention", lambda *a: pytest.fail("the self-attention kernel got Lq != Lk"))
    torch.manual_seed(0)
    q = torch.randn(B, H, Lq, Dh, device=kernel_device, dtype=kernel_dtype)
    k, v = (torch.randn(B, H, Lk, Dh, device=kernel_device, dtype=kernel_dtype) for _ in range(2))
    g = torch.randn_like(q)
    got = _run(ops.attention, q, k, v, g)
    same = _run(lambda *a: A.attention_math_ref(*a, upcast=False), q, k, v, g)
    ref32 = _run(lambda *a: A.attention_math_ref(*a, upcast=True), q.float(), k.float(), v.float(), g.float())
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, same, ref32, strict=True):
        assert a.dtype == kernel_dtype and a.shape == b.shape, name
        close_to_fp32(a, b, c, ATOL[kernel_dtype] * max(1.0, c.abs().max().item()), name)


def test_attention_launcher_errors(kernel_device):
    q = torch.randn(1, 1, 4, 32, device=kernel_device)
    with pytest.raises(ValueError, match="one shape"):
        A.attention_fwd(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match="dtype"):
        A.attention_fwd(q, q.half(), q)
    with pytest.raises(ValueError, match="head size"):
        A.attention_fwd(*(torch.randn(1, 1, 4, 256, device=kernel_device),) * 3)
    with pytest.raises(ValueError, match=r"\[B,H,N,Dh\]"):
        A.attention_fwd(q[0], q[0], q[0])


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [50, 197])
def test_attention_real_shapes_gpu(N, dtype, close_to_fp32):
    q, k, v = (torch.randn(8, 12, N, 64, device="cuda", dtype=dtype) for _ in range(3))
    _check(q, k, v, close_to_fp32)


@cuda_only
@pytest.mark.parametrize("N,Dh", [(1, 64), (37, 128), (257, 80)])
def test_attention_bf16_ragged_gpu(N, Dh, close_to_fp32):
    # ragged last tiles, a single token, the padded head size of ViT-H/14; bf16 tl.dot only here
    q, k, v = (torch.randn(2, 3, N, Dh, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _check(q, k, v, close_to_fp32)


@cuda_only
def test_attention_many_heads_gpu():
    # B*H beyond 65535: the 1-D grid must still launch and map tiles to the right head
    q, k, v = (torch.randn(5462, 12, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v), A.attention_math_ref(q, k, v, upcast=True), atol=2e-2, rtol=2e-2)


@cuda_only
def test_attention_launcher_refuses_fp32_on_gpu():
    q = torch.randn(1, 1, 4, 32, device="cuda")
    with pytest.raises(ValueError, match="fp32 attention on a GPU"):
        A.attention_fwd(q, q, q)
    torch.testing.assert_close(ops.attention(q, q, q), A.attention_ref(q, q, q))  # ops routes it to SDPA


def test_autotune_configs_pruned_for_vit_token_counts():
    configs = A.gpu_configs()
    tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cs}
    at50 = tiles(A.prune_tiles(configs, 50, "BLOCK_N"))
    # 50 tokens: no 128-wide tile, no third stage (one or two loop iterations)
    assert at50 == {(32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2)}
    assert tiles(A.prune_tiles(configs, 197, "BLOCK_N")) == tiles(configs)
    assert tiles(A.prune_tiles(configs, 1, "BLOCK_M")) == {(32, 32, 4, 2)}
    # the batch part of the key: the start-up check's batch 4 and training's 256 tune apart
    assert A.bh_bucket(4 * 12) == 64 and A.bh_bucket(256 * 12) == 4096 and A.bh_bucket(1) == 16



def test_forced_config_launches_that_tile(kernel_device, kernel_dtype, close_to_fp32):
    # what the GPU check uses to verify, one by one, every config the autotuner may pick
    config = A.gpu_configs()[3]  # 64 x 64, 4 warps, 2 stages
    with A.forced_config(config):
        kernel, tile = A._kernel(A._fwd, A._attn_fwd_kernel)
        assert kernel is A._attn_fwd_kernel
        assert tile == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        q, k, v = (torch.randn(2, 2, 70, 32, device=kernel_device, dtype=kernel_dtype) for _ in range(3))
        _check(q, k, v, close_to_fp32)  # 70 tokens: two 64-wide tiles, the second ragged
    assert A._kernel(A._fwd, A._attn_fwd_kernel)[1] != tile  # the context restores the default

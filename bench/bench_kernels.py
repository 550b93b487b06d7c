"""Hot-path kernels against their torch references: ``pytest bench/bench_kernels.py --benchmark-only``.

GPU: the real ViT-B/16 URFM shapes in bf16 (B=256; attention H=12, Dh=64 at N=50 encoder and
N=197 decoder/teacher; cosine loss M=B*147 rows of D=768; gather/un-shuffle of 49 of 196 tokens at
D=768), attention also against every SDPA backend. CPU: tiny fp32 shapes, torch rows only unless
TRITON_INTERPRET=1 (then the Triton rows run, slowly, as a smoke test). Each row reports GB/s or
TFLOP/s in ``extra_info`` and, where a torch row ran first, ``ratio_to_reference`` (> 1: faster).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from urfm_fast.kernels import attention as A
from urfm_fast.kernels import cosine_loss as C
from urfm_fast.kernels import gather as G
from urfm_fast.kernels._triton import HAS_TRITON, INTERPRET


def _shapes(on_gpu: bool) -> dict:
    if on_gpu:
        return dict(B=256, H=12, Dh=64, N=196, K=49, D=768, dtype=torch.bfloat16)
    return dict(B=2, H=3, Dh=64, N=16, K=4, D=192, dtype=torch.float32)


def _skip_triton(on_gpu: bool) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not on_gpu and not INTERPRET:
        pytest.skip("Triton rows need a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run)")


def _fwd_bwd(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    return run


# -- copy: the bandwidth ceiling the gathers are judged against --------------------------------


def test_copy_bandwidth(benchmark, measure, device, on_gpu):
    s = _shapes(on_gpu)
    src = torch.randn(s["B"], s["N"], s["D"], device=device, dtype=s["dtype"])
    dst = torch.empty_like(src)
    measure(benchmark, lambda: dst.copy_(src), nbytes=2 * src.numel() * src.element_size())


# -- gather_visible (encoder input) and unshuffle (decoder input), forward + backward -----------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gather_visible(benchmark, measure, device, on_gpu, impl):
    s = _shapes(on_gpu)
    if impl == "triton":
        _skip_triton(on_gpu)
    B, N, K, D, dt = s["B"], s["N"], s["K"], s["D"], s["dtype"]
    x = torch.randn(B, N, D, device=device, dtype=dt, requires_grad=True)
    pos = torch.randn(N + 1, D, device=device, dtype=dt, requires_grad=True)
    cls = torch.randn(D, device=device, dtype=dt, requires_grad=True)
    idx = torch.rand(B, N, device=device).argsort(dim=1)[:, :K]
    fn = G.gather_visible if impl == "triton" else G.gather_visible_ref
    grad = torch.randn(B, K + 1, D, device=device, dtype=dt)
    # forward reads K rows + their pos and writes 1+K rows; backward reads those and writes
    # the full dx (zeros where not gathered) plus pos; counted once each
    elt = x.element_size()
    nbytes = elt * D * (B * (2 * K + 1) + B * (K + 1) + B * N + 2 * (N + 1))
    measure(benchmark, _fwd_bwd(fn, [x, idx, pos, cls], grad), nbytes=nbytes, reference="test_gather_visible[torch]")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_unshuffle(benchmark, measure, device, on_gpu, impl):
    s = _shapes(on_gpu)
    if impl == "triton":
        _skip_triton(on_gpu)
    B, N, K, D, dt = s["B"], s["N"], s["K"], s["D"], s["dtype"]
    x = torch.randn(B, K + 1, D, device=device, dtype=dt, requires_grad=True)
    mask_token = torch.randn(D, device=device, dtype=dt, requires_grad=True)
    pos = torch.randn(N + 1, D, device=device, dtype=dt, requires_grad=True)
    ids_restore = torch.rand(B, N, device=device).argsort(dim=1).argsort(dim=1)
    fn = G.unshuffle if impl == "triton" else G.unshuffle_ref
    grad = torch.randn(B, N + 1, D, device=device, dtype=dt)
    elt = x.element_size()
    nbytes = elt * D * (B * (K + 1) + B * (N + 1)) * 2  # forward read + write, backward read + write
    measure(benchmark, _fwd_bwd(fn, [x, mask_token, ids_restore, pos], grad), nbytes=nbytes,
            reference="test_unshuffle[torch]")  # fmt: skip


# -- attention forward + backward vs every SDPA backend -------------------------------------------

SDPA = ["sdpa_math", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn"]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_math": SDPBackend.MATH,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


@pytest.mark.parametrize("n_tokens", [50, 197])
@pytest.mark.parametrize("impl", [*SDPA, "triton"])
def test_attention(benchmark, measure, device, on_gpu, impl, n_tokens):
    from torch.nn.attention import sdpa_kernel

    s = _shapes(on_gpu)
    B, H, Dh, dt = s["B"], s["H"], s["Dh"], s["dtype"]
    if not on_gpu:
        n_tokens = min(n_tokens, 17)
        if impl not in ("sdpa_math", "triton"):
            pytest.skip("only the math SDPA backend runs on CPU")
    if impl == "triton":
        _skip_triton(on_gpu)
    q, k, v = (torch.randn(B, H, n_tokens, Dh, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    if impl == "triton":
        run = _fwd_bwd(A.attention, [q, k, v], grad)
    else:
        inner = _fwd_bwd(F.scaled_dot_product_attention, [q, k, v], grad)

        def run():
            with sdpa_kernel([_sdpa_backend(impl)]):
                inner()

        try:
            run()
        except RuntimeError as e:  # backend not built / not supported for this shape
            pytest.skip(f"{impl}: {str(e).splitlines()[0][:120]}")
    fwd_flops = 4 * B * H * n_tokens * n_tokens * Dh
    # 3.5x the forward: 2 matmuls forward, 5 backward (flash-attention's count; no recompute)
    measure(benchmark, run, flops=3.5 * fwd_flops, reference=f"test_attention[sdpa_flash-{n_tokens}]")


# -- cosine loss forward + backward ---------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cosine_loss(benchmark, measure, device, on_gpu, impl):
    s = _shapes(on_gpu)
    if impl == "triton":
        _skip_triton(on_gpu)
    M, D, dt = s["B"] * (s["N"] - s["K"]), s["D"], s["dtype"]
    pred = torch.randn(M, D, device=device, dtype=dt, requires_grad=True)
    target = torch.randn(M, D, device=device, dtype=dt)
    fn = C.cosine_loss if impl == "triton" else C.cosine_loss_ref

    def run():
        pred.grad = None
        fn(pred, target).backward()

    # the fused kernel's minimum traffic: read pred and target, write the gradient once
    measure(benchmark, run, nbytes=3 * M * D * pred.element_size(), reference="test_cosine_loss[torch]")

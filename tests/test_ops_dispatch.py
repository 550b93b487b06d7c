"""The URFM_KERNELS switch, and the Triton ops inside torch.compile(fullgraph=True)."""

import pytest
import torch

from urfm_fast.kernels import attention as A
from urfm_fast.kernels import cosine_loss as C
from urfm_fast.kernels import gather as G
from urfm_fast.model import ops


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("cuda")
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        with ops.use_backend("triton"):
            assert ops.get_backend() == "triton"
        assert ops.get_backend() == "torch"


def test_auto_uses_torch_for_cpu_tensors():
    with ops.use_backend("auto"):
        assert not ops.use_triton(torch.zeros(1))
    with ops.use_backend("torch"):
        assert not ops.use_triton(torch.zeros(1))


@pytest.mark.parametrize("backend,expect_kernel", [("triton", True), ("torch", False)])
def test_every_op_routes_by_backend(backend, expect_kernel, monkeypatch, kernel_device, kernel_dtype):
    calls = []
    kernel_ops = [(G, "gather_tokens"), (G, "gather_visible"), (G, "unshuffle"), (A, "attention"), (C, "cosine_loss")]
    for module, name in kernel_ops:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    dev = dict(device=kernel_device)
    randn = lambda *shape: torch.randn(*shape, dtype=kernel_dtype, **dev)
    x, idx = randn(2, 4, 16), torch.tensor([[0, 2], [3, 1]], **dev)
    ids_restore = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], **dev)
    q = randn(1, 1, 5, 16)
    with ops.use_backend(backend):
        ops.gather_tokens(x, idx)
        ops.gather_visible(x, idx, randn(5, 16), randn(16))
        ops.unshuffle(randn(2, 3, 16), randn(16), ids_restore, randn(5, 16))
        ops.attention(q, q, q)
        ops.cosine_loss(x[0], x[1])
    assert len(calls) == (5 if expect_kernel else 0), calls


def test_fp32_attention_on_a_gpu_goes_to_sdpa():
    # exact fp32 tiles spill on a GPU; under the interpreter (CPU) fp32 stays on the kernel
    shape = (2, 12, 50, 64)
    assert ops.attention_on_sdpa("cuda", torch.float32, shape)
    assert not ops.attention_on_sdpa("cuda", torch.bfloat16, shape)
    assert not ops.attention_on_sdpa("cpu", torch.float32, shape)


def test_prefer_sdpa_routes_one_shape(monkeypatch, kernel_device, kernel_dtype):
    calls = []
    real = A.attention
    monkeypatch.setattr(A, "attention", lambda *a: calls.append(a[0].shape) or real(*a))
    q50, q9 = (torch.randn(2, 3, n, 16, device=kernel_device, dtype=kernel_dtype) for n in (50, 9))
    try:
        ops.prefer_sdpa(50, 3, 16, kernel_dtype, "test")
        assert ops.attention_on_sdpa(kernel_device.type, kernel_dtype, tuple(q50.shape))
        with ops.use_backend("triton"):
            torch.testing.assert_close(ops.attention(q50, q50, q50), A.attention_ref(q50, q50, q50))
            ops.attention(q9, q9, q9)
        assert calls == [q9.shape]  # only the shape without a preference reached the kernel
    finally:
        ops.clear_sdpa_preferences()


def _all_ops(x, idx, ids_restore, pos, cls, mask_token, w):
    # a miniature MAE forward through every op: gather -> attention -> unshuffle -> loss
    B, N, D = x.shape
    h = ops.gather_visible(x @ w, idx, pos, cls)  # (B, 1+K, D)
    q = h.view(B, h.shape[1], 2, D // 2).transpose(1, 2)  # (B, 2, 1+K, D/2)
    h = ops.attention(q, q * 0.5, q).transpose(1, 2).reshape(h.shape)
    full = ops.unshuffle(h, mask_token, ids_restore, pos)  # (B, 1+N, D)
    pred = ops.gather_tokens(full[:, 1:], idx)
    return ops.cosine_loss(pred.flatten(0, 1), x.flatten(0, 1)[: pred.shape[0] * pred.shape[1]])


def test_torch_compile_fullgraph_traces_the_triton_ops(kernel_device, kernel_dtype):
    torch.manual_seed(0)
    B, N, K, D = 2, 6, 3, 32
    noise = torch.rand(B, N)
    ids_shuffle = noise.argsort(dim=1)
    inputs = [
        torch.randn(B, N, D),
        ids_shuffle[:, :K].contiguous(),
        ids_shuffle.argsort(dim=1),
        torch.randn(N + 1, D),
        torch.randn(D),
        torch.randn(D),
        torch.randn(D, D),
    ]
    inputs = [t.to(kernel_device, kernel_dtype) if t.is_floating_point() else t.to(kernel_device) for t in inputs]
    inputs[-1].requires_grad_()
    with ops.use_backend("triton"):
        # aot_eager: Dynamo (fullgraph), fake tensors and AOTAutograd, as inductor sees them, without
        # inductor's ~1 min of C++ codegen on a small CPU (it compiles these ops too)
        compiled = torch.compile(_all_ops, fullgraph=True, backend="aot_eager")
        loss_c = compiled(*inputs)
        (grad_c,) = torch.autograd.grad(loss_c, inputs[-1])
    with ops.use_backend("torch"):
        loss_e = _all_ops(*inputs)
        (grad_e,) = torch.autograd.grad(loss_e, inputs[-1])
    # fp32 (interpreter): the two paths differ in summation order only, which varies with the threads' split
    # of a reduction (seen: 1.3e-5 of the largest gradient on a loaded 2-core machine); bf16 (GPU): in rounding.
    # A wrong gradient is off by the order of the gradient itself.
    fp32 = kernel_dtype == torch.float32
    tol, grad_tol = (1e-5, 1e-4) if fp32 else (2e-2, 2e-2)
    torch.testing.assert_close(loss_c, loss_e, atol=tol, rtol=tol)
    grad_scale = grad_e.abs().max().item()
    torch.testing.assert_close(grad_c, grad_e, atol=grad_tol * grad_scale, rtol=10 * grad_tol)


def test_first_op_call_inside_compile_does_not_break_the_graph(monkeypatch):
    # The backend is resolved at import and its log line skipped while tracing, so the first
    # ops.* call of a run may happen inside a compiled block without splitting its graph.
    from urfm_fast.model.vit import Block

    monkeypatch.setattr(ops, "_logged", False)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(Block(32, 2))(torch.randn(2, 5, 32))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("B,H,Lq,Lk,Dh", [(2, 3, 5, 17, 16), (1, 2, 147, 197, 32), (3, 1, 13, 4, 8)])
def test_cross_attention_cpu_fallback_forward_and_backward(backend, B, H, Lq, Lk, Dh):
    """Queries and keys of different lengths (the prompting decoder) on CPU, against the fp64 math."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, Dh, requires_grad=True) for n in (Lq, Lk, Lk))
    g = torch.randn(B, H, Lq, Dh)
    with ops.use_backend(backend):
        out = ops.attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = A.attention_math_ref(q64, k64, v64, upcast=False)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    assert out.shape == (B, H, Lq, Dh)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("backend,level,shown", [("auto", "INFO", False), ("auto", "DEBUG", True),
                                                  ("torch", "INFO", True), ("triton", "INFO", True)])
def test_backend_line_only_when_chosen_or_verbose(backend, level, shown, monkeypatch, caplog):
    """The start-up line ``urfm_fast kernels backend: ...`` stays off stderr for the default ``auto``."""
    import logging

    monkeypatch.setattr(ops, "_logged", False)  # the line is written once per process
    monkeypatch.setattr(ops, "_backend", backend)
    with caplog.at_level(getattr(logging, level), logger=ops.log.name):
        assert ops.get_backend() == backend
    assert any("kernels backend" in r.getMessage() for r in caplog.records) == shown


"""Triton cosine-representation loss against its torch reference: value and d/d pred, with
per-row weights and the target LayerNorm, fp32 and fp16, awkward shapes. Outputs NaN-poisoned."""

import os

import pytest
import torch

from urfm_fast.kernels import cosine_loss as C
from urfm_fast.kernels._triton import poison_outputs
from urfm_fast.model import ops

ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# plus, for the gradient, a few roundings of its largest entry (cancellation makes torch exact by luck)
GRAD_REL = {torch.float32: 4 * 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}
# bf16 on compiled kernels only: the interpreter rounds fp32 -> bf16 differently from the GPU
on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if on_gpu else [])


@pytest.fixture(autouse=True)
def _triton_backend():
    with ops.use_backend("triton"), poison_outputs():
        yield


def _loss_and_grad(fn, pred, target, weight, target_norm, scale=1.0):
    pred = pred.detach().clone().requires_grad_()
    loss = fn(pred, target, weight, target_norm)
    (loss * scale).backward()
    return loss.detach(), pred.grad


# (M, D): one row, D=1, the real decoder shape (147 masked rows x 768), primes, non powers of two
SHAPES = [(1, 1), (1, 768), (7, 33), (147, 768), (61, 1000), (5, 4099)] + ([(256 * 147, 768)] if on_gpu else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D", SHAPES)
@pytest.mark.parametrize("weighted,target_norm", [(False, False), (True, False), (False, True), (True, True)])
def test_cosine_loss_matches_reference(M, D, dtype, weighted, target_norm, kernel_device, close_to_fp32):
    pred = torch.randn(M, D, device=kernel_device).to(dtype)
    target = (torch.randn(M, D, device=kernel_device) * 3 + 1).to(dtype)  # off-centre: the LN matters
    weight = torch.rand(M, device=kernel_device) + 0.1 if weighted else None
    scale = 2.5  # an incoming gradient other than 1 must scale the stored one
    out, grad = _loss_and_grad(ops.cosine_loss, pred, target, weight, target_norm, scale)
    ref, ref_grad = _loss_and_grad(C.cosine_loss_ref, pred, target, weight, target_norm, scale)
    ref32, ref32_grad = _loss_and_grad(C.cosine_loss_ref, pred.float(), target.float(), weight, target_norm, scale)
    assert out.dtype == torch.float32 and out.shape == ()
    assert grad.dtype == dtype
    close_to_fp32(out, ref, ref32, ATOL[dtype], "loss")
    # the gradient is a difference of two terms of size c / |p| per row (c = the row's weight in
    # the mean); where they cancel (D=1: the gradient is 0) what is left is their rounding
    w = weight if weighted else torch.ones(M, device=kernel_device)
    terms = (scale * w / w.sum() / pred.float().norm(dim=-1).clamp_min(C.EPS)).max().item()
    atol_g = ATOL[dtype] + max(ref32_grad.abs().max().item(), terms) * GRAD_REL[dtype]
    close_to_fp32(grad, ref_grad, ref32_grad, atol_g, "grad")


def test_no_gradient_to_target_and_no_grad_mode(kernel_device):
    pred = torch.randn(4, 16, device=kernel_device, requires_grad=True)
    target = torch.randn(4, 16, device=kernel_device, requires_grad=True)
    ops.cosine_loss(pred, target).backward()
    assert target.grad is None and torch.isfinite(pred.grad).all()
    with torch.no_grad():
        loss = ops.cosine_loss(pred, target)
    torch.testing.assert_close(loss, C.cosine_loss_ref(pred, target))


def test_zero_rows_and_identical_rows(kernel_device):
    # a zero pred row: cos = 0 (clamped norm), finite zero-slope gradient along p; identical rows: loss 0
    pred = torch.randn(3, 20, device=kernel_device)
    pred[1] = 0
    target = pred.clone()
    target[1] = torch.randn(20)
    out, grad = _loss_and_grad(ops.cosine_loss, pred, target, None, False)
    ref, ref_grad = _loss_and_grad(C.cosine_loss_ref, pred, target, None, False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_batched_rows(kernel_device):
    pred = torch.randn(2, 5, 24, device=kernel_device, requires_grad=True)
    target, weight = torch.randn(2, 5, 24, device=kernel_device), torch.rand(2, 5, device=kernel_device)
    torch.testing.assert_close(ops.cosine_loss(pred, target, weight), C.cosine_loss_ref(pred, target, weight))


def test_launcher_errors(kernel_device):
    p = torch.randn(3, 8, device=kernel_device)
    with pytest.raises(ValueError, match="same shape"):
        C.cosine_loss_fwd(p, p[:, :4], None, False, True)
    with pytest.raises(ValueError, match="weight"):
        C.cosine_loss_fwd(p, p, torch.ones(4, device=kernel_device), False, True)
    with pytest.raises(ValueError, match="zero rows"):
        C.cosine_loss_fwd(p[:0], p[:0], None, False, True)
    with pytest.raises(ValueError, match="D="):
        C.cosine_loss_fwd(p.new_zeros(1, C.MAX_D + 1), p.new_zeros(1, C.MAX_D + 1), None, False, True)

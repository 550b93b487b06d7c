"""Cosine-representation loss: mean over rows of 1 - cos(pred, target).

URFM's objective compares the decoder's predictions with the frozen teacher's patch features.
Always computed in fp32; no gradient reaches ``target``. Optional per-row ``weight`` (the loss is
then sum(w * (1 - cos)) / sum(w)) and optional LayerNorm without affine of the target
(MaskDistill's normalisation) before the comparison.

The Triton version reads each row of pred and target once, normalises both in fp32 registers,
and in the same pass writes the row's share of the loss and d loss / d pred (in pred's dtype).
Backward only scales that stored gradient by the incoming one: no fp32 [M,D] buffer is ever
allocated, and with no grad needed (eval) the gradient is not written at all.

Limits: D <= 16384 (a row lives in registers); leading dims are flattened, so [B,L,D] works;
M = 0 is rejected (the mean of nothing).

Caution: the stored gradient (pred's size and dtype) lives from forward to backward, in place of
the saved pred and target an eager autograd graph would keep. It is written whenever pred
requires grad under grad mode, even if backward is never called.
"""

import torch
import torch.nn.functional as F

from urfm_fast.kernels._triton import empty, launcher, next_power_of_2, tl, triton

EPS = 1e-8  # matches F.cosine_similarity's eps: denominators are clamped at this
LN_EPS = 1e-6


def cosine_loss_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    target_norm: bool = False,
) -> torch.Tensor:
    """pred [M,D], target [M,D], weight [M] or None -> scalar fp32 loss."""
    target = target.detach().float()
    if target_norm:
        target = F.layer_norm(target, target.shape[-1:], eps=LN_EPS)
    pred = pred.float()
    cos = (pred * target).sum(-1) / (pred.norm(dim=-1).clamp_min(EPS) * target.norm(dim=-1).clamp_min(EPS))
    per_row = 1.0 - cos  # (M,)
    if weight is None:
        return per_row.mean()
    weight = weight.detach().float()
    return (per_row * weight).sum() / weight.sum()


# --------------------------------------------------------------------------------------------
# Triton kernel: ROWS rows per program, each row held whole in registers (D <= MAX_D).
# --------------------------------------------------------------------------------------------

MAX_D = 16384


@triton.jit
def _cosine_loss_kernel(
    pred_ptr,  # [M, D] strides (stride_pm, 1)
    target_ptr,  # [M, D] strides (stride_tm, 1)
    weight_ptr,  # [M] per-row weights (read only if HAS_WEIGHT)
    wsum_ptr,  # [1] fp32 sum of the weights (read only if HAS_WEIGHT)
    loss_ptr,  # [M] fp32: this row's share of the scalar loss
    grad_ptr,  # [M, D] contiguous, pred's dtype: d loss / d pred (written only if WITH_GRAD)
    M,
    D,
    stride_pm,
    stride_tm,
    inv_m,  # 1 / M, the row weight when HAS_WEIGHT is False
    eps,
    ln_eps,
    HAS_WEIGHT: tl.constexpr,
    TARGET_NORM: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    p = tl.load(pred_ptr + rows64[:, None] * stride_pm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + rows64[:, None] * stride_tm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if TARGET_NORM:  # LayerNorm without affine, biased variance (as F.layer_norm)
        mean = tl.sum(t, axis=1) / D
        t = tl.where(mask, t - mean[:, None], 0.0)
        t = t * tl.rsqrt(tl.sum(t * t, axis=1) / D + ln_eps)[:, None]
    p_norm = tl.sqrt(tl.sum(p * p, axis=1))
    p_den = tl.maximum(p_norm, eps)
    t_den = tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), eps)
    cos = tl.sum(p * t, axis=1) / (p_den * t_den)
    if HAS_WEIGHT:
        c = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) / tl.load(wsum_ptr)
    else:
        c = tl.zeros([ROWS], dtype=tl.float32) + inv_m
    tl.store(loss_ptr + rows, c * (1.0 - cos), mask=row_ok)
    if WITH_GRAD:
        # d(1 - cos)/dp = -t / (|p| |t|) + cos p / |p|^2; the clamp at eps has zero slope below it
        along_p = tl.where(p_norm > eps, cos / (p_den * p_den), 0.0)
        g = c[:, None] * (along_p[:, None] * p - t / (p_den * t_den)[:, None])
        tl.store(grad_ptr + rows64[:, None] * D + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def launch_shape(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) for rows of D features: <= 4096 elements per program and <= 32 fp32
    per thread per operand, so nothing spills (tests/test_sm90_compile.py checks it for sm_90)."""
    block_d = next_power_of_2(D)
    rows = max(1, min(4096 // block_d, 16))
    return block_d, rows, min(16, max(4, rows * block_d // 512))


@launcher
def cosine_loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, target_norm: bool, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scalar fp32 loss, d loss/d pred as [M,D] in pred's dtype, or an empty tensor without with_grad)."""
    if pred.shape != target.shape or pred.ndim < 1:
        shapes = f"{tuple(pred.shape)}, {tuple(target.shape)}"
        raise ValueError(f"pred and target must have the same shape [..., D]; got {shapes}")
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device}, target on {target.device}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"pred and target must be floating point, got {pred.dtype}, {target.dtype}")
    D = pred.shape[-1]
    if not 1 <= D <= MAX_D:
        raise ValueError(f"feature size D={D} must lie in [1, {MAX_D}] (a row is held in registers)")
    pred2, target2 = pred.reshape(-1, D), target.reshape(-1, D)  # (M, D)
    pred2 = pred2 if pred2.stride(-1) == 1 else pred2.contiguous()
    target2 = target2 if target2.stride(-1) == 1 else target2.contiguous()
    M = pred2.shape[0]
    if M == 0:
        raise ValueError("cosine_loss of zero rows is undefined (the reference returns NaN)")
    if weight is not None:
        if weight.shape != pred.shape[:-1]:
            raise ValueError(f"weight must have shape {tuple(pred.shape[:-1])}, got {tuple(weight.shape)}")
        weight = weight.reshape(-1).contiguous()
        wsum = weight.sum(dtype=torch.float32).reshape(1)
    loss_rows = empty((M,), torch.float32, pred.device)
    grad = empty((M, D) if with_grad else (0,), pred.dtype, pred.device)
    block_d, rows, num_warps = launch_shape(D)
    _cosine_loss_kernel[(triton.cdiv(M, rows),)](
        pred2, target2, weight if weight is not None else loss_rows, wsum if weight is not None else loss_rows,
        loss_rows, grad if with_grad else loss_rows, M, D, pred2.stride(0), target2.stride(0), 1.0 / M, EPS, LN_EPS,
        HAS_WEIGHT=weight is not None, TARGET_NORM=target_norm, WITH_GRAD=with_grad, ROWS=rows, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return loss_rows.sum(), grad.view(pred.shape) if with_grad else grad


# --------------------------------------------------------------------------------------------
# torch.library op: the gradient is computed in the forward pass and only scaled in backward.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("urfm_fast::cosine_loss", mutates_args=())
def _cosine_loss_op(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, target_norm: bool, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return cosine_loss_fwd(pred, target, weight, target_norm, with_grad)


@_cosine_loss_op.register_fake
def _(pred, target, weight, target_norm, with_grad):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape if with_grad else (0,))


def _cosine_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _cosine_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad_pred,) = ctx.saved_tensors
    if grad_pred.numel() == 0 and grad_loss is not None:
        raise RuntimeError("cosine_loss ran without its gradient; call it with grad enabled on pred")
    return grad_pred * grad_loss.to(grad_pred.dtype), None, None, None, None


_cosine_loss_op.register_autograd(_cosine_loss_backward, setup_context=_cosine_loss_setup)


def cosine_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    target_norm: bool = False,
) -> torch.Tensor:
    """Triton version of ``cosine_loss_ref``; the [M,D] gradient is written only when pred needs it."""
    with_grad = torch.is_grad_enabled() and pred.requires_grad
    weight = None if weight is None else weight.detach()
    return _cosine_loss_op(pred, target.detach(), weight, target_norm, with_grad)[0]

"""Cosine-representation loss: mean over rows of 1 - cos(pred, target).

URFM's objective compares the decoder's predictions with the frozen teacher's patch features.
Always computed in fp32; no gradient reaches ``target``. Optional per-row ``weight`` (the loss is
then sum(w * (1 - cos)) / sum(w)) and optional LayerNorm without affine of the target
(MaskDistill's normalisation) before the comparison.
"""

import torch
import torch.nn.functional as F

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

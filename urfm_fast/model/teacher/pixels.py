"""MAE's target in the teacher's place: the student's own input, per-patch normalised pixels.

``--target pixels`` trains the same masked ViT and decoder with MAE's objective (He et al. 2022,
``norm_pix_loss``): each patch of the ImageNet-normalised image, flattened as MAE's ``patchify`` does
(row, column, then channel), minus its mean and divided by its standard deviation; the loss is the mean
squared error (``URFMConfig.loss='mse'``). It is the baseline every masked-image model is compared with,
and it needs no teacher weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD
from urfm_fast.data.augment import normalize


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], MAE's layout."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // patch, patch, W // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def normalised_pixels(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """MAE's norm_pix target: each patch standardised over its own p*p*C values (unbiased variance + 1e-6)."""
    x = patchify(imgs.float(), patch)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + 1e-6) ** 0.5


class PixelTarget(nn.Module):
    """Called like a teacher on images in [0, 1]: -> [B, N, p*p*3] normalised pixels on the student's grid."""

    def __init__(self, patch: int = 16):
        super().__init__()
        self.patch = patch
        self.out_dim = patch * patch * 3
        self.source = "pixels (MAE's per-patch normalised pixels, no teacher)"

    def compile_blocks(self) -> None:  # nothing to compile: a reshape and two reductions
        pass

    @torch.no_grad()
    def forward(self, images01: torch.Tensor, cls: bool = False, saliency: bool = False) -> torch.Tensor:
        if cls or saliency:
            raise ValueError("the pixel target has no CLS feature and no attention: use loss_on masked/all, "
                             "mask_type random/block")
        return normalised_pixels(normalize(images01, IMAGENET_MEAN, IMAGENET_STD), self.patch)

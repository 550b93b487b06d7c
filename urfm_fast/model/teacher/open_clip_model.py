"""An open_clip vision tower as a teacher, weights from a local file: the patch tokens of its trunk (a timm
trunk through ``timm_model``, or open_clip's own ViT)."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast.model.teacher.base import FeatureMapTeacher, as_map, record_input, split_heads
from urfm_fast.model.teacher.timm_model import vit_tokens
from urfm_fast.model.vit import cls_attention


def _mha_cls_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.MultiheadAttention`` (open_clip's ViT) block's CLS->patch attention from its query input."""
    x = x if attn.batch_first else x.transpose(0, 1)  # (B, L, D)
    D, w, b = x.shape[-1], attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(x[:, :1], w[:D], None if b is None else b[:D])
    k = F.linear(x, w[D : 2 * D], None if b is None else b[D : 2 * D])
    return cls_attention(split_heads(q, attn.num_heads), split_heads(k, attn.num_heads), prefix=1)


def _open_clip_tokens(visual, x, extras: bool = False):
    if hasattr(visual, "trunk"):  # a timm trunk (TimmModel)
        return vit_tokens(visual.trunk, x, extras)
    h = x.shape[-2] // visual.patch_size[0]
    if not extras:
        _, tokens = visual(x)  # open_clip's own ViT with output_tokens: final-LN patch tokens
        return as_map(tokens, h)
    # open_clip's forward spelled out, to keep the pooled CLS before its projection (the tokens' width)
    last = visual.transformer.resblocks[-1].attn
    with record_input(last) as seen:
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(x)))
    attn = _mha_cls_attention(last, seen["x"]) if isinstance(last, nn.MultiheadAttention) else None
    return as_map(tokens, h), pooled, attn


def open_clip_teacher(name: str, path: str | os.PathLike, grid: int | None = None,
                      input_size: int | None = None) -> FeatureMapTeacher:
    """The vision tower of open_clip model ``name`` with weights from a local file (patch tokens of its trunk)."""
    import open_clip

    model = open_clip.create_model(name, pretrained=str(path), weights_only=True)
    visual = model.visual.eval()
    native = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    size = input_size or native
    if hasattr(visual, "trunk"):
        dim = visual.trunk.num_features
    else:
        visual.output_tokens = True
        dim = visual.transformer.width
        if size != native:
            raise ValueError(f"open_clip tower {name} runs at {native}px only")
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return FeatureMapTeacher(visual, _open_clip_tokens, dim, size, mean, std, source=f"open_clip:{name}={path}",
                             grid=grid)

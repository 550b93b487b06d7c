"""Any timm model as a teacher: a ViT's final patch tokens (its CLS and last-block CLS attention when asked),
or a CNN's deepest stride-16 feature map."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from urfm_fast.model.teacher.base import (
    FeatureMapTeacher,
    as_map,
    load_mapped,
    read_state_dict,
    record_input,
    split_heads,
)
from urfm_fast.model.vit import cls_attention


def _timm_cls_attention(attn: nn.Module, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """A timm ``Attention`` block's CLS->patch attention from its input x [B, L, D] (qkv and q/k norms)."""
    if not hasattr(attn, "qkv"):
        raise ValueError(f"{type(attn).__name__} has no fused qkv: its attention map cannot be read")
    D = x.shape[-1]
    qkv = attn.qkv(x)  # (B, L, 3D)
    q = getattr(attn, "q_norm", nn.Identity())(split_heads(qkv[:, :1, :D], attn.num_heads))
    k = getattr(attn, "k_norm", nn.Identity())(split_heads(qkv[:, :, D : 2 * D], attn.num_heads))
    return cls_attention(q, k, prefix)


def vit_tokens(model, x, extras: bool = False):
    """A timm ViT's final patch tokens as a map; ``extras``: its CLS token (else the mean patch token, for
    ViTs without one) and the last block's CLS attention (None without a CLS token)."""
    prefix = model.num_prefix_tokens
    h = x.shape[-2] // model.patch_embed.patch_size[0]
    has_cls = getattr(model, "cls_token", None) is not None
    with record_input(model.blocks[-1].attn) if extras and has_cls else contextlib.nullcontext({}) as seen:
        out = model.forward_features(x)  # (B, prefix + h*w, D), final norm applied
    fmap = as_map(out[:, prefix:], h)
    if not extras:
        return fmap
    attn = _timm_cls_attention(model.blocks[-1].attn, seen["x"], prefix) if has_cls else None
    return fmap, out[:, 0] if has_cls else out[:, prefix:].mean(1), attn


def _stride16_index(model) -> int:
    infos = model.feature_info if isinstance(model.feature_info, list) else model.feature_info.info
    reductions = [i["reduction"] for i in infos]
    if 16 not in reductions:
        raise ValueError(f"{type(model).__name__} has no stride-16 feature map (strides {reductions})")
    return max(i for i, r in enumerate(reductions) if r == 16)  # the deepest stride-16 stage


def timm_teacher(name: str, path: str | os.PathLike | None, grid: int | None = None, input_size: int | None = None,
                 model: nn.Module | None = None) -> FeatureMapTeacher:
    """Any timm model as a teacher: a ViT's final patch tokens, or a CNN's deepest stride-16 feature map.
    Weights from ``path`` (safetensors or a plain state dict; strict), or an already built ``model``."""
    import timm

    if model is None:
        model = timm.create_model(name, pretrained=False)
        load_mapped(model, read_state_dict(Path(path)), str, str(path))
    cfg = model.pretrained_cfg
    size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        if hasattr(model, "set_input_size"):
            model.set_input_size(img_size=size)
        features, dim = vit_tokens, model.num_features
    else:
        index = _stride16_index(model)
        infos = model.feature_info if isinstance(model.feature_info, list) else model.feature_info.info
        dim = infos[index]["num_chs"]

        def features(m, x, extras=False):
            fmap = m.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
            return (fmap, None, None) if extras else fmap  # CLS and saliency: from the map (see forward)
    return FeatureMapTeacher(model.eval(), features, dim, size, cfg.get("mean", (0.485, 0.456, 0.406)),
                             cfg.get("std", (0.229, 0.224, 0.225)), source=f"timm:{name}={path}", grid=grid)

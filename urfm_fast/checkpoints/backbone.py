"""URFM encoders as timm ``VisionTransformer`` backbones, and their timm names (registered on import of this module).

    from urfm_fast import load_backbone
    model = load_backbone("mae_vit_base_patch16_dec768d8b_all_biomedclip_1199.pth")   # EMA (weights="auto")
    model.forward_features(x)            # [B, 1+N, D] after the final LayerNorm
    model(x)                             # pooled features [B, D] (num_classes=0) or logits
    model.forward_intermediates(x, indices=4, output_fmt="NCHW")  # multi-level maps for dense heads

    import timm, urfm_fast.checkpoints.backbone   # registers urfm_vit_{tiny,small,base,large,huge}_patch16_224
    timm.create_model("urfm_vit_base_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="PATH"))   # any format load_checkpoint reads

What comes back is timm's own class, so everything timm offers (``forward_intermediates``,
``set_grad_checkpointing``, ``reset_classifier``, ``timm.data.resolve_data_config``) works as usual.

Grey-scale input: the encoder was trained on grey images replicated to 3 channels and normalised with
ImageNet mean/std per channel. With ``in_chans=1`` the patch embedding is folded so that a 1-channel
image normalised with the single mean/std in ``model.pretrained_cfg`` (GREY_MEAN/GREY_STD) gives
*exactly* the features of the replicated, per-channel-normalised RGB image: the three channel kernels
are summed with weights ``grey_std / std_c`` and the constant offset from the differing means goes into
the bias. (timm's generic ``adapt_input_conv`` only sums the kernels, which is exact only when all
channels share one mean/std.) Alternatively keep ``in_chans=3`` and repeat the grey channel.

Pooling: ``global_pool='token'`` (CLS, URFM/MAE's default) or ``'avg'`` (mean of patch tokens). For
``'avg'`` we keep the pretrained final ``norm`` and pass ``fc_norm=False``, so pooled features are the
mean of the very tokens ``forward_features`` returns; pass ``fc_norm=True`` for MAE's fine-tuning
variant (a fresh LayerNorm after pooling, initialised here from the pretrained ``norm``).
"""

from __future__ import annotations

import os

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import (
    VisionTransformer,
    adapt_input_conv,
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
)

from urfm_fast.checkpoints.formats import CheckpointError, LoadedCheckpoint, load_checkpoint, size_from_name
from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD, VIT_PRESETS

# One mean/std for a grey channel: the channel averages of the student normalisation.
GREY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GREY_STD = (sum(IMAGENET_STD) / 3,)

SIZES = ("tiny", "small", "base", "large", "huge")


def _cfg(**kwargs) -> dict:
    return dict(
        url="", num_classes=0, input_size=(3, 224, 224), pool_size=None, crop_pct=1.0,
        interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        first_conv="patch_embed.proj", classifier="head", license="mit",
        paper_ids="URFM, iScience 28(8), 2025", **kwargs,
    )


# No hosted weights: ``pretrained=True`` needs ``pretrained_cfg_overlay=dict(file=PATH)``.
default_cfgs = generate_default_cfgs({f"urfm_vit_{s}_patch16_224": _cfg() for s in SIZES})


def fold_grey_patch_embed(weight: torch.Tensor, bias: torch.Tensor | None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          grey_mean=GREY_MEAN[0], grey_std=GREY_STD[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """[D,3,p,p] RGB patch kernel -> [D,1,p,p] kernel + bias, exact for grey images (see module doc).

    RGB input: x_c = (g - m_c) / s_c with g the grey level. Grey input: x = (g - m) / s, so
    x_c = (s x + m - m_c) / s_c and  sum_c W_c * x_c = (sum_c W_c s / s_c) * x + sum_c W_c (m - m_c) / s_c.
    The second term is a constant image, so per output channel it is a bias.
    """
    w = weight.float()
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    w1 = (w * (grey_std / s)).sum(1, keepdim=True)  # (D, 1, p, p)
    b_extra = (w * ((grey_mean - m) / s)).sum(dim=(1, 2, 3))  # (D,)
    b = (bias.float() if bias is not None else torch.zeros(w.shape[0])) + b_extra
    return w1.to(weight.dtype), b.to(weight.dtype)


def load_urfm_weights(model: VisionTransformer, ckpt: LoadedCheckpoint) -> VisionTransformer:
    """Load a checkpoint's encoder into a timm VisionTransformer, adapting channels, grid and pooling."""
    sd = dict(ckpt.encoder_state_dict())
    cfg = ckpt.config
    conv = model.patch_embed.proj
    if conv.weight.shape[-1] != cfg.patch_size or model.embed_dim != cfg.embed_dim or len(model.blocks) != cfg.depth:
        raise CheckpointError(
            f"{ckpt.meta.get('path')}: a {cfg.model} (width {cfg.embed_dim}, depth {cfg.depth}, patch "
            f"{cfg.patch_size}) does not fit a model of width {model.embed_dim}, depth {len(model.blocks)}, "
            f"patch {conv.weight.shape[-1]}"
        )
    w = sd["patch_embed.proj.weight"]
    if conv.in_channels != w.shape[1]:
        if conv.in_channels == 1 and w.shape[1] == 3:
            sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = fold_grey_patch_embed(
                w, sd.get("patch_embed.proj.bias"))
        else:
            sd["patch_embed.proj.weight"] = adapt_input_conv(conv.in_channels, w)
    if sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=1)
    if isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity):
        # MAE fine-tuning layout (avg pool + fc_norm): start fc_norm from the pretrained final norm.
        sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "attn_pool."))]
    if missing or unexpected:
        where = ckpt.meta.get("path")
        raise CheckpointError(f"{where}: missing {missing[:3]}, unexpected {unexpected[:3]} in timm ViT")
    return model


def _model_args(embed_dim, depth, num_heads, mlp_ratio, patch_size, img_size, in_chans, num_classes,
                global_pool, timm_kwargs) -> dict:
    args = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
    )
    if global_pool in ("avg", "avgmax", "max"):
        args["fc_norm"] = False  # keep the pretrained final norm (see module docstring)
    args.update(timm_kwargs)
    return args


def _set_data_cfg(model: VisionTransformer, img_size: int, in_chans: int, mean=None, std=None) -> None:
    cfg = dict(model.pretrained_cfg)
    if in_chans == 1:
        mean, std = GREY_MEAN, GREY_STD
    cfg.update(input_size=(in_chans, img_size, img_size), mean=tuple(mean or IMAGENET_MEAN),
               std=tuple(std or IMAGENET_STD), num_classes=model.num_classes)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Entry point behind the registered names; weights come from ``pretrained_cfg_overlay['file']``."""
    size = variant.split("_")[2]
    embed_dim, depth, num_heads = VIT_PRESETS[f"vit_{size}"]
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file")
    if pretrained and not file:
        raise RuntimeError(
            f"{variant} has no hosted weights: pass pretrained_cfg_overlay=dict(file=PATH) with a URFM "
            "checkpoint or export, or use urfm_fast.load_backbone(PATH)"
        )
    ckpt = load_checkpoint(file, weights=overlay.get("weights") or "auto") if pretrained else None
    in_chans = kwargs.pop("in_chans", 3)
    base = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, patch_size=16,
                img_size=kwargs.pop("img_size", 224))
    if ckpt is not None:  # the checkpoint's shapes win over the name's defaults, except img_size
        c = ckpt.config
        base.update(embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                    patch_size=c.patch_size)
    args = _model_args(**base, in_chans=in_chans, num_classes=kwargs.pop("num_classes", 0),
                       global_pool=kwargs.pop("global_pool", "token"), timm_kwargs={})
    for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size"):
        if k in kwargs and ckpt is None:
            args[k] = kwargs.pop(k)
    args.update({k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay")})
    if ckpt is None:  # shape keywords a wrapper's own arguments would shadow (smp's encoder takes ``depth``)
        args.update(overlay.get("model_args") or {})
    overlay = {k: v for k, v in overlay.items() if k not in ("file", "weights", "model_args")}
    model = build_model_with_cfg(VisionTransformer, variant, pretrained=False,
                                 pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay,
                                 **{k: v for k, v in args.items() if k not in ("pretrained_cfg",)})
    img = args["img_size"] if isinstance(args["img_size"], int) else args["img_size"][0]
    _set_data_cfg(model, img, in_chans)
    if ckpt is not None:
        load_urfm_weights(model, ckpt)
    return model


@register_model
def urfm_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("urfm_vit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def urfm_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("urfm_vit_small_patch16_224", pretrained, **kwargs)


@register_model
def urfm_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("urfm_vit_base_patch16_224", pretrained, **kwargs)


@register_model
def urfm_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("urfm_vit_large_patch16_224", pretrained, **kwargs)


@register_model
def urfm_vit_huge_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("urfm_vit_huge_patch16_224", pretrained, **kwargs)


def load_backbone(
    path: str | os.PathLike | LoadedCheckpoint | None = None,
    arch: str = "vit_base",
    num_classes: int = 0,
    global_pool: str = "token",
    in_chans: int = 3,
    img_size: int | None = None,
    weights: str = "auto",
    **timm_kwargs,
) -> VisionTransformer:
    """The URFM encoder as a timm VisionTransformer.

    path: any checkpoint ``load_checkpoint`` reads (official URFM .pth, ours, DCP folder, export) or an
    already loaded one; None gives a randomly initialised ``arch`` (``vit_tiny`` ... ``vit_huge``). With a
    path the architecture comes from the checkpoint and ``arch`` is ignored. ``img_size`` defaults to the
    checkpoint's (224 without one); another size resamples the position embedding (bicubic).
    ``num_classes > 0`` adds a freshly initialised linear head. Other keyword arguments go to timm's
    VisionTransformer (``drop_path_rate``, ``dynamic_img_size``, ``fc_norm``, ...).
    ``weights``: ``auto`` (the EMA once it has averaged at least 1 / (1 - decay) updates, else the live
    weights), ``ema`` or ``live``; prints which it took.
    """
    ckpt = path if isinstance(path, LoadedCheckpoint) else (
        load_checkpoint(path, weights=weights) if path is not None else None)
    if ckpt is not None and not isinstance(path, LoadedCheckpoint):
        which = {"model": "live", "ema": "EMA"}.get(ckpt.meta["weights"], ckpt.meta["weights"])
        print(f"load_backbone: {which} weights of {ckpt.meta['path']} "
              f"({ckpt.meta.get('weights_reason', '')})")
    if ckpt is not None:
        c = ckpt.config
        dims = (c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.patch_size)
        img_size = img_size or c.img_size
    else:
        size = arch if arch in VIT_PRESETS else size_from_name(arch)
        if size not in VIT_PRESETS:
            raise ValueError(f"unknown arch {arch!r}; choose from {sorted(VIT_PRESETS)}")
        d, L, h = VIT_PRESETS[size]
        dims = (d, L, h, 4.0, 16)
        img_size = img_size or 224
    args = _model_args(*dims, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                       global_pool=global_pool, timm_kwargs=timm_kwargs)
    size = next((n for n, (d, L, _) in VIT_PRESETS.items() if (d, L) == dims[:2]), "vit_base")
    variant = f"urfm_{size}_patch16_224"
    model = build_model_with_cfg(VisionTransformer, variant, pretrained=False, **args)
    _set_data_cfg(model, img_size, in_chans)
    if ckpt is not None:
        load_urfm_weights(model, ckpt)
        model.urfm_meta = dict(ckpt.meta, config=ckpt.config.to_dict())
    return model

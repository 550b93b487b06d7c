"""The backbones evaluate compares: what each spec names, built once per protocol run.

A ``Backbone`` carries a label, its spec, ``make(num_classes, drop_path_rate)`` (a fresh timm model at the
same seeded init each call) and the input normalisation and size its weights expect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Backbone:
    label: str
    spec: str
    make: object  # (num_classes, drop_path_rate) -> timm model
    mean: tuple
    std: tuple
    img_size: int
    meta: dict


def resolve_backbone(spec: str, arch: str, global_pool: str, img_size: int | None, weights: str = "auto") -> Backbone:
    """``weights`` (auto | ema | live): which weights of a URFM checkpoint (see ``load_checkpoint``)."""
    import timm
    import torch

    from urfm_fast.checkpoints.backbone import load_backbone
    from urfm_fast.checkpoints.formats import load_checkpoint

    label, _, target = spec.partition("=") if "=" in spec else (None, "", spec)
    label = label or Path(target).stem or target
    if target == "random":
        def make(num_classes=0, drop_path_rate=0.0):
            torch.manual_seed(0)  # the same random init for every seed/fraction
            return load_backbone(None, arch=arch, num_classes=num_classes, global_pool=global_pool,
                                 img_size=img_size or 224, drop_path_rate=drop_path_rate)
        meta = {"format": "random", "arch": arch}
    elif Path(target).expanduser().exists():
        ckpt = load_checkpoint(Path(target).expanduser(), weights=weights)
        print(f"[{label}] {ckpt.meta['weights']} weights ({ckpt.meta['weights_reason']})")

        def make(num_classes=0, drop_path_rate=0.0):
            torch.manual_seed(0)
            return load_backbone(ckpt, num_classes=num_classes, global_pool=global_pool, img_size=img_size,
                                 drop_path_rate=drop_path_rate)
        meta = {k: ckpt.meta[k] for k in ("format", "weights", "weights_reason", "epoch", "step", "path")}
        meta["model"] = ckpt.config.model
    else:
        name = target.removeprefix("timm:")

        def make(num_classes=0, drop_path_rate=0.0):
            torch.manual_seed(0)
            kw = {"img_size": img_size} if img_size else {}
            return timm.create_model(name, pretrained=True, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                     **kw)
        meta = {"format": "timm", "name": name}
    probe = make()
    cfg = probe.pretrained_cfg
    return Backbone(label, target, make, tuple(cfg.get("mean", IMAGENET_MEAN)),
                    tuple(cfg.get("std", IMAGENET_STD)), int(cfg["input_size"][-1]), meta)

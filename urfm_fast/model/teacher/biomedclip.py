"""The frozen BiomedCLIP vision tower that provides URFM's targets, and where its weights are found.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, MIT licence) is an open_clip
model whose vision tower is a timm ``vit_base_patch16_224`` trunk (keys ``visual.trunk.*``) and a
768 -> 512 projection without bias (``visual.head.proj.weight``). We rebuild the trunk with our own
ViT code (identical keys and maths) so it runs through ``urfm_fast.model.ops`` like the student, and load
only the vision keys of the open_clip file; the text tower is ignored.

Targets are the final-LayerNorm patch tokens ``trunk.forward_features(x)[:, 1:]`` (768-d), or with
``target='proj'`` those tokens projected to the 512-d joint space.

Weights: an open_clip file, a folder holding one, the Hugging Face cache, or (where the hub can be reached)
a download; ``random`` builds the architecture for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from urfm_fast.config import BIOMEDCLIP_FILES, CLIP_MEAN, CLIP_STD, HF_HUB_ID
from urfm_fast.model.teacher.base import (
    Targets,
    TeacherUnavailable,
    as_map,
    load_mapped,
    read_state_dict,
    saliency_to_grid,
    tokens_to_grid,
)
from urfm_fast.model.vit import ViTEncoder

log = logging.getLogger(__name__)

TRUNK_PREFIX = "visual.trunk."
PROJ_KEY = "visual.head.proj.weight"


def _find_in_folder(folder: Path) -> Path:
    for name in BIOMEDCLIP_FILES:
        if (folder / name).is_file():
            return folder / name
    raise TeacherUnavailable(f"no {' or '.join(BIOMEDCLIP_FILES)} in {folder}")


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
        for name in BIOMEDCLIP_FILES:
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
        teacher.load_open_clip_state_dict(read_state_dict(path), origin=str(path))
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
        return as_map(out[:, 1:], x.shape[-2] // 16), out[:, 0]

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

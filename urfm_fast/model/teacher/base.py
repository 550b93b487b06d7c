"""What every teacher shares: the outputs (``Targets``), the one error (``TeacherUnavailable``), resampling a
patch grid to the student's, the CNN saliency map, strict key-mapped loading, and ``FeatureMapTeacher``, the
wrapper that turns any frozen encoder giving a spatial map into a teacher."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn


class TeacherUnavailable(RuntimeError):
    """A teacher cannot be built: its weights are not found offline (nor can they be downloaded here), or its
    --teacher spec or file does not fit."""


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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


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


def resample_grid(fmap: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, D, h, w] -> [B, D, *grid]: area average where the grid shrinks, bilinear where it grows."""
    if tuple(fmap.shape[-2:]) == tuple(grid):
        return fmap
    if fmap.shape[-2] >= grid[0] and fmap.shape[-1] >= grid[1]:
        return nn.functional.adaptive_avg_pool2d(fmap, grid)
    return nn.functional.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)


def as_map(tokens: torch.Tensor, h: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, -1)  # (B, D, h, w)


@contextlib.contextmanager
def record_input(module: nn.Module):
    """Record the first input of ``module`` during the forward run inside (a hook: no second pass)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod, args, kwargs):
        seen["x"] = args[0] if args else next(iter(kwargs.values()))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, H, L, Dh)


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

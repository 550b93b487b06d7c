"""Models whose features are a map (a CNN, a frozen teacher) behind the token interface that evaluate's probes
read (urfm_fast.eval.backbones): ``m(x)`` pooled [B, D]; ``m.forward_features(x)`` tokens [B, P + h*w, D] with
P = ``m.num_prefix_tokens``; the grid (h, w) in ``m.feature_grid`` (no ``patch_embed``: that name means a
timm ViT's grid)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MapBackbone(nn.Module):
    """``inner`` gives a feature map (``encode``); tokens are its cells, row-major, after the CLS if any.
    Built for one input size: ``feature_grid`` is the map's (h, w) at that size."""

    def __init__(self, inner: nn.Module, img_size: int):
        super().__init__()
        self.inner, self.img_size = inner, img_size
        param = next(inner.parameters(), None)
        was_training = inner.training
        inner.eval()  # the probe must not move BatchNorm statistics
        with torch.no_grad():
            fmap, cls = self.encode(torch.zeros(1, 3, img_size, img_size,
                                                device=param.device if param is not None else "cpu"))
        inner.train(was_training)
        self.feature_grid = tuple(int(s) for s in fmap.shape[-2:])
        self.num_prefix_tokens = int(cls is not None)
        self.num_features = self.embed_dim = int(fmap.shape[1])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised images -> (map [B, D, h, w], CLS [B, D] or None)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this backbone is built for {self.img_size}px input, got {tuple(x.shape[-2:])}")
        fmap, cls = self.encode(x)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return tokens if cls is None else torch.cat([cls[:, None].to(tokens.dtype), tokens], 1)  # (B, 1+h*w, D)


class TimmMap(MapBackbone):
    """A timm model without patch tokens (CNNs): its final feature map; pooled features are its own."""

    def encode(self, x):
        f = self.inner.forward_features(x)
        if f.ndim == 3:  # tokens without prefix (e.g. MLP-Mixer): a square grid
            side = int(f.shape[1] ** 0.5)
            return f.transpose(1, 2).reshape(len(f), f.shape[2], side, -1), None
        if getattr(self.inner, "output_fmt", "NCHW") == "NHWC":
            f = f.permute(0, 3, 1, 2)
        return f, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # timm's own global pool (and head norm, if the model has one)


class TeacherBackbone(MapBackbone):
    """A frozen teacher (urfm_fast.model.teacher): its map as tokens, pooled by its CLS (``global_pool``
    'token', ViT teachers) or the mean of the map. Always in eval mode, never trained."""

    def __init__(self, teacher: nn.Module, img_size: int, global_pool: str = "token"):
        self.global_pool = global_pool
        super().__init__(teacher, img_size)

    def encode(self, x):
        return self.inner.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        P = self.num_prefix_tokens
        return tokens[:, 0] if P and self.global_pool == "token" else tokens[:, P:].mean(1)

    def train(self, mode: bool = True) -> TeacherBackbone:
        return super().train(False)


def as_backbone(model: nn.Module, num_classes: int, img_size: int | None) -> nn.Module:
    """A timm model for ``Backbone.make``: as it is when fine-tuned (``num_classes`` > 0) or when its
    forward_features already gives [B, P + h*w, D] on ``patch_embed.grid_size`` (ViTs); else behind
    ``TimmMap`` (CNNs), built for ``img_size`` (default: the model's own). A ViT is set to ``img_size`` here
    (its position embeddings resampled); a CNN takes any size."""
    if img_size and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=img_size)
    if num_classes or (hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")):
        return model
    return TimmMap(model, img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]))

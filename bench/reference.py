"""The baseline to beat: a URFM training step written the way the MAE / MILAN code bases write it.

This is what a user would otherwise run, so it follows those code bases' habits on purpose:
    * student = MAE's ``MaskedAutoencoderViT`` structure built from timm ``Block``s and timm's
      ``PatchEmbed`` (current timm: its ``Attention`` uses SDPA where available, the default a
      user gets today);
    * masking = MAE's ``random_masking``: argsort of uniform noise, a second argsort for the
      inverse permutation, ``torch.gather`` with an index ``repeat``-ed over the channels;
    * decoder = ``torch.cat`` of ``mask_token.repeat(...)`` + gather un-shuffle + ``torch.cat`` of
      the CLS row, ``decoder_pred`` on every token, and a mask-weighted loss
      ``1 - F.cosine_similarity`` averaged over the masked tokens (MILAN's target is CLIP features);
    * teacher = timm ``vit_base_patch16_224`` (BiomedCLIP's trunk) under ``torch.no_grad``,
      patch tokens of ``forward_features``;
    * eager PyTorch, ``torch.autocast`` bf16 on GPU, ``loss.item()`` NaN guard every step (as MAE's
      ``train_one_epoch``), torch AdamW (default implementation, not fused) on timm's
      weight-decay groups, and timm's ``ModelEmaV2`` (a Python loop over the state dict).

Architecture, parameter names and FLOPs are those of ``urfm_fast.URFM`` (state dicts load into
each other; ``tests/test_bench_reference.py`` checks that both give the same loss). The only FLOP
difference: MAE's ``decoder_pred`` runs on all 1+N rows while ours predicts only the N-K masked
ones (0.03 GMAC per ViT-B image, 0.1 % of the step); rows report images/s and FLOP/s with the
same ``train_flops_per_image`` count for both, so TFLOP/s compare like images/s do.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import numpy as np
import timm
import timm.optim
import timm.utils
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, PatchEmbed

from urfm_fast.config import URFMConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE util/pos_embed: [M] positions -> [M, D] (sin half, cos half)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """MAE util/pos_embed.get_2d_sincos_pos_embed: meshgrid(w, h), first half from w."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid[0]), sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class ReferenceURFM(nn.Module):
    """MAE's MaskedAutoencoderViT with a feature-prediction head and cosine loss (MILAN / URFM)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=768,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        target_dim=768,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # noqa: B008 (MAE's signature)
    ):
        super().__init__()
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, target_dim, bias=True)  # decoder to teacher features
        self.initialize_weights()

    @classmethod
    def from_config(cls, cfg: URFMConfig) -> ReferenceURFM:
        return cls(
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
            cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.target_dim,
        )  # fmt: skip

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.pos_embed.shape[-1], grid, True)).float()[None])
        dec = sincos_2d(self.decoder_pos_embed.shape[-1], grid, True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec).float()[None])
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def random_masking(self, x, mask_ratio, noise=None):
        """x [N, L, D] -> visible tokens, binary mask [N, L] (1 = removed), ids_restore [N, L]."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # remove cls token

    def forward_loss(self, target, pred, mask):
        """target, pred [N, L, T]; mask [N, L], 1 = removed: mean of 1 - cos over removed patches."""
        loss = 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, target, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, T]
        loss = self.forward_loss(target, pred, mask)
        return loss, pred, mask


def build_teacher(img_size: int = 224) -> nn.Module:
    """BiomedCLIP's vision trunk as the MILAN-style code base builds it: a timm ViT-B/16, frozen."""
    teacher = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def normalize(x, mean, std):
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ReferenceStep:
    """One training iteration of MAE's ``train_one_epoch`` with the URFM target: call with images
    [B, 3, H, W] in [0, 1]; returns the loss as a Python float."""

    def __init__(
        self,
        cfg: URFMConfig,
        device: torch.device,
        amp_dtype: torch.dtype | None = torch.bfloat16,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        ema_decay: float = 0.9999,
    ):
        self.cfg = cfg
        self.device = device
        self.amp_dtype = amp_dtype
        self.model = ReferenceURFM.from_config(cfg).to(device)
        self.teacher = build_teacher(cfg.img_size).to(device)
        param_groups = timm.optim.param_groups_weight_decay(self.model, weight_decay)
        self.optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95))
        self.ema = timm.utils.ModelEmaV2(self.model, decay=ema_decay)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, images01: torch.Tensor) -> float:
        self.model.train()
        with torch.no_grad(), self.autocast():
            target = self.teacher.forward_features(normalize(images01, CLIP_MEAN, CLIP_STD))[:, 1:]
        samples = normalize(images01, IMAGENET_MEAN, IMAGENET_STD)
        with self.autocast():
            loss, _, _ = self.model(samples, target.float(), mask_ratio=self.cfg.mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"Loss is {loss_value}, stopping training")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.model)
        return loss_value

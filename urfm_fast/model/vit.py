"""Vision Transformer parts with timm's parameter names, running attention through ``urfm_fast.model.ops``.

The student encoder, the decoder and the BiomedCLIP teacher trunk are all built from these, so the
Triton kernels reach every model and state dicts load into timm ``vit_*_patch16_224`` unchanged
(LayerNorm eps 1e-6, qkv bias, exact GELU, as timm).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast.model import ops


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of patch {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """q_cls [B,H,1,Dh], k [B,H,L,Dh] -> the CLS query's attention over the patch keys, [B, L - prefix]:
    softmax(q k^T / sqrt(Dh)) averaged over heads, the ``prefix`` columns (CLS, registers) dropped and
    the rest renormalised to sum to 1. fp32; one query row, so it costs 1/L of the block's attention."""
    scores = (q_cls.float() @ k.float().transpose(-2, -1)) * q_cls.shape[-1] ** -0.5  # (B, H, 1, L)
    probs = scores.softmax(-1).mean(1)[:, 0, prefix:]  # (B, L - prefix)
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cls_attn: bool = False):
        """x [B,N,C] -> [B,N,C]; with ``cls_attn`` also the CLS row's attention over the rest, [B, N-1]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
        out = self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return (out, cls_attention(q[:, :, :1], k)) if cls_attn else out

    def forward_prompted(self, queries: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """queries [B,M,C] attend over prompts [B,P,C] and themselves -> [B,M,C] (MILAN's prompting decoder:
        the prompts give keys and values only, so their queries are never computed)."""
        B, M, C = queries.shape
        H, Dh = self.num_heads, C // self.num_heads
        q, kq, vq = self.qkv(queries).reshape(B, M, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, M, Dh)
        kv = F.linear(prompts, self.qkv.weight[C:], self.qkv.bias[C:])  # (B, P, 2C): k and v rows of qkv
        kp, vp = kv.reshape(B, -1, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, P, Dh)
        out = ops.attention(q, torch.cat([kp, kq], 2), torch.cat([vp, vq], 2))  # (B, H, M, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, M, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (for fine-tuning; pretraining uses p = 0)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, cls_attn: bool = False, prompts: torch.Tensor | None = None):
        """x [B,N,C] -> [B,N,C]; with ``cls_attn`` also the CLS attention map (``cls_attention``). With
        ``prompts`` [B,P,C] (the prompting decoder) only x is updated; the prompts are keys/values and come
        out unchanged. One entry point, so FSDP's and torch.compile's module hooks see every call."""
        if prompts is not None:
            a, probs = self.attn.forward_prompted(self.norm1(x), self.norm1(prompts)), None
        else:
            a = self.attn(self.norm1(x), cls_attn)
            a, probs = a if cls_attn else (a, None)
        x = x + drop_path(a, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return (x, probs) if cls_attn else x


def sincos_pos_embed_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, [(1 +) grid*grid, dim]; the CLS row is zeros.

    Half the channels encode the row (h) and half the column (w) coordinate, as in MAE's
    get_2d_sincos_pos_embed (which lists w first).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    hh, ww = torch.meshgrid(coords, coords, indexing="ij")  # (G, G)

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # (G*G, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (G*G, D/2)

    emb = torch.cat([embed_1d(ww), embed_1d(hh)], dim=1)  # (G*G, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Bicubic resize of a [1, 1+G*G, D] embedding (CLS row kept) to another square grid."""
    n_old = pos_embed.shape[1] - 1
    old = int(math.isqrt(n_old))
    if old * old != n_old:
        raise ValueError(f"position embedding with {n_old} patch rows is not a square grid")
    if old == grid_size:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()  # (1, D, G, G)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, D).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)


class ViTEncoder(nn.Module):
    """timm-compatible ViT trunk: ``cls_token``, ``pos_embed``, ``patch_embed``, ``blocks``, ``norm``.

    Its state dict loads strictly into ``timm.create_model('vit_*_patch16_224', num_classes=0)``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward_features(self, x: torch.Tensor, cls_attn: bool = False):
        """All tokens: [B,3,H,W] -> [B, 1+N, D] after the final LayerNorm (timm's forward_features); with
        ``cls_attn`` also the last block's CLS->patch attention [B, N], from the same forward."""
        grid = x.shape[-1] // self.patch_size
        if x.shape[-2] != x.shape[-1]:
            raise ValueError(f"square images expected, got {tuple(x.shape[-2:])}")
        pos = resample_pos_embed(self.pos_embed, grid)  # (1, 1+N, D)
        tokens = self.patch_embed(x) + pos[:, 1:]  # (B, N, D)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, tokens], dim=1)
        for blk in self.blocks[:-1] if cls_attn else self.blocks:
            x = blk(x)
        if not cls_attn:
            return self.norm(x)
        x, probs = self.blocks[-1](x, cls_attn=True)
        return self.norm(x), probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS feature after the final norm (timm's pooled output with num_classes=0)."""
        return self.forward_features(x)[:, 0]

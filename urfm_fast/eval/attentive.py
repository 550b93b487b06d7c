"""Attentive probe (V-JEPA / AIM style): frozen patch tokens -> one cross-attention block whose query is learned
-> LayerNorm -> linear head. Unlike pooling, the query can pick the patches that carry the label, wherever
they are; trained on cached tokens with the linear probe's schedule (epochs, minimum steps, warm-up + cosine)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast.eval.protocols import train_cached

LR, WEIGHT_DECAY, BATCH = 1e-3, 0.05, 256  # AdamW: attention weights do not train well with plain SGD


def head_count(dim: int) -> int:
    """The most heads (of 16, 12, 8, 6, 4, 3, 2) that leave at least 16 channels each; else one."""
    return next((h for h in (16, 12, 8, 6, 4, 3, 2) if dim % h == 0 and dim // h >= 16), 1)


class AttentiveHead(nn.Module):
    """tokens [B, N, D] -> logits [B, C]: LayerNorm on the tokens, a learned query attending over them
    (multi-head, softmax(q k^T / sqrt(hd)) v), output projection, LayerNorm, linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None):
        super().__init__()
        self.num_heads = num_heads or head_count(dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # the linear probe's init
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        H = self.num_heads
        x = self.norm_kv(tokens.float())
        q = self.q(self.query).reshape(1, H, 1, D // H).expand(B, -1, -1, -1)  # (B, H, 1, hd)
        k, v = self.kv(x).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, hd)
        o = self.proj(o.transpose(1, 2).reshape(B, D))  # (B, D)
        return self.fc(self.norm(o))


def attentive_probe(train_t, train_y, eval_t, num_classes, seed, *, epochs, min_steps) -> torch.Tensor:
    """Train AttentiveHead on cached tokens [N, P, D] (fp16 or fp32); returns probabilities on eval_t."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = AttentiveHead(train_t.shape[-1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    train_cached(opt, LR, len(train_t), BATCH, epochs, min_steps, g,
                 lambda idx: F.cross_entropy(head(train_t[idx]), train_y[idx]))
    head.eval()
    with torch.no_grad():
        return torch.cat([head(eval_t[i : i + BATCH]).softmax(-1) for i in range(0, len(eval_t), BATCH)])

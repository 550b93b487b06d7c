"""Softmax attention without a causal mask, for ViT token counts (1, 50, 197, 257 ...).

The torch reference is ``F.scaled_dot_product_attention``; ``attention_math_ref`` spells the
math out with an ``upcast`` flag so tests can build an fp32 ground truth.
"""

import math

import torch
import torch.nn.functional as F


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B,H,N,Dh] -> softmax(q k^T / sqrt(Dh)) v as [B,H,N,Dh]."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_math_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Explicit attention; with ``upcast`` computed in fp32 and cast back to q's dtype."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    return (scores.softmax(dim=-1) @ v).to(dtype)

"""Masked-token gather and the decoder's un-shuffle.

MAE-style masking keeps a fixed number K of the N patch tokens per image. The encoder input is
those K tokens (plus CLS) with their position embedding; the decoder input puts the encoder's
outputs back in image order with a shared ``mask_token`` at the masked positions, then adds the
decoder position embedding. The torch references below are what every CPU run executes and what
the kernels are tested against.
"""

import torch


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,N,D], idx [B,K] int64 -> x[b, idx[b,k]] as [B,K,D]. Backward scatter-adds."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_visible_ref(x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Encoder input. x [B,N,D] patch tokens, idx [B,K] visible ids, pos [1+N,D], cls [D] -> [B,1+K,D].

    out[:, 0] = cls + pos[0];  out[b, 1+k] = x[b, idx[b,k]] + pos[1 + idx[b,k]].
    """
    B = x.shape[0]
    vis = gather_tokens_ref(x + pos[1:], idx)  # (B, K, D)
    head = (cls + pos[0]).expand(B, 1, -1)  # (B, 1, D)
    return torch.cat([head, vis], dim=1)


def unshuffle_ref(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Decoder input. x [B,1+K,D] (CLS first), mask_token [D], ids_restore [B,N], pos [1+N,D] -> [B,1+N,D].

    out[:, 0] = x[:, 0] + pos[0]; for r = ids_restore[b,n]:
    out[b, 1+n] = (x[b, 1+r] if r < K else mask_token) + pos[1+n].
    """
    B, K1, D = x.shape
    N = ids_restore.shape[1]
    masked = mask_token.to(x.dtype).expand(B, N - (K1 - 1), D)  # (B, N-K, D)
    full = torch.cat([x[:, 1:], masked], dim=1)  # (B, N, D) in shuffled order
    full = gather_tokens_ref(full, ids_restore)  # (B, N, D) in image order
    return torch.cat([x[:, :1], full], dim=1) + pos.to(x.dtype)

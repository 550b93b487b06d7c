"""Mask generators with a fixed visible count per batch (static shapes for torch.compile).

Every generator returns ``ids_shuffle`` [B, N] int64, a permutation of the patch ids per image whose
first K entries are the visible patches and the rest the masked ones; ``split_ids`` derives the
index tensors the model gathers with. Nothing here uses boolean indexing.
"""

from __future__ import annotations

import math

import torch


def random_masking(
    batch: int,
    num_patches: int,
    device=None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's per-sample random masking: ascending argsort of uniform noise (low noise = visible).

    ``noise`` [B, N] may be given (e.g. derived from (seed, epoch, sample index) for runs that must
    not depend on the number of ranks); otherwise it is drawn from ``generator``.
    """
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise shape {tuple(noise.shape)} != {(batch, num_patches)}")
    return torch.argsort(noise, dim=1)


def block_masking(
    batch: int,
    grid_size: int,
    num_masked: int,
    device=None,
    generator: torch.Generator | None = None,
    num_blocks: int = 24,
    min_block: int = 16,
    aspect: float = 0.3,
) -> torch.Tensor:
    """BEiT-style block-wise masking, vectorised over the batch, with exactly ``num_masked`` masked.

    Each image draws ``num_blocks`` rectangles (area uniform in [min_block, num_masked / 2], log
    aspect ratio uniform in [log aspect, -log aspect]). A patch's score is the index of the first
    rectangle that covers it (uncovered patches score ``num_blocks``) plus uniform jitter; the
    ``num_masked`` lowest scores are masked. So patches are masked block by block in BEiT's order,
    the last block trimmed at random to hit the exact count.
    """
    N = grid_size * grid_size
    if not 0 <= num_masked < N:
        raise ValueError(f"num_masked must be in [0, {N}), got {num_masked}")

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=generator)

    max_block = max(min_block, num_masked / 2)
    area = min_block + rand(batch, num_blocks) * (max_block - min_block)  # (B, R)
    log_ratio = (2 * rand(batch, num_blocks) - 1) * math.log(1 / aspect)
    h = (area * log_ratio.exp()).sqrt().round().clamp(1, grid_size)  # (B, R)
    w = (area / log_ratio.exp()).sqrt().round().clamp(1, grid_size)
    top = (rand(batch, num_blocks) * (grid_size - h + 1)).floor()
    left = (rand(batch, num_blocks) * (grid_size - w + 1)).floor()

    coords = torch.arange(grid_size, device=device, dtype=torch.float32)
    rows = (coords >= top[..., None]) & (coords < (top + h)[..., None])  # (B, R, G)
    cols = (coords >= left[..., None]) & (coords < (left + w)[..., None])  # (B, R, G)
    covered = (rows[..., :, None] & cols[..., None, :]).reshape(batch, num_blocks, N)  # (B, R, N)
    # First covering block per patch; argmax on a bool tensor returns the first True.
    first = torch.where(covered.any(1), covered.to(torch.uint8).argmax(1), num_blocks).float()  # (B, N)
    score = first + rand(batch, N)
    order = torch.argsort(score, dim=1)  # masked first
    return order.flip(1)  # visible first


def attention_masking(
    keep_prob: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """MILAN's semantic-aware masking: visible patches sampled without replacement, in proportion to
    ``keep_prob`` [B, N] (the teacher's CLS->patch attention, or a CNN teacher's saliency).

    Gumbel-top-k: adding Gumbel noise to log-probabilities and sorting in descending order draws the
    whole permutation as successive draws without replacement (the law of ``torch.multinomial(p, N)``,
    which MILAN calls), but vectorised and with the same kernels as ``random_masking``; the first K
    entries are the visible ones whatever K is, so every image keeps exactly ``num_visible``. Sampling,
    not arg-max: a low-attention patch is still visible now and then, and the masks vary per epoch.
    ``noise`` [B, N] uniform in [0, 1) may be given (``--deterministic``), else drawn from ``generator``.
    """
    if keep_prob.ndim != 2:
        raise ValueError(f"keep_prob must be [B, N], got {tuple(keep_prob.shape)}")
    if noise is None:
        noise = torch.rand(keep_prob.shape, device=keep_prob.device, generator=generator)
    elif noise.shape != keep_prob.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != {tuple(keep_prob.shape)}")
    tiny = torch.finfo(torch.float32).tiny
    # clamp: a zero probability gets a very low score (sorted last), never -inf - a NaN in argsort
    log_p = keep_prob.float().clamp_min(tiny).log()
    gumbel = -(-noise.float().clamp(tiny, 1.0 - 1e-7).log()).log()  # (B, N)
    return torch.argsort(log_p + gumbel, dim=1, descending=True)  # visible first


def split_ids(ids_shuffle: torch.Tensor, num_visible: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids_shuffle [B,N] -> ids_keep [B,K], ids_mask [B,N-K], ids_restore [B,N] (inverse permutation)."""
    B, N = ids_shuffle.shape
    ids_restore = torch.empty_like(ids_shuffle)
    # Scatter of arange inverts the permutation in O(N) (MAE uses a second argsort).
    ids_restore.scatter_(1, ids_shuffle, torch.arange(N, device=ids_shuffle.device).expand(B, N))
    return ids_shuffle[:, :num_visible], ids_shuffle[:, num_visible:], ids_restore


def mask_from_ids(ids_shuffle: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Binary mask [B,N] in image order, 1 = masked (MAE's convention), for plots and tests."""
    mask = torch.ones(ids_shuffle.shape, device=ids_shuffle.device)
    mask[:, :num_visible] = 0
    _, _, ids_restore = split_ids(ids_shuffle, num_visible)
    return torch.gather(mask, 1, ids_restore)

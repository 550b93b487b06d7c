"""Several shard folders read as one weighted stream (``pretrain --data A B C --data-weights ...``).

The order of every epoch is a pure function of (seed, epoch, sizes, weights), so every rank computes
the same global batches and takes its own slice of each (as for one folder): the loss curve does
not depend on the number of ranks for the same global batch, and a resumed run continues exactly.

- **Which folder** a position of the stream draws from: position t (counted over the whole run,
  t = epoch * samples_per_epoch + position in the epoch) takes the folder whose cumulative-weight
  interval holds x_t = frac(t * golden ratio + phase(seed)), computed in 64-bit fixed point (a Weyl
  sequence). Its points spread evenly, so every stretch of the run, however short, holds each folder
  in its weight's share up to a few samples (not merely on average, as independent draws would).
- **Which image**: the j-th draw of folder k in epoch e is entry perm[j mod n_k] of a permutation of
  that folder seeded by (seed, e, k, j div n_k): a folder drawn less often than its size sees a
  different random subset each epoch; one drawn more often is gone through whole, then again in a
  new order.
- **An epoch** is one pass of the weighted stream as long as all folders together (the sum of their
  sizes, cut to whole global batches): epoch-based settings (``--epochs``, ``--warmup-epochs``) keep
  their meaning in images seen, whatever the weights.

A draw is named by a key, unique within its epoch: ``pass * total + offset of the folder + entry``;
the stream hands keys on as sample indices, so the crop and mask seeds of two draws of one image in
one epoch differ.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from urfm_fast.data.augment import mix_seed

GOLDEN64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: the Weyl step
_TWO64 = float(2**64)


def resolve_weights(spec, sizes):
    """--data-weights -> float64 [K] summing to 1. spec: None (proportional to the sizes), "equal", or
    a sequence of K non-negative numbers, not all zero (checked in train.checks for the command line)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if spec is None:
        w = sizes
    elif spec == "equal":
        w = np.ones_like(sizes)
    else:
        w = np.asarray(spec, dtype=np.float64)
    if w.shape != sizes.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {list(spec) if spec is not None else None} do not fit {len(sizes)} folders")
    return w / w.sum()


def folder_of_positions(t, weights, seed):
    """int64 [len(t)] folder of each run position t (int64 [..]): the Weyl sequence of the module doc."""
    phase = np.uint64(int(mix_seed(seed, 0x3171)) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):  # wrap-around modulo 2^64 is the point
        x = np.asarray(t, dtype=np.uint64) * np.uint64(GOLDEN64) + phase
    bounds = np.cumsum(weights)[:-1] * _TWO64  # the last folder takes the rest of [0, 2^64)
    edges = np.array([min(int(b), 2**64 - 1) for b in bounds], dtype=np.uint64)
    return np.searchsorted(edges, x, side="right").astype(np.int64)


def _folder_permutation(n, seed, epoch, k, q):
    g = torch.Generator().manual_seed(int(mix_seed(seed, epoch, k, q, 0x4D1)) & 0x7FFFFFFFFFFFFFFF)
    return torch.randperm(n, generator=g).numpy()


def mixture_order(sizes, weights, seed, epoch, length):
    """The global order of epoch `epoch`: int64 [length] draw keys (see the module doc)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    folder = folder_of_positions(epoch * length + np.arange(length, dtype=np.int64), weights, seed)
    keys = np.empty(length, dtype=np.int64)
    for k, n in enumerate(sizes.tolist()):
        pos = np.flatnonzero(folder == k)  # this folder's positions, in order: its draws 0, 1, ...
        for q in range(-(-len(pos) // n) if n else 0):  # pass q over the folder: draws q*n .. q*n+n-1
            idx = pos[q * n:(q + 1) * n]
            keys[idx] = q * total + offsets[k] + _folder_permutation(n, seed, epoch, k, q)[:len(idx)]
    return keys


class MixtureDataset(Dataset):
    """Datasets (shard folders) read as one: item `key` = entry (key mod total) of the concatenation;
    item = uint8 [1,H,W]. `weights` [K] are the folders' shares of the stream (resolve_weights)."""

    def __init__(self, parts, weights=None, names=None):
        self.parts = list(parts)
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.total = int(self.offsets[-1])
        self.weights = resolve_weights(weights, self.sizes)
        self.names = list(names) if names is not None else [str(k) for k in range(len(self.parts))]

    def __len__(self):
        return self.total

    def folder_of(self, keys):
        """int64 [..] folder of each draw key."""
        return np.searchsorted(self.offsets, np.asarray(keys, dtype=np.int64) % self.total, side="right") - 1

    def __getitem__(self, key):
        g = int(key) % self.total
        k = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self.parts[k][g - int(self.offsets[k])]

    def order(self, seed, epoch, length):
        return mixture_order(self.sizes, self.weights, seed, epoch, length)

"""``--cache-targets``: each image's teacher targets computed once, at its first batch, and read back in the
later epochs. Only for ``--augment none``, where image ``i`` is the same pixels every epoch, so a cached
target equals the one the teacher would compute again, up to the summation order of a differently composed
batch (the frozen teacher runs in eval mode: nothing in it depends on the other images of a batch). What a
small fixed image set (a study, a few thousand images for many epochs) spends on its teacher drops to one
forward per image; a large archive, seen about once, gains nothing and should not cache."""

from __future__ import annotations

import torch


class TargetCache:
    """The teacher's outputs (patch targets, and CLS / saliency where the recipe asks for them) per image
    index, on the training device; allocated at the first batch, once the outputs' shapes are known."""

    def __init__(self, num_images: int, device: torch.device):
        self.num_images, self.device = num_images, device
        self.store: tuple[torch.Tensor | None, ...] | None = None
        self.filled = torch.zeros(num_images, dtype=torch.bool, device=device)

    def __call__(self, compute, images01: torch.Tensor, index: torch.Tensor) -> tuple:
        """``compute(images01) -> (tokens, cls, saliency)`` for the images not seen yet; -> the batch's."""
        idx = index.to(self.device)
        miss = ~self.filled[idx]
        if bool(miss.any()):  # a host sync per step; after the first epoch nothing is computed
            new = idx[miss]
            fresh = compute(images01[miss])
            if self.store is None:
                self.store = tuple(None if t is None else torch.empty((self.num_images, *t.shape[1:]), dtype=t.dtype,
                                                                      device=self.device) for t in fresh)
            for buf, t in zip(self.store, fresh):
                if buf is not None:
                    buf[new] = t
            self.filled[new] = True
        return tuple(None if buf is None else buf[idx] for buf in self.store)

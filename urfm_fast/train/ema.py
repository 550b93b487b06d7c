"""Exponential moving average of the student, stored in checkpoints as ``ema_state_dict``.

The shadow copy has the student's parameter names and lives on the student's device in fp32. Under
FSDP2 each shadow tensor is a DTensor with the parameter's sharding, so every rank averages only
its own shard (no communication) and DCP reshards the EMA like any other state on resume.
The update is one ``torch._foreach_lerp_`` over all tensors: ``ema += (1 - d) * (p - ema)``.

Warm-up (timm's ModelEmaV3): after ``n`` updates the decay is ``d = min(decay, (1 + n) / (10 + n))``, so
the EMA follows the student closely early on (an EMA of 0.9999 without warm-up is still 99.4 % its
initial weights after 60 steps) and reaches ``decay`` after about ``10 / (1 - decay)`` updates. The count
``num_updates`` (skipped steps excluded) is saved with every checkpoint and restored on resume;
``checkpoints.formats.trustworthy(n, decay)`` tells loaders whether an EMA has averaged long enough to prefer it.
The local tensors it works on are looked up once (after FSDP2's lazy initialisation, which may
re-pad them: at the first update) and again after ``load_state_dict`` or ``refresh()``; FSDP2
updates sharded parameters in place, so the same local tensors stay valid between steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from urfm_fast.checkpoints.formats import clean_name


def _local(t: torch.Tensor) -> torch.Tensor:
    # The shard itself (what to_local() returns without autograd), so in-place ops on it update the DTensor.
    return t._local_tensor if isinstance(t, DTensor) else t


def warmup_decay(decay: float, updates: int | torch.Tensor, warmup: bool = True):
    """The decay of the next update after ``updates`` updates (a tensor in, a tensor out)."""
    if not warmup:
        return decay
    if isinstance(updates, torch.Tensor):
        return ((1.0 + updates) / (10.0 + updates)).clamp(max=decay)
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA:
    """EMA of a module's parameters: ``update(model)`` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = [clean_name(n) for n, _ in model.named_parameters()]
        with torch.no_grad():
            self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self._cache: tuple | None = None  # (model, local parameter tensors, local shadow tensors)
        # Updates so far: a Python int, or a device tensor once a device-side skip was used (no host sync
        # in the step; read back only when a checkpoint is written).
        self._updates: int | torch.Tensor = 0

    @property
    def num_updates(self) -> int:
        return int(self._updates)

    @num_updates.setter
    def num_updates(self, n: int) -> None:
        if isinstance(self._updates, torch.Tensor):
            self._updates.fill_(int(n))
        else:
            self._updates = int(n)

    def refresh(self) -> None:
        """Look the local tensors up again at the next update (after the model's tensors were replaced)."""
        self._cache = None

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._cache is None or self._cache[0] is not model:
            params = [_local(p) for p in model.parameters()]
            if len(params) != len(self.shadow):
                raise ValueError(f"EMA of {len(self.shadow)} tensors updated from a model with {len(params)}")
            self._cache = (model, params, [_local(s) for s in self.shadow])
        return self._cache[1], self._cache[2]

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """One EMA step. ``skip``: a bool tensor on the device; where true, the shadow stays exactly as
        it is (a step whose update was skipped), decided on the device without a host sync."""
        params, shadow = self._tensors(model)
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        if skip is None and not isinstance(self._updates, torch.Tensor):
            torch._foreach_lerp_(shadow, params, 1.0 - warmup_decay(self.decay, self._updates, self.warmup))
            self._updates += 1
            return
        if skip is None:
            skip = torch.zeros((), dtype=torch.bool, device=self._updates.device)
        if not isinstance(self._updates, torch.Tensor):
            self._updates = torch.tensor(float(self._updates), device=skip.device)
        # ema += w * (p - ema) with w = 0 on a skipped step: adds exact zeros (the parameters were not
        # updated, so p - ema is finite). Three multi-tensor passes; a lerp with a tensor weight has no
        # multi-tensor kernel and would launch one kernel per parameter.
        decay = warmup_decay(self.decay, self._updates, self.warmup)
        weight = torch.where(skip, 0.0, 1.0 - torch.as_tensor(decay, device=skip.device)).to(torch.float32)
        delta = torch._foreach_sub(params, shadow)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(shadow, delta)
        self._updates.add_((~skip).float())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> tensor (DTensor shards under FSDP2); the form DCP saves and loads in place."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"EMA state is missing {missing[:5]}")
        for name, s in zip(self.names, self.shadow):
            src = sd[name]
            if src is s:  # DCP loaded in place
                continue
            if isinstance(s, DTensor) and not isinstance(src, DTensor):
                # A full tensor (e.g. from a .pth): keep only this rank's shard of it.
                src = distribute_tensor(src.to(s.device, torch.float32), s.device_mesh, s.placements)
            s.copy_(src)
        self.refresh()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copy (a collective under FSDP2: every rank must call it)."""
        out = {}
        for name, s in zip(self.names, self.shadow):
            t = s.full_tensor() if isinstance(s, DTensor) else s
            out[name] = t.detach().cpu().clone()
        return out

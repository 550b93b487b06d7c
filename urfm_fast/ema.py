"""Exponential moving average of the student, stored in checkpoints as ``ema_state_dict``.

The shadow copy has the student's parameter names and lives on the student's device in fp32. Under
FSDP2 each shadow tensor is a DTensor with the parameter's sharding, so every rank averages only
its own shard (no communication) and DCP reshards the EMA like any other state on resume.
The update is one ``torch._foreach_lerp_`` over all tensors: ``ema += (1 - decay) * (p - ema)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

try:  # DTensor moved out of _tensor in torch 2.4; both spellings exist in 2.4+
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()

# Wrappers that add a path component to parameter names but not to the saved keys.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    # to_local() is a view of the shard, so in-place ops on it update the DTensor.
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """EMA of a module's parameters: ``update(model)`` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [clean_name(n) for n, _ in model.named_parameters()]
        with torch.no_grad():
            self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [_local(p.detach()) for p in model.parameters()]
        shadow = [_local(s) for s in self.shadow]
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

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
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(s.device, torch.float32), s.device_mesh, s.placements)
            s.copy_(src)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copy (a collective under FSDP2: every rank must call it)."""
        out = {}
        for name, s in zip(self.names, self.shadow):
            t = s.full_tensor() if isinstance(s, DTensor) else s
            out[name] = t.detach().cpu().clone()
        return out

"""Activation checkpointing, then torch.compile, then FSDP2 ``fully_shard`` or DDP: torchtitan's order.

Each block is changed in place, so parameter names stay those of the URFM layout (a wrapper module
would add a path component to every checkpoint key).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from urfm_fast.model import ops
from urfm_fast.model.urfm import URFM
from urfm_fast.train.plan import RunPlan


def checkpoint_block(blk: torch.nn.Module) -> None:
    """Activation checkpointing by replacing the block's forward in place."""
    from torch.utils.checkpoint import checkpoint

    inner = blk.forward
    blk.forward = lambda x: checkpoint(inner, x, use_reentrant=False)


def _fully_shard(student: URFM, blocks: list[torch.nn.Module], plan: RunPlan) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if plan.bf16 else None
    kw = dict(reshard_after_forward=plan.shard == "full")
    if mp:
        kw["mp_policy"] = mp
    for blk in blocks:
        fully_shard(blk, **kw)
    if mp:  # the root casts nothing: images are cast by hand, the teacher targets stay fp32
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False)
    fully_shard(student, **kw)
    # FSDP2 warns that the root returns views (pred); we never modify outputs in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def parallelize(student: URFM, teacher, plan: RunPlan, device: torch.device):
    """-> (the module the loop calls, the autocast context of its forward)."""
    blocks = list(student.blocks) + list(student.decoder_blocks)
    if plan.train.ac:
        for blk in blocks:
            checkpoint_block(blk)
    if plan.compile:
        ops.get_backend()  # logs the kernel backend here, not from inside a compiled block
        # dynamic=False: encoder, decoder and teacher blocks share Block.forward at different token
        # counts; each count gets its own static graph instead of one symbolic-shape graph.
        for blk in blocks:
            blk.compile(dynamic=False)  # in place: parameter names stay those of the URFM layout
        teacher.compile_blocks()
    model = student
    if plan.mode == "fsdp":
        _fully_shard(student, blocks, plan)
    elif plan.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if plan.bf16 and plan.mode != "fsdp"
                else contextlib.nullcontext())
    return model, autocast

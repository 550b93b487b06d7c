"""Process groups and the few collectives the trainer issues itself; what a failed collective means.

Under torchrun a process group exists (even with one rank); the device is chosen here once.
"""

from __future__ import annotations

import datetime
import os
import sys
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist

from urfm_fast.train.config import TrainConfig, UsageError, cuda_wanted


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # launched by torchrun (a process group exists, even with one rank)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: TrainConfig) -> Dist:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
    use_cuda = cuda_wanted(cfg.device)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    d = Dist(rank, world, local_rank, device, enabled="RANK" in os.environ)
    if d.enabled:
        # A hung rank makes the others fail after --timeout instead of waiting forever (a dead one at
        # once: see fail_fast).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=cfg.timeout),
            device_id=device if use_cuda else None,
        )
        if not use_cuda:
            # torchrun sets OMP_NUM_THREADS=1; share the cores between the local ranks instead.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return d


def default_workers() -> int:
    """8 DataLoader workers per rank, but never more than this rank's share of the CPU cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled and d.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


def broadcast_obj(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# =============================================================================================
# Helpers of the loop: schedule, faults, signals, logging

def is_collective_failure(e: BaseException) -> bool:
    """A collective that failed because a peer is gone or stuck (gloo and NCCL raise RuntimeError or
    DistBackendError; the message names the transport or the timeout)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out"))


def fail_fast(rank: int, e: BaseException, where: str, advice: str = "") -> typing.NoReturn:
    """A peer died or hung: say so and leave at once.

    What bounds the time a job with a dead rank takes to end (measured with gloo on CPU, see
    tests/test_distributed.py::test_a_dead_rank_fails_fast):
    - a rank that exits (crash, ``os._exit``, OOM killer) closes its sockets, and gloo's pending
      send/recv on the others fail at once with "Connection closed by peer";
    - a rank that hangs while alive: gloo ops honour the process-group timeout (``--timeout``, set in
      ``init_process_group``; "Timed out waiting ...ms"), and NCCL's watchdog aborts the communicator
      after the same timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``);
    - torchrun's agent polls its workers every 0.1 s and, on the first failure (no ``--max-restarts``),
      SIGTERMs the other local workers and SIGKILLs them 30 s later: the backstop on one node. Workers
      on other nodes see the closed connection or the timeout above, and their agents do the same.
    We exit with ``os._exit``: a normal interpreter exit would destroy the process group and join the
    background checkpoint writer, and either may wait on the dead peer.
    """
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    report(f"error: a collective failed {where} ({type(e).__name__}: {first}). Another rank died or hung "
            f"(the launcher's log names it); stopping instead of waiting. {advice}".rstrip(), rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def gloo_group(timeout_min: float):
    """A CPU process group of its own (flags, the background checkpoint writer)."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_min))


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def report(msg: str, rank: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0 or world > 1:
        print(msg if world == 1 else f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


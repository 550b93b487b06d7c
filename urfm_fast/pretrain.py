"""URFM pretraining: a ViT student predicts frozen BiomedCLIP patch features of the masked patches.

One file, read top to bottom in torchtitan's order: config, distributed init, data, teacher, student,
checkpointing, compile, sharding, optimizer, loop.

    # a demo on built-in synthetic ultrasound (tiny model on CPU, ViT-B for a short while on a GPU)
    python -m urfm_fast.pretrain
    # a real run: the full recipe on a folder of images (or a shard folder from urfm_fast.prepare)
    python -m urfm_fast.pretrain --data /path/to/images --teacher /path/to/open_clip_pytorch_model.bin
    # one node, 8 GPUs (FSDP2 + bf16 + per-block torch.compile)
    torchrun --nproc_per_node 8 -m urfm_fast.pretrain --data /data/us_shards --teacher ...
    # continue a stopped or preempted run exactly where it stopped
    python -m urfm_fast.pretrain --out runs/<name> --resume

Logged per step: loss, lr, grad norm, images/s, MFU (GPU), peak memory; ``metrics.jsonl`` and the
resolved ``config.json`` live in ``--out``; resumable DCP checkpoints in ``--out/checkpoints`` (written
in the background while training goes on, renamed into place only when complete); a URFM-format
``checkpoint-XXXXXXXX.pth`` at the end, on preemption and every ``--pth-every`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from urfm_fast import checkpoint as ckpt
from urfm_fast import checkpoint_io, ops
from urfm_fast.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from urfm_fast.cli_checks import OneLineParser
from urfm_fast.config import VIT_PRESETS, URFMConfig
from urfm_fast.data import DataError, ImageFolderDataset, build_train_stream
from urfm_fast.ema import EMA
from urfm_fast.kernel_check import Shapes, verify_or_fall_back
from urfm_fast.model import URFM
from urfm_fast.safe_load import UntrustedCheckpoint, checkpoint_errors, dcp_cause, one_line
from urfm_fast.teacher import HF_HUB_ID, TEACHER_HELP, BiomedCLIPTeacher, TeacherUnavailable, load_teacher
from urfm_fast.train_checks import check_train_config, train_warnings

log = logging.getLogger("urfm_fast.pretrain")


# =============================================================================================
# Config: one dataclass; the CLI is derived from it (every field is a --flag with its help text)


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _f("vit_base", "student size", choices=sorted(VIT_PRESETS))
    img_size: int = _f(224, "training image size (pixels, multiple of 16)")
    depth: int | None = _f(None, "override the encoder depth of --model (small CPU runs)")
    decoder_dim: int = _f(768, "decoder width (URFM: 768)")
    decoder_depth: int = _f(8, "decoder blocks (URFM: 8)")
    decoder_heads: int = _f(16, "decoder attention heads")
    mask_ratio: float = _f(0.75, "fraction of patches masked")
    mask_type: str = _f("random", "masking generator", choices=["random", "block"])
    # teacher
    teacher: str = _f(HF_HUB_ID, TEACHER_HELP)
    target: str = _f("tokens", "teacher target: final-LN patch tokens (768-d) or projected (512-d)",
                     choices=["tokens", "proj"])
    # data
    data: str | None = _f(None, "folder of PNG/JPEG/BMP/TIFF (recursive) or a shard folder; 'synthetic' for the "
                                "built-in data; without it the run is a short demo on synthetic data")
    num_workers: int | None = _f(None, "DataLoader workers per rank (default: 8, at most the CPU cores per rank)")
    synthetic_images: int = _f(8192, "number of distinct images of the synthetic data set")
    # schedule and optimizer
    batch_size: int = _f(256, "global batch size (all ranks, all accumulation steps)")
    micro_batch: int = _f(0, "per-rank micro-batch; < global/ranks means gradient accumulation (0 = no accumulation)")
    steps: int = _f(0, "optimizer steps to train (0 = use --epochs)")
    epochs: int = _f(400, "epochs to train when --steps is 0")
    lr: float | None = _f(None, "absolute learning rate (default: --blr * batch_size / 256)")
    blr: float = _f(1.5e-4, "base learning rate for a batch of 256")
    min_lr: float = _f(0.0, "final learning rate of the cosine schedule")
    warmup_epochs: float = _f(40.0, "linear warm-up length in epochs")
    warmup_steps: int | None = _f(None, "linear warm-up length in steps (overrides --warmup-epochs)")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases, norms, tokens, position embeddings)")
    clip_grad: float = _f(3.0, "clip the global gradient norm to this (0 = no clipping, norm still logged)")
    ema_decay: float = _f(0.9999, "decay of the EMA of the student saved as ema_state_dict")
    ema_warmup: bool = _f(True, "warm the EMA decay up as min(decay, (1+n)/(10+n)) after n updates (timm's "
                                "ModelEmaV3); the count is saved in checkpoints")
    # run
    out: str | None = _f(None, "output folder (default ./runs/<timestamp>); never overwritten without --resume")
    seed: int = _f(0, "random seed (model init, data order, masking)")
    deterministic: bool = _f(False, "per-sample randomness from (seed, epoch, index): the loss curve does not "
                                    "depend on the number of ranks for the same global batch")
    log_every: int = _f(10, "log to the console and metrics.jsonl every N steps")
    save_every: int = _f(1000, "resumable checkpoint every N steps (0 = only at the end / on preemption)")
    keep: int = _f(3, "resumable checkpoints kept (newest)")
    async_save: bool = _f(True, "write periodic checkpoints in the background while training goes on "
                                "(DCP async_save; synchronous where this torch lacks it)")
    pth_every: int = _f(0, "a URFM-format checkpoint-XXXXXXXX.pth (model, ema_state_dict, optimizer, epoch, step, "
                           "args) is written at the end of the run and on preemption; on request, also every "
                           "N steps (0 = only then)")
    resume: str | None = _f(None, "continue a run: bare --resume = latest checkpoint in --out, or a checkpoint "
                                  "folder / run folder / .pth", nargs="?", const="latest")
    init: str | None = _f(None, "start from the weights of a URFM checkpoint (official or ours; weights only)")
    max_bad_steps: int = _f(10, "stop after this many consecutive steps with NaN/Inf loss or gradients")
    # performance and distribution
    device: str = _f("auto", "auto | cpu | cuda")
    dist: str = _f("fsdp", "data parallelism across ranks: FSDP2 fully_shard or DDP", choices=["fsdp", "ddp"])
    shard: str = _f("auto", "FSDP2: full = reshard after forward (least memory); grad = keep parameters "
                            "gathered until backward (DDP-like traffic, faster when the model fits); auto = "
                            "grad up to ViT-B, full above", choices=["auto", "full", "grad"])
    compile: bool | None = _f(None, "torch.compile each block and the teacher (default: on for CUDA)")
    ac: bool = _f(False, "activation checkpointing of every block (less memory, ~30%% more compute)")
    precision: str = _f("auto", "bf16 mixed precision (params bf16, reductions fp32) or fp32; auto = bf16 on CUDA. "
                                "fp32 on CUDA runs matmuls in TF32 (torch.set_float32_matmul_precision('high'))",
                        choices=["auto", "bf16", "fp32"])
    timeout: float = _f(10.0, "minutes a collective may wait before the run fails (a dead rank)")


# Demo presets: applied when --data is not given, before the flags the user did give.
DEMO_CPU = dict(model="vit_tiny", depth=4, img_size=64, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                batch_size=32, steps=60, lr=1e-3, warmup_steps=5, log_every=10, save_every=30, num_workers=0,
                synthetic_images=960)
DEMO_GPU = dict(model="vit_base", img_size=224, batch_size=256, steps=300, warmup_steps=30, log_every=10,
                save_every=100, num_workers=4, synthetic_images=8192, lr=1e-3)


class UsageError(ValueError):
    """A bad flag combination; printed as one line."""


class Stop(Exception):
    """End the run early with a message and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _hint_type(hint):
    """int | None -> (int, optional)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m urfm_fast.pretrain",
        description="URFM pretraining (masked ViT predicting BiomedCLIP features). Without --data: a short demo "
        "on synthetic ultrasound. Under torchrun: FSDP2/DDP across ranks.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given (demo presets fill the rest)
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        typ, _ = _hint_type(hints[f.name])
        meta = dict(f.metadata)
        help_ = meta.pop("help") + f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            metavar = "{" + ",".join(meta["choices"]) + "}" if "choices" in meta else f.name.upper()
            p.add_argument(flag, type=typ, help=help_, metavar=metavar, **meta)
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, dict, bool]:
    """-> (resolved config, the flags given, demo?)."""
    given = vars(build_parser().parse_args(argv))
    saved = _saved_train_config(given["resume"], given.get("out")) if given.get("resume") else None
    if saved:  # continue with the run's own settings; flags given now override them
        demo = saved.pop("_demo")
        base = saved
        given.setdefault("out", saved.get("out"))
    else:
        demo = "data" not in given
        base = dict(DEMO_GPU if _cuda_wanted(given) else DEMO_CPU) if demo else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in {**base, **given}.items() if k in names})
    check_train_config(cfg)  # every value in range before anything is built (train_checks.py)
    if int(os.environ.get("RANK", 0)) == 0:
        for line in train_warnings(cfg):
            print(line, file=sys.stderr, flush=True)
    return cfg, given, demo


def _cuda_wanted(given: dict) -> bool:
    return given.get("device", "auto") != "cpu" and torch.cuda.is_available()


def _saved_train_config(resume: str, out: str | None) -> dict | None:
    """The train config stored by the run being resumed (config.json of the run or the checkpoint)."""
    places = []
    if resume != "latest":
        p = Path(resume).expanduser()
        places += [p if p.is_dir() else p.parent, p.parent, p.parent.parent]
    if out:
        places.append(Path(out).expanduser())
    for place in places:
        f = place / ckpt.CONFIG_FILE
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if d.get("kind") == ckpt.RUN_KIND:
            return dict(d["train"], _demo=d.get("demo", False))
    return None


# =============================================================================================
# Distributed init


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
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible")
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


def _default_workers() -> int:
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


def lr_at(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then half-cosine to min_lr (MAE's schedule, per step). Stateless in ``step``,
    so a resumed run gets the same rates without saving a scheduler."""
    if step < warmup:
        return base_lr * (step + 1) / warmup  # +1: the very first update is not wasted at lr 0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_faults(spec: str) -> dict[str, set[int]]:
    """Test hook ``URFM_FAULTS="nan@3-9,sigterm@5,die@7,slowsave@4"``: inject a NaN loss at steps 3..9,
    a SIGTERM to rank 0 after step 5, the last rank exiting abruptly (``os._exit(1)``, as a segfault
    or the OOM killer would) at the start of step 7, and a checkpoint of step 4 whose background
    write takes 2 s longer (a slow file system), so the fault paths run exactly as in production.
    ``hang@N``: at step N the process SIGTERMs itself and then never finishes the step (a stuck loader
    or collective): the stop watchdog must end it within ``URFM_STOP_GRACE_S``."""
    faults: dict[str, set[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rng = item.partition("@")
        lo, _, hi = rng.partition("-")
        faults.setdefault(kind, set()).update(range(int(lo), int(hi or lo) + 1))
    return faults


def _slow_planner(seconds: float):
    """DCP's own save planner, delayed: it runs in the writer thread of an async save."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class SlowPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            time.sleep(seconds)
            return super().create_local_plan()

    return SlowPlanner()


_signal_received: int = 0

# Where a step with a NaN/Inf gradient norm is skipped. On the device (default on CUDA): fused AdamW
# skips the update through its ``found_inf`` input (undoing its step count) and the EMA blends with
# weight 0, so nothing waits for the GPU; the host reads the norm from a non-blocking copy one step
# later, or at the next log, save or stop, and keeps the counts (skipped, in a row, stop after
# --max-bad-steps) exactly as the host-side check does. On CPU a sync costs nothing and the check
# stays on the host; tests set this to True to run the device path on CPU.
_DEVICE_SIDE_SKIP: bool | None = None


def _on_signal(signum, frame):  # preemption notice: finish the step, save, exit 0
    global _signal_received
    if _signal_received:  # a second notice: the user or the scheduler insists
        _hard_stop(signum, "a second time")
    _signal_received = signum
    _STOP_WATCHDOG.arm(signum)


def _hard_stop(signum: int, why: str) -> typing.NoReturn:
    """Leave now, without a final checkpoint: the loop could not reach a step boundary in time."""
    where = f"; the last complete checkpoint is {_STOP_WATCHDOG.last_good}" if _STOP_WATCHDOG.last_good else ""
    _report(f"error: {signal.Signals(signum).name} received {why}; exiting at once without a final "
            f"checkpoint{where}", int(os.environ.get("RANK", 0)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


class _StopWatchdog:
    """Bounds the time from a preemption signal to the end of the run. The loop acts on the signal at
    a step boundary (every step on one rank, at log steps on several: ``noticed``); while it gets
    there, every finished step restarts the clock (``step_done``). When no step finishes within
    ``URFM_STOP_GRACE_S`` seconds (default 120: a stuck data loader, a hung collective), the process
    exits from this thread. A second signal exits at once."""

    def __init__(self):
        self.timer = None
        self.signum = 0
        self.last_good = None

    def arm(self, signum: int) -> None:
        import threading

        grace = float(os.environ.get("URFM_STOP_GRACE_S", 120))
        self.signum = signum
        self.timer = threading.Timer(grace, _hard_stop, (signum, f"and no step finished within {grace:g}s"))
        self.timer.daemon = True
        self.timer.start()

    def step_done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.arm(self.signum)

    def noticed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_STOP_WATCHDOG = _StopWatchdog()


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
    _report(f"error: a collective failed {where} ({type(e).__name__}: {first}). Another rank died or hung "
            f"(the launcher's log names it); stopping instead of waiting. {advice}".rstrip(), rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def oom_message(d: Dist, micro: int, accum: int) -> str:
    free, total = torch.cuda.mem_get_info(d.device)
    return (
        f"CUDA out of memory on rank {d.rank} with a per-rank micro-batch of {micro} (x{accum} accumulation): "
        f"peak allocated {torch.cuda.max_memory_allocated(d.device) / 2**30:.1f} GiB, reserved "
        f"{torch.cuda.memory_reserved(d.device) / 2**30:.1f} GiB, free {free / 2**30:.1f} of {total / 2**30:.1f} GiB. "
        "Try --ac (activation checkpointing), a smaller --micro-batch (same global --batch-size through "
        "gradient accumulation), or --shard full. No checkpoint was written for the failed step."
    )


# =============================================================================================
# Training


def train(cfg: TrainConfig, demo: bool) -> int:
    d = init_distributed(cfg)
    say = _printer(d)
    faults = parse_faults(os.environ.get("URFM_FAULTS", ""))
    use_async = cfg.async_save and ckpt.async_available()
    # The background writer's collectives get a gloo group of their own (DCP requires a CPU backend;
    # sharing the training group would interleave its collectives with FSDP's).
    ckpt_pg = (dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=cfg.timeout))
               if use_async and d.enabled else None)
    # The loop's own flags (preemption notice, background save still writing) are agreed on over
    # another gloo group: CPU ints, no GPU sync, and never interleaved with the writer thread's
    # collectives on ckpt_pg (both threads issuing collectives on one group could pair them wrongly).
    flags_pg = (dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=cfg.timeout))
                if d.enabled and d.world > 1 else None)
    if cfg.resume == "latest" and not cfg.out:
        raise UsageError("--resume without a path continues the run in --out: pass --out RUN_FOLDER")

    # -- config resolved against the world size ------------------------------------------------
    if cfg.batch_size % d.world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} ranks")
    per_rank = cfg.batch_size // d.world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise UsageError(f"per-rank batch {per_rank} is not a multiple of --micro-batch {micro}")
    accum = per_rank // micro
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    if d.device.type == "cuda" and not bf16:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores: fp32 storage, 10-bit mantissa products
    use_compile = cfg.compile if cfg.compile is not None else d.device.type == "cuda"
    shard = cfg.shard if cfg.shard != "auto" else ("grad" if VIT_PRESETS[cfg.model][0] <= 768 else "full")
    mode = cfg.dist if d.enabled else "single"
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    # -- output folder: ours, or new; never someone else's files ---------------------------------
    out = broadcast_obj(cfg.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}", d)
    cfg.out = out
    out = Path(out)
    if d.main:
        ckpt.check_out_dir(out, resume=bool(cfg.resume))
        ckpt.remove_partial(out)  # temporary folders of saves a killed run never finished
    _barrier(d)

    # -- data ------------------------------------------------------------------------------------
    source = cfg.data or "synthetic"
    if source != "synthetic" and not Path(source).exists():
        raise DataError(f"--data {source} does not exist")
    stream = build_train_stream(
        source, img_size=cfg.img_size, batch_size=micro, seed=cfg.seed, rank=d.rank, world_size=d.world,
        num_workers=_default_workers() if cfg.num_workers is None else cfg.num_workers,
        deterministic=cfg.deterministic, device=d.device,
        synthetic_length=cfg.synthetic_images,
    )
    steps_per_epoch = stream.steps_per_epoch // accum
    if steps_per_epoch == 0:
        raise DataError(f"{stream.num_images} images are fewer than one global batch of {cfg.batch_size}")
    total = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)

    # -- teacher: frozen, replicated on every rank, bf16 autocast on GPU, no autograd state -------
    torch.manual_seed(cfg.seed)  # the same random teacher / student init on every rank
    try:
        # The demo only looks in the local Hugging Face cache: a 784 MB download (or minutes of
        # retries on a machine without network) does not belong in a demo; --teacher downloads.
        offline = demo and cfg.teacher == HF_HUB_ID
        with _env(HF_HUB_OFFLINE="1") if offline else contextlib.nullcontext():
            teacher = load_teacher(cfg.teacher, target=cfg.target, grid=cfg.img_size // 16)
    except TeacherUnavailable as e:
        if not demo:
            raise Stop(f"{e}\nThe BiomedCLIP teacher is required for a real run: pass --teacher PATH "
                       "(open_clip_pytorch_model.bin or its folder), or --teacher random for a smoke test "
                       "whose features mean nothing.", code=2) from None
        say("!" * 100 + "\nWARNING: BiomedCLIP weights are not available offline; this demo continues with a "
            "RANDOM teacher.\nIts features are MEANINGLESS: the loss goes down, but the model learns nothing "
            "useful. Pass --teacher PATH for real targets.\n" + "!" * 100)
        teacher = BiomedCLIPTeacher.load("random", target=cfg.target)
    teacher.to(d.device)
    if d.device.type == "cuda" and bf16:
        # Autocast runs the teacher's matmuls and convolutions in bf16: store their weights in bf16 rather
        # than cast them every step (the same numbers). Norms, class token and position embedding stay
        # fp32, as do the residual stream and LayerNorm (fp32 under autocast).
        for m in teacher.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.to(torch.bfloat16)

    # -- student ---------------------------------------------------------------------------------
    overrides = dict(img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, mask_type=cfg.mask_type,
                     decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                     decoder_num_heads=cfg.decoder_heads, target_dim=teacher.out_dim)
    if cfg.depth:
        overrides["depth"] = cfg.depth
    model_cfg = URFMConfig.preset(cfg.model, **overrides)
    torch.manual_seed(cfg.seed)
    student = URFM(model_cfg)
    if cfg.init:
        _init_from(student, cfg.init, say)
    student.to(d.device)
    n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)

    # -- kernels: checked once at this run's shapes on this GPU, before anything is compiled --------
    if ops.use_triton(torch.empty(0, device=d.device)):
        shapes = Shapes.of_run(model_cfg, micro_batch=micro)  # attention speed is compared at this batch
        failed = verify_or_fall_back(shapes, d.device, torch.bfloat16 if bf16 else torch.float32)
        say("Triton kernels: " + (f"{', '.join(failed)} failed the start-up check and run on torch"
                                   if failed else "all passed the start-up check against torch"))

    # -- activation checkpointing, then compile, then sharding (torchtitan's order) ---------------
    blocks = list(student.blocks) + list(student.decoder_blocks)
    if cfg.ac:
        for blk in blocks:
            _checkpoint_block(blk)
    if use_compile:
        ops.get_backend()  # logs the kernel backend here, not from inside a compiled block
        # dynamic=False: encoder, decoder and teacher blocks share Block.forward at different token
        # counts; each count gets its own static graph instead of one symbolic-shape graph.
        for blk in blocks:
            blk.compile(dynamic=False)  # in place: parameter names stay those of the URFM layout
        teacher.compile_blocks()
    model = student
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = dict(reshard_after_forward=shard == "full")
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
    elif mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and mode != "fsdp"
                else contextlib.nullcontext())

    # -- optimizer and EMA -------------------------------------------------------------------------
    cuda = d.device.type == "cuda"
    device_skip = cuda if _DEVICE_SIDE_SKIP is None else _DEVICE_SIDE_SKIP
    fused = cuda or device_skip  # found_inf is an input of the fused kernel only
    optimizer = torch.optim.AdamW(student.param_groups(cfg.weight_decay), lr=base_lr, betas=(0.9, 0.95),
                                  fused=fused or None, foreach=None if fused else True)
    ema = EMA(student, cfg.ema_decay, warmup=cfg.ema_warmup)
    mask_gen = torch.Generator(d.device).manual_seed(cfg.seed * 1000 + d.rank)

    # -- checkpointing: state, save, resume --------------------------------------------------------
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
    )

    sd_model = model if mode == "ddp" else student

    def app_state() -> dict:
        msd, osd = get_state_dict(sd_model, optimizer)
        return {"model": msd, "optimizer": osd, "ema": ema.state_dict()}

    run_config = {"kind": ckpt.RUN_KIND, "demo": demo, "train": dataclasses.asdict(cfg),
                  "model": model_cfg.to_dict(), "world_size": d.world, "mode": mode, "shard": shard,
                  "bf16": bf16, "compile": use_compile, "accumulation": accum, "micro_batch": micro,
                  "lr": base_lr, "total_steps": total, "warmup_steps": warmup, "teacher_source": teacher.source,
                  "torch": torch.__version__}
    state = types.SimpleNamespace(step=0, skipped=0, bad_in_a_row=0, last_good=None, elapsed=0.0, pending=None)

    def trainer_state() -> dict:
        return {"step": state.step, "epoch": stream.epoch, "skipped": state.skipped,
                "bad_in_a_row": state.bad_in_a_row, "elapsed": state.elapsed, "data": stream.state_dict(),
                "rng": rng_state(d.device), "mask_gen": mask_gen.get_state(), "ema_updates": ema.num_updates}

    def save(step: int, background: bool = False) -> Path | None:
        """A resumable checkpoint of now. In the background, it is renamed into place by
        finish_pending: when every rank's write is done (checked each step), at the next save, or at
        the end; until then it is only a temporary folder, which a killed run leaves unfinished."""
        finish_pending()
        planner = _slow_planner(2.0) if step in faults.get("slowsave", ()) else None
        state.pending = ckpt.start_save(out, step, app_state(), trainer_state(), run_config, cfg.keep,
                                        asynchronous=background and use_async, process_group=ckpt_pg,
                                        planner=planner)
        state.pending_since = state.step
        return None if background and use_async else finish_pending()

    def finish_pending() -> Path | None:
        p, state.pending = state.pending, None
        if p is None:
            return None
        waited = not p.done()
        state.last_good = _STOP_WATCHDOG.last_good = ckpt.finish_save(p)
        ran = state.step - state.pending_since
        if ran or waited:
            say(f"checkpoint {p.final.name} complete (written in the background while {ran} step(s) trained"
                f"{'; waited for the rest' if waited else ''})")
        return state.last_good

    def save_pth(step: int) -> Path | None:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(sd_model, options=opts)
        osd = get_optimizer_state_dict(sd_model, optimizer, options=opts)
        esd = ema.full_state_dict()
        if not d.main:
            return None
        args = dict(dataclasses.asdict(cfg), **{f"model_{k}": v for k, v in model_cfg.to_dict().items()})
        extra = {"config": model_cfg.to_dict(), "trainer": trainer_state(), "ema_updates": ema.num_updates,
                 "ema_decay": cfg.ema_decay}
        return ckpt.save_pth(out / f"checkpoint-{step:08d}.pth", msd, esd, ckpt.optim_to_ids(osd),
                             stream.epoch, step, args, extra)

    if cfg.resume:
        _resume(cfg, out, d, app_state, sd_model, optimizer, ema, stream, mask_gen, state, say)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(out / ckpt.CONFIG_FILE, run_config)
        ckpt.truncate_metrics(out, state.step)
    _barrier(d)

    # -- FLOPs for MFU (optional module) -----------------------------------------------------------
    flops_per_image, peak = None, None
    try:
        from urfm_fast.flops import peak_flops, train_flops_per_image

        flops_per_image = train_flops_per_image(model_cfg, teacher=True)
        peak = peak_flops(d.device) if cuda else None
    except ImportError:
        pass

    say(f"model {cfg.model} (depth {model_cfg.depth}, decoder {model_cfg.decoder_embed_dim}d"
        f"{model_cfg.decoder_depth}b) {n_params / 1e6:.1f}M trainable params | img {cfg.img_size} | "
        f"mask {cfg.mask_ratio} | teacher {teacher.source}")
    say(f"{d.world} rank(s) on {d.device.type} | {mode}{'/' + shard if mode == 'fsdp' else ''} | "
        f"{'bf16' if bf16 else 'fp32'} | compile {use_compile} | ac {cfg.ac} | global batch {cfg.batch_size} = "
        f"{d.world} x {micro} x {accum} accumulation | lr {base_lr:.3g} | {total} steps "
        f"({steps_per_epoch} per epoch, warm-up {warmup}) | data: {stream.summary()}")
    say(f"output: {out}")

    # -- the loop ----------------------------------------------------------------------------------
    global _signal_received
    _signal_received = 0
    handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    batches = iter(stream)
    bar = _progress(d, total, state.step)
    params = list(student.parameters())  # the sharded parameters under FSDP2: the same objects every step
    window_loss, window_n, window_t0, window_steps = torch.zeros((), device=d.device), 0, time.time(), 0
    first_step_time = None
    stop_reason = None
    metrics_file = open(out / ckpt.METRICS_FILE, "a") if d.main else None
    last_norm = float("nan")
    # device-side skip: grad norms copied to pinned host memory, not read yet: (step, host copy, event)
    unread: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
    norm_bufs = [torch.zeros((), dtype=torch.float32, pin_memory=cuda) for _ in range(2)]

    def account(step: int, norm_value: float) -> None:
        """The host's bookkeeping of step ``step`` (0-based) from its global grad norm."""
        nonlocal window_n, last_norm
        last_norm = norm_value
        if math.isfinite(norm_value):
            state.bad_in_a_row = 0
            window_n += 1
            return
        state.skipped += 1
        state.bad_in_a_row += 1
        say(f"step {step}: non-finite loss or gradients (grad norm {norm_value}); update skipped "
            f"({state.bad_in_a_row} in a row, {state.skipped} in all)")
        if state.bad_in_a_row >= cfg.max_bad_steps:
            finish_pending()  # every rank stops here: complete the save started before the streak
            where = (f"the last good checkpoint is {state.last_good}" if state.last_good
                     else "no checkpoint was written yet")
            raise Stop(f"stopping: {state.bad_in_a_row} consecutive steps with NaN/Inf loss or gradients "
                       f"(step {step + 1}); {where}. Lower --lr, check the data, or use --precision fp32.")

    def read_norms(keep: int = 0) -> None:
        """Account the steps whose norms were copied to the host, all but the newest ``keep``."""
        while len(unread) > keep:
            step, buf, event = unread.pop(0)
            if event is not None:
                event.synchronize()  # recorded a step ago: normally long complete
            account(step, float(buf))
    try:
        while state.step < total:
            step = state.step
            t_step = time.time()
            lr = lr_at(step, base_lr, cfg.min_lr, warmup, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=d.device)
            if step in faults.get("die", ()) and d.rank == d.world - 1:
                os._exit(1)  # test hook: a rank dies without a word (segfault, OOM killer, lost node)
            if step in faults.get("hang", ()):  # test hook: preempted while stuck (a hung loader or peer)
                os.kill(os.getpid(), signal.SIGTERM)
                while True:
                    time.sleep(0.1)
            try:
                for k in range(accum):
                    images01, index = next(batches)  # (B, 3, S, S) in [0, 1], (B,)
                    target = teacher(images01)  # (B, N, T) fp32, a normal tensor (copied out of inference mode)
                    imgs = normalize(images01, IMAGENET_MEAN, IMAGENET_STD)
                    if mode == "fsdp" and bf16:
                        imgs = imgs.to(torch.bfloat16)
                    if cfg.deterministic:
                        noise = stream.mask_noise(index, model_cfg.num_patches, device=d.device)
                        ids = student.sample_ids(imgs.shape[0], d.device, noise=noise)
                    else:
                        ids = student.sample_ids(imgs.shape[0], d.device, generator=mask_gen)
                    last = k == accum - 1
                    if mode == "fsdp":
                        student.set_requires_gradient_sync(last)
                    sync = model.no_sync() if mode == "ddp" and not last else contextlib.nullcontext()
                    with sync, autocast:
                        loss, _, _ = model(imgs, target, ids)
                    if step in faults.get("nan", ()):
                        loss = loss * float("nan")
                    (loss / accum).backward()
                    loss_sum += loss.detach()
                # The global grad norm (identical on every rank) doubles as the NaN/Inf check.
                if cfg.clip_grad:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad, foreach=True)
                else:  # the norm only (logged, NaN check): no multiplication of every gradient by 1
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None],
                                                         foreach=True)
                if hasattr(norm, "full_tensor"):
                    norm = norm.full_tensor()
                if device_skip:
                    buf = norm_bufs[step % 2]  # the previous user of this buffer (step - 2) was read
                    buf.copy_(norm.detach(), non_blocking=cuda)
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record()
                    unread.append((step, buf, event))
                    bad = ~torch.isfinite(norm)
                    optimizer.found_inf = bad.to(torch.float32)  # fused AdamW: no update, step count kept
                    optimizer.step()
                    ema.update(student, skip=bad)
                    window_loss += torch.where(bad, 0.0, loss_sum / accum)
                else:
                    finite = bool(torch.isfinite(norm))
                    if finite:
                        optimizer.step()
                        ema.update(student)
                        window_loss += loss_sum / accum
                optimizer.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError:
                raise Stop(oom_message(d, micro, accum)) from None
            first = first_step_time is None
            if first:
                if cuda:
                    torch.cuda.synchronize(d.device)  # once: the first step's own time, compile included
                first_step_time = time.time() - t_step
                say(f"first step (compile, autotuning, data start-up): {first_step_time:.1f}s; images/s and MFU "
                    "are timed from the next step")
                window_t0 = time.time()
            state.step += 1
            _STOP_WATCHDOG.step_done()
            state.elapsed += time.time() - t_step
            log_now = state.step % cfg.log_every == 0 or state.step == total
            save_now = cfg.save_every and state.step % cfg.save_every == 0 and state.step < total
            pth_now = cfg.pth_every and state.step % cfg.pth_every == 0 and state.step < total
            if not device_skip:
                account(step, float(norm))
            elif log_now or save_now or pth_now:
                read_norms()  # counts and NaN streak up to date before they are logged or saved
            else:
                read_norms(keep=1)  # the previous step's verdict
            window_steps += 0 if first else 1
            bar.update(1)

            # -- logging (a collective on the loss: every rank takes part) ---------------------
            if log_now:
                mean_loss = float(all_mean(window_loss, d)) / window_n if window_n else float("nan")
                dt = time.time() - window_t0
                # a window of the first step alone (--log-every 1) has only that step's time
                ips = (window_steps * cfg.batch_size / max(dt, 1e-9) if window_steps
                       else cfg.batch_size / max(first_step_time, 1e-9))
                rec = {"step": state.step, "epoch": stream.epoch, "loss": mean_loss, "lr": lr,
                       "grad_norm": last_norm, "images_per_s": ips, "skipped": state.skipped,
                       "peak_mem_gb": peak_memory_gb(d.device), "time": time.time()}
                if flops_per_image:
                    rec["tflops"] = ips * flops_per_image / 1e12
                    if peak:
                        rec["mfu"] = ips * flops_per_image / (peak * d.world)
                if metrics_file:
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
                mfu = f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
                say(f"step {state.step:>7d}/{total} | loss {mean_loss:.4f} | lr {lr:.3e} | grad norm "
                    f"{last_norm:.3f} | {ips:.1f} img/s{mfu} | peak mem {rec['peak_mem_gb']:.2f} GB")
                window_loss.zero_()
                window_n, window_t0, window_steps = 0, time.time(), 0

            # -- preemption, and a background save finished: every rank must agree. One rank reads
            #    its flags every step; several reduce them (CPU ints on flags_pg, no GPU sync, but a
            #    host round trip) at log steps and the last step, so a preemption notice is acted on
            #    within --log-every steps.
            if step in faults.get("sigterm", ()) and d.main:
                os.kill(os.getpid(), signal.SIGTERM)
            sig, writing = 0, 1
            if flags_pg is None or log_now:
                sig = _signal_received
                writing = int(state.pending is not None and not state.pending.done())
                if flags_pg is not None:
                    flags = torch.tensor([sig, writing], dtype=torch.int64)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=flags_pg)
                    sig, writing = (int(v) for v in flags.tolist())
            if state.pending is not None and not writing:
                finish_pending()
            if sig:
                _STOP_WATCHDOG.noticed()
                read_norms()  # the final checkpoint carries the counts of every step trained
                stop_reason = signal.Signals(sig).name
                break

            # Not during a NaN streak: the last checkpoint should be the last good one.
            if save_now and state.bad_in_a_row == 0:
                save(state.step, background=True)
            if pth_now:
                save_pth(state.step)
    except Exception as e:
        if state.pending is not None and d.main:
            # a save still being written is abandoned: no temporary folder is left behind either
            shutil.rmtree(state.pending.tmp, ignore_errors=True)
        # Here, with the preemption handler still installed: torchrun's SIGTERM to the survivors
        # cannot cut the message short.
        if d.world > 1 and is_collective_failure(e):
            where = (f"the last complete checkpoint is {state.last_good}" if state.last_good
                     else "no checkpoint was completed yet")
            fail_fast(d.rank, e, f"at step {state.step + 1}", f"Nothing is saved for this step; {where}; "
                                 f"continue with the same command plus --out {out} --resume.")
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        _STOP_WATCHDOG.noticed()
        bar.close()
        if metrics_file:
            metrics_file.close()

    # -- end: final (or preemption) checkpoint and a summary ---------------------------------------
    finish_pending()  # a preemption or the end waits for the background save, then saves now
    path = state.last_good
    if path != ckpt.step_dir(out, state.step):  # (preempted right after a periodic save: it is this one)
        path = save(state.step)
    # The .pth after the resumable checkpoint: a preemption grace period that runs out while the
    # (larger, gathered) .pth is written still leaves a complete DCP checkpoint behind.
    pth = save_pth(state.step)
    summary = [f"{'stopped by ' + stop_reason if stop_reason else 'done'}: step {state.step}/{total} in "
               f"{state.elapsed:.0f}s (first step incl. compile {first_step_time or 0:.1f}s)",
               f"skipped NaN/Inf steps: {state.skipped}"]
    if isinstance(stream.source, ImageFolderDataset):
        summary.append(f"unreadable images skipped: {stream.source.skipped}")
    summary.append(f"resumable checkpoint: {path}")
    if pth:
        summary.append(f"URFM-format checkpoint: {pth}")
    if stop_reason:
        summary.append(f"resume with: python -m urfm_fast.pretrain --out {out} --resume")
    for line in summary:
        say(line)
    _barrier(d)  # every rank is past its last collective before main() tears the process group down
    return 0


def _resume(cfg, out, d, app_state, sd_model, optimizer, ema, stream, mask_gen, state, say) -> None:
    """Restore model, EMA, optimizer, step, RNG and data position from the newest good checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    found = ckpt.candidates(cfg.resume, out)
    if not found:
        if cfg.resume == "latest":
            say(f"--resume: no checkpoint in {out} yet; starting from step 0")
            return
        raise ckpt.CheckpointError(f"--resume {cfg.resume}: no checkpoint found")
    for path in found:
        if path.suffix == ".pth":
            trainer = _resume_pth(path, sd_model, optimizer, ema)
            break
        reason = ckpt.validate(path)
        if reason:
            say(f"checkpoint {path} is incomplete or corrupt ({reason}); trying the previous one")
            continue
        s = app_state()
        try:
            trainer = ckpt.load_dcp(path, s)
        except checkpoint_errors() as e:  # a damaged file DCP cannot read: every rank sees the failure
            if isinstance(dcp_cause(e), UntrustedCheckpoint):  # tampered: stop, never fall back silently
                raise ckpt.CheckpointError(str(dcp_cause(e))) from None
            say(f"checkpoint {path} could not be read ({one_line(e)}); trying the previous one")
            continue
        set_state_dict(sd_model, optimizer, model_state_dict=s["model"], optim_state_dict=s["optimizer"],
                       options=StateDictOptions(strict=True))
        ema.load_state_dict(s["ema"])
        break
    else:
        raise ckpt.CheckpointError(f"--resume: none of the checkpoints in {out} is usable")
    try:
        state.step, state.skipped = int(trainer["step"]), int(trainer["skipped"])
        ema.num_updates = int(trainer.get("ema_updates", state.step))  # older checkpoints: one update per step
        state.bad_in_a_row, state.elapsed = int(trainer["bad_in_a_row"]), float(trainer["elapsed"])
        stream.load_state_dict(trainer["data"])
        if not trainer.get("resharded"):
            set_rng_state(trainer["rng"], d.device)
            mask_gen.set_state(trainer["mask_gen"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ckpt.CheckpointError(f"--resume {path}: its trainer state is damaged ({one_line(e, 120)})") from None
    state.last_good = _STOP_WATCHDOG.last_good = path
    if trainer.get("resharded"):
        say("resuming on a different number of ranks: per-rank random streams are re-seeded "
            "(use --deterministic for a curve that does not depend on it)")
        mask_gen.manual_seed(cfg.seed * 1000 + d.rank + 7919 * state.step)
    say(f"resumed from {path} at step {state.step}")


def _resume_pth(path: Path, sd_model, optimizer, ema) -> dict:
    """Resume from our URFM-format .pth (model, EMA, optimizer, step; trainer state when present)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from urfm_fast.checkpoint_io import _torch_load

    obj = _torch_load(path)  # weights_only; a refused or corrupt file is one line
    try:
        names = [n for n, _ in ema_names(optimizer, sd_model)]
        osd = ckpt.optim_from_ids(obj["optimizer"], names)
        set_state_dict(sd_model, optimizer, model_state_dict=obj["model"], optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True, strict=True))
        ema.load_state_dict(obj["ema_state_dict"])
        trainer = obj.get("trainer") or {"step": obj["step"], "skipped": 0, "bad_in_a_row": 0, "elapsed": 0.0,
                                         "data": {"epoch": obj.get("epoch", 0), "offset": 0}, "rng": None}
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ckpt.CheckpointError(
            f"--resume {path}: not a resumable checkpoint of this model ({one_line(e, 120)}); a .pth from "
            "another architecture or a weights-only file cannot resume a run (use --init for weights)") from None
    trainer["resharded"] = trainer.get("rng") is None or dist.is_initialized()
    return trainer


def ema_names(optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
    """(clean name, param) in optimizer order: how optim_to_ids numbered the parameters."""
    from urfm_fast.ema import clean_name

    by_id = {id(p): clean_name(n) for n, p in model.named_parameters()}
    return [(by_id[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def _init_from(student: URFM, path: str, say) -> None:
    """--init: weights only (EMA weights when the file has them), from an official or our checkpoint."""
    from urfm_fast.checkpoint_io import load_checkpoint

    loaded = load_checkpoint(path, prefer_ema=True)
    own = student.state_dict()
    sd = loaded.state_dict
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise UsageError(f"--init {path}: shapes differ from this model for {bad[:3]} (checkpoint config "
                         f"{loaded.config.model}, img {loaded.config.img_size}); match --model/--img-size/"
                         "decoder flags")
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected:
        raise UsageError(f"--init {path}: unexpected keys {unexpected[:5]}")
    say(f"initialised from {path} ({loaded.meta.get('weights', 'model')} weights"
        f"{', decoder re-initialised' if missing else ''})")


def _checkpoint_block(blk: torch.nn.Module) -> None:
    """Activation checkpointing by replacing the block's forward in place: parameter names do not
    change (a wrapper module would add a path component to every key)."""
    from torch.utils.checkpoint import checkpoint

    inner = blk.forward
    blk.forward = lambda x: checkpoint(inner, x, use_reentrant=False)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def _printer(d: Dist):
    from tqdm.auto import tqdm

    def say(msg: str) -> None:
        if d.main:
            tqdm.write(msg, file=sys.stdout)

    return say


def _progress(d: Dist, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not d.main, dynamic_ncols=True, desc="pretrain",
                unit="step", file=sys.stderr, mininterval=1.0)


# =============================================================================================
# Entry point: known failures become one clear message and an exit code, never a traceback


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(message)s")
    rank = int(os.environ.get("RANK", 0))
    # process-wide settings a run changes (--deterministic, TF32 for fp32): restored for the caller
    settings = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_float32_matmul_precision())
    try:
        cfg, given, demo = parse_config(argv)
        if demo and rank == 0:
            where = "GPU: ViT-B recipe for a short while" if _cuda_wanted(given) else "CPU: tiny model, small images"
            print(f"DEMO: no --data given, so this is a short demo on built-in synthetic ultrasound ({where}).\n"
                  "For a real run pass --data DIR (a folder of images) and --teacher PATH. See --help.",
                  flush=True)
        return train(cfg, demo)
    except Stop as e:
        _report(str(e), rank)
        return e.code
    except (DataError, ckpt.CheckpointError, checkpoint_io.CheckpointError, TeacherUnavailable, UsageError) as e:
        _report(f"error: {e}", rank)
        return 2
    except ValueError as e:  # a flag value (FlagError) or a file a loader refused (e.g. a wrong --teacher file)
        _report(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", rank)
        return 2
    except OSError as e:  # a full or read-only disk, a vanished file: one line, not a traceback
        _report(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; check the disk and "
                "permissions of --out and the input paths", rank)
        return 2
    except KeyboardInterrupt:
        _report("interrupted", rank)
        return 130
    except Exception as e:  # outside the loop (start-up, final save): the same fail-fast, less context
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and is_collective_failure(e):
            fail_fast(rank, e, "outside the training loop")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.use_deterministic_algorithms(settings[0], warn_only=settings[1])
        torch.set_float32_matmul_precision(settings[2])


def _report(msg: str, rank: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0 or world > 1:
        print(msg if world == 1 else f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

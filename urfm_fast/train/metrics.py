"""What a run reports: console lines and the progress bar (rank 0), ``metrics.jsonl``, images/s, MFU,
and the same scalars as TensorBoard events in the run folder when tensorboard is installed.

Losses are summed on the device over a logging window and reduced across ranks only at log steps,
so logging costs one collective per ``--log-every`` steps, not one host sync per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import resource
import sys
import time
from pathlib import Path

import torch

from urfm_fast.checkpoints.runs import METRICS_FILE
from urfm_fast.config import URFMConfig
from urfm_fast.train.distributed import Dist, all_mean
from urfm_fast.train.plan import RunPlan
from urfm_fast.train.tensorboard import add_scalars, summary_writer

TB_KEYS = ("loss", "lr", "grad_norm", "images_per_s", "mfu", "peak_mem_gb")  # scalars under train/


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _tqdm():
    """tqdm where it is installed (a dependency, but a bare GPU image of torch, triton, timm and numpy, which
    experiments/gpu_method.sh runs in, lacks it: the console lines alone then)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class _NoBar:
    def update(self, *args, **kwargs) -> None:
        pass

    set_postfix = close = update


def printer(d: Dist):
    tqdm = _tqdm()

    def say(msg: str) -> None:
        if d.main and tqdm:
            tqdm.write(msg, file=sys.stdout)
        elif d.main:
            print(msg, flush=True)

    return say


def _flops(model_cfg: URFMConfig, device: torch.device, teacher: bool):
    """(training FLOPs per image at a mask ratio, the device's peak FLOP/s): for MFU (optional module)."""
    try:
        from urfm_fast.model.flops import peak_flops, train_flops_per_image
    except ImportError:
        return None, None

    @functools.cache  # a mask schedule has a few levels
    def at(ratio: float) -> int:
        return train_flops_per_image(dataclasses.replace(model_cfg, mask_ratio=ratio), teacher=teacher)

    return at, peak_flops(device) if device.type == "cuda" else None


class MetricsLogger:
    """The logging window (loss sum, good steps, time), the progress bar and metrics.jsonl."""

    def __init__(self, plan: RunPlan, d: Dist, model_cfg: URFMConfig, out: Path, initial_step: int, say,
                 source_counts=None):
        tqdm = _tqdm()
        self.plan, self.d, self.say = plan, d, say
        self.flops_at, self.peak = _flops(model_cfg, d.device, teacher=plan.train.target != "pixels")
        # on rank 0 and a terminal only: in a batch job's log file the console lines say the same
        self.bar = _NoBar() if tqdm is None else tqdm(
            total=plan.total_steps, initial=initial_step, disable=not d.main or not sys.stderr.isatty(),
            dynamic_ncols=True, desc="pretrain", unit="step", file=sys.stderr, mininterval=1.0)
        self.file = open(out / METRICS_FILE, "a") if d.main else None
        self.tb = summary_writer(out, say) if d.main else None  # event files beside metrics.jsonl
        self.loss = torch.zeros((), device=d.device)  # summed over the window's good steps, on the device
        self.good, self.steps, self.t0 = 0, 0, time.time()
        self.first_step_time: float | None = None
        # samples drawn from each --data folder at the last log (several folders; a resumed run's counts)
        self.counts_before = None if source_counts is None else [int(c) for c in source_counts]

    def step_finished(self, t_step: float) -> None:
        """After every step; the first one (compile, autotuning, data start-up) is timed apart."""
        if self.first_step_time is None:
            if self.d.device.type == "cuda":
                torch.cuda.synchronize(self.d.device)  # once: the first step's own time, compile included
            self.first_step_time = time.time() - t_step
            self.say(f"first step (compile, autotuning, data start-up): {self.first_step_time:.1f}s; images/s "
                     "and MFU are timed from the next step")
            self.t0 = time.time()
        else:
            self.steps += 1
        self.bar.update(1)

    def log(self, step: int, epoch: int, lr: float, grad_norm: float, skipped: int, source_counts=None,
            mask_ratio: float | None = None) -> None:
        """One record (a collective on the loss: every rank calls this at the same steps). source_counts:
        global samples drawn from each --data folder since the run began (several folders); mask_ratio: the
        ratio of the step logged (FLOPs are counted at it)."""
        batch = self.plan.train.batch_size
        mean_loss = float(all_mean(self.loss, self.d)) / self.good if self.good else float("nan")
        dt = time.time() - self.t0
        # a window of the first step alone (--log-every 1) has only that step's time
        ips = (self.steps * batch / max(dt, 1e-9) if self.steps else batch / max(self.first_step_time, 1e-9))
        rec = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
               "images_per_s": ips, "skipped": skipped, "peak_mem_gb": peak_memory_gb(self.d.device),
               "time": time.time()}
        if mask_ratio is not None:
            rec["mask_ratio"] = mask_ratio
        if source_counts is not None:
            rec.update(self._shares(source_counts))
        if self.flops_at:
            flops = self.flops_at(self.plan.train.mask_ratio if mask_ratio is None else mask_ratio)
            rec["tflops"] = ips * flops / 1e12
            if self.peak:
                rec["mfu"] = ips * flops / (self.peak * self.d.world)
        if self.file:
            try:
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: a file object's error does not name the file
                raise OSError(e.errno, e.strerror, self.file.name) from None
        if self.tb:
            add_scalars(self.tb, "train", rec, step, TB_KEYS)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
        mfu = f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
        self.say(f"step {step:>7d}/{self.plan.total_steps} | loss {mean_loss:.4f} | lr {lr:.3e} | grad norm "
                 f"{grad_norm:.3f} | {ips:.1f} img/s{mfu} | peak mem {rec['peak_mem_gb']:.2f} GB")
        self.loss.zero_()
        self.good, self.t0, self.steps = 0, time.time(), 0

    def _shares(self, counts) -> dict:
        """The share each --data folder had of this logging window's samples and of the whole run's."""
        counts = [int(c) for c in counts]
        before = self.counts_before or [0] * len(counts)
        window = [c - b for c, b in zip(counts, before)]
        self.counts_before = counts
        share = lambda xs: [x / sum(xs) if sum(xs) else 0.0 for x in xs]  # noqa: E731
        return {"source_share": share(window), "source_share_run": share(counts), "source_samples": counts}

    def close(self) -> None:
        self.bar.close()
        if self.file:
            with contextlib.suppress(OSError):  # the failed write was reported; its buffer cannot be flushed
                self.file.close()
        if self.tb:
            self.tb.close()

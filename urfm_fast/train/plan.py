"""The run plan: the config resolved once against the world size, the device and the data.

Every value a run derives from its flags (micro-batch and accumulation, bf16, compile, data-parallel
mode and shard mode, the base learning rate, the total and warm-up steps, the output folder) is
computed here and nowhere else. The plan is frozen; ``run_config`` is what ``config.json`` holds (and
what ``--resume`` reads back through ``config.parse_config``), ``pth_args`` the ``args`` of the
URFM-format .pth, both from the same plan. The learning rate of a step is ``schedule.lr_at``, its mask
ratio ``RunPlan.mask_ratio``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch

from urfm_fast.checkpoints.runs import RUN_KIND
from urfm_fast.config import VIT_PRESETS, URFMConfig
from urfm_fast.data.dataset import DataError
from urfm_fast.train.config import TrainConfig, UsageError
from urfm_fast.train.distributed import Dist, broadcast_obj
from urfm_fast.train.schedule import mask_ratio_at


@dataclass(frozen=True)
class RunPlan:
    train: TrainConfig  # the flags as resolved (``out`` filled in); never changed after the plan is built
    demo: bool
    world: int
    device_type: str  # "cuda" or "cpu"
    mode: str  # "fsdp", "ddp" or "single" (no process group)
    shard: str  # FSDP2: "full" or "grad"
    bf16: bool
    compile: bool
    micro_batch: int  # per rank
    accumulation: int
    lr: float  # the peak learning rate of the schedule
    steps_per_epoch: int = 0  # the schedule, known once the data is: see with_data
    total_steps: int = 0
    warmup_steps: int = 0
    warmup_note: str | None = None  # a warm-up longer than the run, shortened: said once at start-up

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"

    def with_data(self, batches_per_epoch: int, num_images: int) -> RunPlan:
        """The schedule in optimizer steps, from the micro-batches one rank reads per epoch."""
        cfg = self.train
        steps_per_epoch = batches_per_epoch // self.accumulation
        if steps_per_epoch == 0:
            raise DataError(f"{num_images} images are fewer than one global batch of {cfg.batch_size}: pass a "
                            f"smaller --batch-size (at most {num_images})")
        total = cfg.steps or cfg.epochs * steps_per_epoch
        warmup, note = resolve_warmup(cfg, steps_per_epoch, total)
        return dataclasses.replace(self, steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup,
                                   warmup_note=note)

    def model_config(self, target_dim: int) -> URFMConfig:
        cfg = self.train
        overrides = dict(img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, mask_type=cfg.mask_type,
                         decoder=cfg.decoder, loss_on=cfg.loss_on, loss="mse" if cfg.target == "pixels" else "cosine",
                         decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                         decoder_num_heads=cfg.decoder_heads, target_dim=target_dim)
        if cfg.depth:
            overrides["depth"] = cfg.depth
        return URFMConfig.preset(cfg.model, **overrides)

    def mask_ratio(self, step: int) -> float:
        """The mask ratio of optimizer step ``step`` (train/schedule.py)."""
        cfg = self.train
        return mask_ratio_at(step, self.total_steps, cfg.mask_ratio, cfg.mask_schedule, cfg.mask_start,
                             cfg.mask_ramp, cfg.mask_levels)

    def run_config(self, model_cfg: URFMConfig, teacher_source: str) -> dict:
        """config.json: written once per run (start or resume), read back by --resume."""
        return {"kind": RUN_KIND, "demo": self.demo, "train": dataclasses.asdict(self.train),
                "model": model_cfg.to_dict(), "world_size": self.world, "mode": self.mode, "shard": self.shard,
                "bf16": self.bf16, "compile": self.compile, "accumulation": self.accumulation,
                "micro_batch": self.micro_batch, "lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "teacher_source": teacher_source, "torch": torch.__version__}

    def pth_args(self, model_cfg: URFMConfig) -> dict:
        """The ``args`` of a URFM-format .pth: the flags and the model config (``model_*``)."""
        return dict(dataclasses.asdict(self.train), **{f"model_{k}": v for k, v in model_cfg.to_dict().items()})


def resolve_warmup(cfg: TrainConfig, steps_per_epoch: int, total: int) -> tuple[int, str | None]:
    """The warm-up in steps, and a warning when it had to be shortened: a warm-up longer than the run
    (a short --steps run with the recipe's --warmup-epochs 40) would never reach the peak learning rate,
    so it becomes a tenth of the run, the recipe's proportion (40 of 400 epochs)."""
    if cfg.warmup_steps is not None:
        n, source = cfg.warmup_steps, f"--warmup-steps {cfg.warmup_steps}"
    else:
        n = round(cfg.warmup_epochs * steps_per_epoch)
        source = f"--warmup-epochs {cfg.warmup_epochs:g} of {steps_per_epoch} steps"
    if n <= total:
        return n, None
    short = total // 10
    return short, (f"warning: the warm-up ({n} steps, {source}) is longer than the run ({total} steps): shortened "
                   f"to {short} steps, a tenth of the run; set --warmup-steps to choose")


def build_plan(cfg: TrainConfig, demo: bool, d: Dist) -> RunPlan:
    """Resolve ``cfg`` for this world and device; bad combinations are a UsageError (one line)."""
    if cfg.resume == "latest" and not cfg.out:
        raise UsageError("--resume without a path continues the run in --out: pass --out RUN_FOLDER")
    if cfg.batch_size % d.world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} ranks")
    per_rank = cfg.batch_size // d.world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise UsageError(f"per-rank batch {per_rank} is not a multiple of --micro-batch {micro}")
    cuda = d.device.type == "cuda"
    out = broadcast_obj(cfg.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}", d)
    return RunPlan(
        train=dataclasses.replace(cfg, out=out), demo=demo, world=d.world, device_type=d.device.type,
        mode=cfg.dist if d.enabled else "single",
        shard=cfg.shard if cfg.shard != "auto" else ("grad" if VIT_PRESETS[cfg.model][0] <= 768 else "full"),
        bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and cuda),
        compile=cfg.compile if cfg.compile is not None else cuda,
        micro_batch=micro, accumulation=per_rank // micro,
        lr=cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256,
    )


def apply_process_settings(plan: RunPlan) -> None:
    """The process-wide torch settings a plan asks for (main() restores them for its caller)."""
    if plan.cuda and not plan.bf16:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores: fp32 storage, 10-bit mantissa products
    if plan.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


"""The allowed values of ``python -m urfm_fast.pretrain``'s flags, checked on the resolved config.

``check_train_config`` runs right after parsing (demo presets and a resumed run's own settings
filled in), before a process group, a model or a data loader exists. Each message names the flag and
its allowed range; cross-flag rules (divisibility, visible and masked patches
at this image size) are checked here too, so the loop never sees a value it cannot train with.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from urfm_fast.cli_checks import FlagError, existing, flag, float_in, int_in, writable_dir
from urfm_fast.config import MASK_SCHEDULES, RECIPE_CHOICES
from urfm_fast.data.shards import MARKER

# Fields argparse already restricts (choices, booleans) or whose loader says what is wrong (--teacher).
CHECKED_ELSEWHERE = {"model", "dist", "shard", "precision", "teacher", "deterministic",
                     "async_save", "compile", "ac", "ema_warmup"}
BIG = 10**9  # upper bound of counts (steps, intervals): far beyond any run, small enough for any int type
PATCH = 16  # every preset is patch 16


def _sizes(cfg) -> None:
    int_in("img_size", cfg.img_size, 32, 2048)
    if cfg.img_size % PATCH:
        raise FlagError(f"--img-size {cfg.img_size}: must be a multiple of the patch size {PATCH} (e.g. 224)")
    if cfg.depth is not None:
        int_in("depth", cfg.depth, 1, 64)
    int_in("decoder_dim", cfg.decoder_dim, 1, 8192)
    int_in("decoder_depth", cfg.decoder_depth, 1, 64)
    int_in("decoder_heads", cfg.decoder_heads, 1, cfg.decoder_dim)
    if cfg.teacher_size:  # 0: the teacher's own input size
        int_in("teacher_size", cfg.teacher_size, 32, 2048, " (0 = the teacher's own)")
    if cfg.decoder_dim % cfg.decoder_heads:
        raise FlagError(f"--decoder-heads {cfg.decoder_heads}: must divide --decoder-dim {cfg.decoder_dim}")
    float_in("mask_ratio", cfg.mask_ratio, 0.0, 1.0, hi_open=True, what=" (0: no masking, feature distillation)")
    if cfg.num_workers is not None:
        int_in("num_workers", cfg.num_workers, 0, 256)
    int_in("synthetic_images", cfg.synthetic_images, 1, 10**7)


def _recipe(cfg) -> None:
    """The recipe switches (argparse restricts them on the command line; a resumed run's config.json
    does not pass through argparse, so an unknown value there is refused here), and the pairs that
    cannot train together."""
    for name, allowed in (*((n, RECIPE_CHOICES[n]) for n in ("mask_type", "decoder", "loss_on")),
                          ("mask_schedule", MASK_SCHEDULES), ("target", ("tokens", "proj", "pixels"))):
        value = getattr(cfg, name)
        if value not in allowed:
            raise FlagError(f"{flag(name)} {value}: must be one of {', '.join(allowed)}")
    float_in("mask_start", cfg.mask_start, 0.0, 1.0, hi_open=True)
    float_in("mask_ramp", cfg.mask_ramp, 0.0, 1.0, lo_open=True, what=" (a fraction of the run)")
    int_in("mask_levels", cfg.mask_levels, 1, 1024)
    unmasked = cfg.mask_ratio == 0 or (cfg.mask_schedule != "constant" and cfg.mask_start == 0)
    if cfg.decoder == "prompting" and unmasked:
        raise FlagError("--decoder prompting: updates only mask tokens, and a step at mask ratio 0 has none; use "
                        "--decoder standard, or a --mask-start above 0")
    if cfg.target == "pixels" and (cfg.loss_on == "all_cls" or cfg.mask_type == "attention"):
        raise FlagError(f"--target pixels: has no teacher CLS or attention for --loss-on {cfg.loss_on} / "
                        f"--mask-type {cfg.mask_type}; use --loss-on masked or all, --mask-type random or block")


def _schedule(cfg) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1) or 1)
    int_in("batch_size", cfg.batch_size, 1, 2**20)
    if cfg.batch_size % world:
        raise FlagError(f"--batch-size {cfg.batch_size}: must be divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    int_in("micro_batch", cfg.micro_batch, 0, per_rank, " (0 = the whole per-rank batch)")
    if cfg.micro_batch and per_rank % cfg.micro_batch:
        raise FlagError(f"--micro-batch {cfg.micro_batch}: must divide the per-rank batch {per_rank}")
    int_in("steps", cfg.steps, 0, BIG, " (0 = use --epochs)")
    int_in("epochs", cfg.epochs, 0 if cfg.steps else 1, 10**6, "" if cfg.steps else " when --steps is 0")
    if cfg.lr is not None:
        float_in("lr", cfg.lr, 0.0, 10.0)
    float_in("blr", cfg.blr, 0.0, 10.0)
    base = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256
    float_in("min_lr", cfg.min_lr, 0.0, base, what=" (at most the peak learning rate)")
    float_in("warmup_epochs", cfg.warmup_epochs, 0.0, 10**6)
    if cfg.warmup_steps is not None:
        int_in("warmup_steps", cfg.warmup_steps, 0, BIG)
    float_in("weight_decay", cfg.weight_decay, 0.0, 10.0)
    float_in("clip_grad", cfg.clip_grad, 0.0, float("inf"), what=" (0 = no clipping)")
    float_in("ema_decay", cfg.ema_decay, 0.0, 1.0)


def _cache(cfg) -> None:
    if cfg.augment not in ("crop", "none"):
        raise FlagError(f"--augment {cfg.augment}: must be one of crop, none")
    if cfg.cache_targets and cfg.augment != "none":
        raise FlagError("--cache-targets: targets are the same for every epoch only without augmentation; add "
                        "--augment none")


def _run(cfg) -> None:
    int_in("seed", cfg.seed, 0, 2**32 - 1)
    int_in("log_every", cfg.log_every, 1, BIG)
    int_in("save_every", cfg.save_every, 0, BIG, " (0 = only at the end)")
    int_in("keep", cfg.keep, 0, 10**6, " (0 = keep every checkpoint)")
    int_in("pth_every", cfg.pth_every, 0, BIG, " (0 = only at the end)")
    int_in("max_bad_steps", cfg.max_bad_steps, 1, BIG)
    float_in("timeout", cfg.timeout, 0.0, 10**6, lo_open=True, what=" minutes")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise FlagError(f"--device {cfg.device}: must be auto, cpu, cuda or cuda:N")


def data_folders(cfg) -> list[str]:
    """--data as a list of folders ([] for the demo and synthetic data)."""
    if cfg.data in (None, "synthetic"):
        return []
    return [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)


def data_weights(cfg):
    """--data-weights for the stream: None (by size), "equal", or one non-negative float per folder."""
    spec, n = cfg.data_weights, len(data_folders(cfg))
    if spec is None or str(spec).strip().lower() == "equal":
        return None if spec is None else "equal"
    try:
        w = [float(x) for x in str(spec).split(",")]
    except ValueError:
        raise FlagError(f"--data-weights {spec}: must be 'equal' or a comma list of numbers, one per --data "
                        "folder") from None
    if len(w) != n:
        raise FlagError(f"--data-weights {spec}: {len(w)} weight(s) for {n} --data folder(s)")
    if any(not math.isfinite(x) or x < 0 for x in w) or not sum(w) > 0:
        raise FlagError(f"--data-weights {spec}: weights must be finite, >= 0 and not all zero")
    return w


def _data(cfg) -> None:
    folders = data_folders(cfg)
    for folder in folders:
        existing("data", folder)
    if cfg.data_weights is not None and not folders:
        raise FlagError("--data-weights: needs --data folders")
    data_weights(cfg)
    if len(folders) > 1:
        for folder in folders:
            if not (Path(folder).expanduser() / MARKER).is_file():
                raise FlagError(f"--data {folder}: not a shard folder; several --data folders must each be "
                                "written by python -m urfm_fast.prepare")
        if len(set(map(os.path.realpath, folders))) < len(folders):
            raise FlagError("--data: a folder is given twice; give each once and weigh it with --data-weights")


def _paths(cfg) -> None:
    _data(cfg)
    if cfg.init is not None:
        existing("init", cfg.init)
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).expanduser().exists():
        raise FlagError(f"--resume {cfg.resume}: no such checkpoint folder, run folder or .pth file")
    if cfg.out is not None:
        writable_dir("out", cfg.out)
    elif cfg.resume == "latest":
        raise FlagError("--resume without a path continues the run in --out: pass --out RUN_FOLDER")


def check_train_config(cfg) -> None:
    """Raise FlagError (one line: the flag, its value, the allowed range) for the first bad value."""
    _sizes(cfg)
    _recipe(cfg)
    _schedule(cfg)
    _cache(cfg)
    _run(cfg)
    _paths(cfg)

"""The pretraining config: one dataclass, and the CLI derived from it (every field is a --flag with
its help text). ``parse_config`` applies the demo presets, or the settings of the run being resumed,
then the flags given, and checks every value before anything is built (train/checks.py). This module
imports neither torch nor timm, so ``--help`` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from urfm_fast.cli_checks import OneLineParser
from urfm_fast.config import (
    BIOMEDCLIP_FILES,
    EFFICIENTNET_LITE0,
    HF_HUB_ID,
    MASK_SCHEDULES,
    RECIPE_CHOICES,
    TEACHER_HELP,
    VIT_PRESETS,
    add_config_flags,
    read_config_values,
)
from urfm_fast.train.checks import check_train_config


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
    mask_ratio: float = _f(0.75, "fraction of patches masked (with --mask-schedule: the ratio the ramp ends at); 0 "
                                 "masks nothing: the loss is on every patch, feature distillation")
    mask_schedule: str = _f("constant", "the mask ratio over the run: constant (URFM's) or a ramp from --mask-start "
                                        "to --mask-ratio over the first --mask-ramp of the steps, linear or cosine",
                            choices=list(MASK_SCHEDULES))
    mask_start: float = _f(0.0, "mask ratio the ramp of --mask-schedule starts from (0: unmasked distillation first)")
    mask_ramp: float = _f(0.5, "fraction of the run the ramp of --mask-schedule takes; the target ratio after it")
    mask_levels: int = _f(8, "the ramp moves in this many equal steps: at most levels+1 visible-token counts, each "
                             "compiled once")
    mask_type: str = _f("random", "masking generator: random (MAE), block (BEiT) or attention (MILAN: visible "
                                  "patches sampled by the teacher's CLS attention, a CNN teacher's feature norm)",
                        choices=list(RECIPE_CHOICES["mask_type"]))
    decoder: str = _f("standard", "decoder: standard (MAE, every token updated) or prompting (MILAN: only the mask "
                                  "tokens are updated, the encoder's tokens are fixed keys/values)",
                      choices=list(RECIPE_CHOICES["decoder"]))
    loss_on: str = _f("masked", "tokens in the loss: masked patches (every patch at a step that masks none), all "
                                "patches, or all_cls (all patches and CLS against the teacher's CLS, MILAN)",
                      choices=list(RECIPE_CHOICES["loss_on"]))
    # teacher
    teacher: str = _f(HF_HUB_ID, TEACHER_HELP)
    target: str = _f("tokens", "what the student predicts: the teacher's final-LN patch tokens (768-d), its "
                               "projected tokens (512-d), or pixels (MAE's per-patch normalised pixels with a squared "
                               "error: no teacher, the baseline)", choices=["tokens", "proj", "pixels"])
    teacher_size: int = _f(0, "input size of an efficientnet_lite0, timm: or open_clip: teacher (0: its own, "
                              "e.g. 224); BiomedCLIP and random see the student's images")
    # data
    data: str | list[str] | None = _f(None, "folder of PNG/JPEG/BMP/TIFF (recursive) or a shard folder; several shard "
                                            "folders are read as one weighted stream (--data-weights); 'synthetic' "
                                            "for the built-in data; without it the run is a short demo on "
                                            "synthetic data", nargs="+")
    data_weights: str | None = _f(None, "share of each --data folder in the stream: comma list, one number per "
                                        "folder (0.5,0.3,0.2; normalised), or 'equal' (default: proportional to "
                                        "the folders' sizes)")
    num_workers: int | None = _f(None, "DataLoader workers per rank (default: 8, at most the CPU cores per rank)")
    synthetic_images: int = _f(8192, "number of distinct images of the synthetic data set")
    augment: str = _f("crop", "crop: RandomResizedCrop (scale 0.2-1) and horizontal flips, URFM's and MAE's; none: "
                              "each image's centre square resized, the same pixels every epoch",
                      choices=["crop", "none"])
    cache_targets: bool = _f(False, "with --augment none: compute each image's teacher targets once, at its first "
                                    "batch, and keep them on the device for the later epochs (a small fixed image "
                                    "set; memory: images x patches x target width x 4 bytes)")
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


# Demo presets: applied when --data is not given, before the flags the user did give. The CPU demo's
# EfficientNet-Lite0 sees 128 px (an 8 x 8 stride-16 map averaged to the student's 4 x 4 grid), as in
# experiments/does_it_work.py: a third of its cost at 224 px; BiomedCLIP ignores the size.
DEMO_CPU = dict(model="vit_tiny", depth=4, img_size=64, decoder_dim=128, decoder_depth=2, decoder_heads=4,
                batch_size=32, steps=60, lr=1e-3, warmup_steps=5, log_every=10, save_every=30, num_workers=0,
                synthetic_images=960, teacher_size=128)
DEMO_GPU = dict(model="vit_base", img_size=224, batch_size=256, steps=300, warmup_steps=30, log_every=10,
                save_every=100, num_workers=4, synthetic_images=8192, lr=1e-3)


class UsageError(ValueError):
    """A bad flag combination; printed as one line."""


class Stop(Exception):
    """End the run early with a message and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m urfm_fast.pretrain",
        description="URFM pretraining (masked ViT predicting BiomedCLIP features). Without --data: a short demo "
        "on synthetic ultrasound. Under torchrun: FSDP2/DDP across ranks.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given (demo presets fill the rest)
    )
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON file of flag values, keyed by the field names "
                   "below (batch_size: 256); flags given on the command line win; the run saves the resolved "
                   "values in its config.json")
    add_config_flags(p, TrainConfig)
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, dict, bool]:
    """-> (resolved config, the flags given, demo?)."""
    given = vars(build_parser().parse_args(argv))
    if "config" in given:  # the file's values, then the flags given on the command line over them
        given = {**read_config_values(given.pop("config"), TrainConfig, build_parser, ("data_weights",)), **given}
    if isinstance(given.get("data"), list) and len(given["data"]) == 1:  # one folder: a string, as always
        given["data"] = given["data"][0]
    saved = _saved_train_config(given["resume"], given.get("out")) if given.get("resume") else None
    if saved:  # continue with the run's own settings; flags given now override them
        demo = saved.pop("_demo")
        base = saved
        given.setdefault("out", saved.get("out"))
    else:
        demo = "data" not in given
        base = dict(DEMO_GPU if cuda_wanted(given.get("device", "auto")) else DEMO_CPU) if demo else {}
        if demo:
            base["teacher"] = demo_teacher()  # a real run keeps BiomedCLIP or the --teacher given
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in {**base, **given}.items() if k in names})
    check_train_config(cfg)  # every value in range before anything is built (train/checks.py)
    return cfg, given, demo


def biomedclip_in_cache(hub_id: str = HF_HUB_ID) -> bool:
    """Whether BiomedCLIP's weights are in the local Hugging Face cache (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo = hub_id.removeprefix("hf-hub:")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in BIOMEDCLIP_FILES)


def demo_teacher() -> str:
    """The demo's teacher when --teacher is not given: BiomedCLIP (the recipe) where its weights are in the
    Hugging Face cache, else EfficientNet-Lite0, whose ImageNet weights are installed with the package.
    The choice is stored in config.json, so a resumed demo keeps its teacher."""
    return HF_HUB_ID if biomedclip_in_cache() else EFFICIENTNET_LITE0


def demo_teacher_line(teacher: str) -> str:
    """One plain line: the teacher the demo chose, and why."""
    if teacher == HF_HUB_ID:
        return "Teacher: BiomedCLIP (the URFM recipe), its weights found in the Hugging Face cache."
    return ("Teacher: EfficientNet-Lite0 (ImageNet weights, installed with urfm_fast), as BiomedCLIP's weights "
            "are not in the Hugging Face cache; --teacher PATH uses a downloaded BiomedCLIP.")


def cuda_wanted(device: str) -> bool:
    """The one CUDA decision: --device auto or cuda, and a GPU visible (cuda without one is refused
    where the device is set up)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def _saved_train_config(resume: str, out: str | None) -> dict | None:
    """The train config stored by the run being resumed (config.json of the run or the checkpoint)."""
    from urfm_fast.checkpoints.runs import CONFIG_FILE, RUN_KIND  # imports torch: after parsing, not for --help

    places = []
    if resume != "latest":
        p = Path(resume).expanduser()
        places += [p if p.is_dir() else p.parent, p.parent, p.parent.parent]
    if out:
        places.append(Path(out).expanduser())
    for place in places:
        f = place / CONFIG_FILE
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if d.get("kind") == RUN_KIND:
            return dict(d["train"], _demo=d.get("demo", False))
    return None


# =============================================================================================
# Distributed init


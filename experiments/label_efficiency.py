"""Does URFM pretraining buy label efficiency? Five arms, one ViT, one budget, on CPU; and on a GPU, a curve.

    pip install -e ".[experiments]"
    python experiments/label_efficiency.py --out docs   # the committed run (docs/label_efficiency.md)
    python experiments/label_efficiency.py --teacher /path/to/BiomedCLIP --out runs/le   # BiomedCLIP teacher
    python experiments/label_efficiency.py --out docs --name label_efficiency_tradeoff \
        --arms distill,urfm,pixel,random --pretrain-seeds 0,1 --no-finetune   # docs/label_efficiency_tradeoff.md
    bash experiments/gpu_method.sh              # = --preset gpu: the curve on one H100/H200 in <= 300 s (--plan)

Arms (same ViT, initial weights, images, batches, masks, optimizer and number of steps):
1. ``urfm``                : the student predicts the frozen pretrained teacher's patch features of the
                             masked patches (cosine loss). Teacher: ``--teacher`` (default ImageNet
                             EfficientNet-Lite0, stride-16 map resampled to the student's patch grid).
2. ``urfm_random_teacher`` : the same, with the teacher's architecture at random initialisation.
3. ``pixel``               : MAE's objective through the same model (per-patch normalised pixels, MSE).
4. ``random``              : no pretraining (the common initial weights).
5. ``teacher``             : the pretrained teacher's own features, average-pooled (a reference ceiling;
                             linear probe and k-NN only).
Also (``--arms``): ``distill``, the urfm student with mask ratio 0 and the loss on every token (feature
distillation); ``--mask-ratios 0,0.25,0.5,0.75`` adds the urfm recipe at each ratio (``urfm_m0.25``...);
``--pretrain-seeds 0,1`` pretrains every arm once per seed (initial weights, batches, masks) and the tables
pool the seeds with their spread. Arms run one at a time and the outputs are rewritten after each.

The curve (``--budget-s``, ``--probe-points``; ``--preset gpu`` sets them): each arm trains for a time budget
on ``--device`` (images rendered there and kept as uint8, teacher targets cached there, bf16 autocast with
``--amp``), and its encoder is probed (linear, k-NN) at fractions of the budget, so the result is probe
quality against samples seen; ``label_efficiency_gpu.{md,json}`` are rewritten after every probe point.

Pretraining images are synthetic (seed 0) without augmentation, so each teacher runs once per image
and its targets are cached. Evaluation (``urfm_fast.evaluate``): linear probe and k-NN at 1 %, 10 % and
100 % of the labels over ``--seeds``, fine-tuning at the first seed, on the labelled synthetic lesion
task (4 classes; train seed 1000, test seed 2000). ``--eval-split val`` scores on a separate
validation set (seed 3000) instead: use it, never the test split, to choose any setting.
Real scans: each URFM arm's pretraining loss on held-out real ultrasound frames (the DICOM test files of
pydicom-data and deid-data, run through ``urfm_fast.prepare``), against its initial weights.
Writes ``label_efficiency.{md,png,json}`` to ``--out``.

Time of the committed run on an idle 2-core CPU: 6.2 min (12 CPU-minutes): teacher targets 21 s, each
pretrained arm 30 s, probes and fine-tuning (off with ``--no-finetune``) 4.2 min; 34.5 min when the
machine was shared with other jobs. ``--reuse`` evaluates the checkpoints of an earlier run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast import URFM, URFMConfig
from urfm_fast.config import EFFICIENTNET_LITE0, IMAGENET_MEAN, IMAGENET_STD, RECIPE_CHOICES
from urfm_fast.data import synthetic
from urfm_fast.data.augment import normalize
from urfm_fast.eval.backbones import Backbone, resolve_backbone
from urfm_fast.eval.config import EvalConfig
from urfm_fast.eval.data import Split
from urfm_fast.eval.report import format_table, plot, summarize
from urfm_fast.eval.run import run
from urfm_fast.model import ops
from urfm_fast.model.masking import attention_masking, split_ids
from urfm_fast.model.teacher import Targets, TeacherUnavailable, load_teacher
from urfm_fast.model.teacher.timm_model import timm_teacher

URFM_ARMS = ("urfm", "urfm_random_teacher")  # the masked recipe at --mask-ratio, with either teacher
SWEEP_PREFIX = "urfm_m"  # urfm_m0.5: the urfm arm at another mask ratio (--mask-ratios)
EVAL_SEEDS = {"train": 1000, "test": 2000, "val": 3000}
# DICOM test files with ultrasound frames (pydicom-data, deid-data): never used for training.
PYDICOM_US = ("US1_UNCR.dcm", "color3d_jpeg_baseline.dcm", "gdcm-US-ALOKA-16.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm")
DEID_US = ("GREYSCALE_IMAGE.dcm", "RGB_IMAGE.dcm", "ultrasound-multiframe.dcm", "GREYSCALE_CINE.zip",
           "RGB_CINE.zip")


# ---------------------------------------------------------------------------------------------
# Teachers and targets


def random_teacher_like(spec: str, grid: int, input_size: int | None):
    """The pretrained teacher's architecture at random initialisation (timm's init, seed 0)."""
    import timm

    torch.manual_seed(0)
    if spec in (EFFICIENTNET_LITE0, "efficientnet-lite0"):
        name = "tf_efficientnet_lite0"
    elif spec.startswith("timm:"):
        name = spec.removeprefix("timm:").partition("=")[0]
    else:  # BiomedCLIP or an open_clip tower: BiomedCLIP's ViT-B/16 at random init
        return load_teacher("random", grid=grid)
    t = timm_teacher(name, None, grid, input_size, model=timm.create_model(name, pretrained=False))
    t.source = f"random {name}"
    return t


@torch.no_grad()
def teacher_targets(teacher, images01: torch.Tensor, grid: int, batch: int = 64, cls: bool = False,
                    saliency: bool = False):
    """[N, 3, S, S] in [0, 1] -> [N, grid*grid, D]: computed once per image (no augmentation). With ``cls`` or
    ``saliency`` (MILAN's loss on CLS, attention masking): ``Targets`` of the whole set, from the same passes."""
    parts = [teacher(as01(images01[i : i + batch]), grid, cls=cls, saliency=saliency)
             for i in range(0, len(images01), batch)]
    if not (cls or saliency):
        return torch.cat(parts)
    return Targets(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))


def target_stats(targets, center: bool, std: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(shift, scale) for the teacher targets of the pretraining images ([N, n, D], or ``Targets``: from
    its patch tokens), or None (raw targets).

    ``center``: subtract each grid position's mean target, so the layout every image shares does not
    dominate the cosine loss; ``std``: standardise each channel (after centring, if asked)."""
    tokens = targets.tokens if isinstance(targets, Targets) else targets
    if not (center or std):
        return None
    shift = tokens.mean(0) if center else tokens.mean((0, 1))  # (n, D) or (D,)
    scale = (tokens - shift).std((0, 1)) + 1e-6 if std else torch.ones(tokens.shape[-1], device=tokens.device)
    return shift, scale


def apply_stats(targets, stats):
    """Targets shifted and scaled by ``target_stats``. A CLS row (a CNN teacher's spatially pooled map) is
    shifted by the positions' mean shift: the pooled map's mean over the same images."""
    if stats is None:
        return targets
    shift, scale = stats
    if not isinstance(targets, Targets):
        return (targets - shift) / scale
    cls = None if targets.cls is None else (targets.cls - (shift.mean(0) if shift.dim() == 2 else shift)) / scale
    return targets._replace(tokens=(targets.tokens - shift) / scale, cls=cls)


class PooledTeacher(nn.Module):
    """The teacher as a backbone for the probes: its feature map averaged over space."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.teacher.feature_map(x01).mean((2, 3))


# ---------------------------------------------------------------------------------------------
# Pretraining


def pixel_targets(imgs_norm: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's norm_pix target: [B,3,H,W] -> [B, N, p*p*3], each patch normalised to mean 0, var 1."""
    B, C, H, W = imgs_norm.shape
    x = imgs_norm.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C), MAE order
    x = x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


def pixel_mae_loss(model: URFM, imgs: torch.Tensor, target: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """MAE's loss through URFM's encoder/decoder: MSE on the masked patches' normalised pixels."""
    K = model.cfg.num_visible
    ids_keep, ids_mask, ids_restore = split_ids(ids_shuffle, K)
    x = model.forward_decoder(model.forward_encoder(imgs, ids_keep), ids_restore)  # (B, 1+N, Dd)
    x = torch.gather(x[:, 1:], 1, ids_mask[..., None].expand(-1, -1, x.shape[-1]))  # (B, N-K, Dd)
    t = torch.gather(target, 1, ids_mask[..., None].expand(-1, -1, target.shape[-1]))  # (B, N-K, T)
    return F.mse_loss(model.decoder_pred(x), t)


def build_student(cfg: URFMConfig, init: dict) -> URFM:
    """URFM(cfg) with the common initial weights; only ``decoder_pred`` (its width is the target's) differs."""
    torch.manual_seed(0)
    model = URFM(cfg)
    own = model.state_dict()
    model.load_state_dict({k: v if v.shape == own[k].shape else own[k] for k, v in init.items()})
    return model


def teacher_arm(arm: str) -> bool:
    """Arms that learn from teacher targets (every arm but ``pixel`` and ``random``)."""
    return arm in URFM_ARMS or arm == "distill" or arm.startswith(SWEEP_PREFIX)


def arm_recipe(arm: str, a) -> dict:
    """The URFMConfig fields an arm changes: ``distill`` = mask 0 and the loss on every token (feature
    distillation); ``urfm_m<r>`` = the urfm recipe at mask ratio r; the others keep the flags' recipe."""
    if arm == "distill":
        return dict(mask_ratio=0.0, loss_on="all_cls" if a.loss_on == "all_cls" else "all")
    if arm.startswith(SWEEP_PREFIX):
        return dict(mask_ratio=float(arm.removeprefix(SWEEP_PREFIX)))
    return {}


def arm_names(a) -> list[str]:
    """--arms, then one arm per --mask-ratios value not already there (0: distill; --mask-ratio: urfm)."""
    arms = [x for x in a.arms.split(",") if x]
    for r in (float(x) for x in (a.mask_ratios or "").split(",") if x):
        name = "distill" if r == 0 else "urfm" if r == a.mask_ratio else f"{SWEEP_PREFIX}{r:g}"
        if name not in arms:
            arms.append(name)
    return arms


def as01(images: torch.Tensor) -> torch.Tensor:
    """Images as float RGB in [0, 1]: uint8 grey [B, 1, S, S] (the device-resident store) is converted per batch."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(255).expand(-1, 3, -1, -1)


class Clock:
    """Seconds of training, paused while the encoder is probed; on CUDA, synchronised when read."""

    def __init__(self, device: torch.device):
        self.device, self.spent, self.t0 = device, 0.0, time.perf_counter()

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.spent + time.perf_counter() - self.t0

    def pause(self) -> None:
        self.spent, self.t0 = self.read(), None

    def resume(self) -> None:
        self.t0 = time.perf_counter()


def lr_factor(step: int, a, clock: Clock | None) -> float:
    """Linear warm-up over the first 10 % of the run, then cosine to 0: of ``--steps`` (by step) or of
    ``--budget-s`` (by training seconds, read every step on CPU and every 10 steps on CUDA)."""
    if clock is None:
        warmup = max(1, a.steps // 10)
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, a.steps - warmup)))
        return (step + 1) / warmup if step < warmup else cosine
    t = min(1.0, clock.spent / a.budget_s)
    return max(t / 0.1, 1e-3) if t < 0.1 else 0.5 * (1 + math.cos(math.pi * (t - 0.1) / 0.9))


def train_step(arm: str, model: URFM, opt, imgs01: torch.Tensor, targets, ids_shuffle, amp: bool) -> torch.Tensor:
    """One optimizer step; returns the loss (a tensor: reading it would synchronise a GPU)."""
    tokens, cls_t = targets
    imgs = normalize(imgs01, IMAGENET_MEAN, IMAGENET_STD)
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=amp):
        if arm == "pixel":
            loss = pixel_mae_loss(model, imgs, pixel_targets(imgs, model.cfg.patch_size), ids_shuffle)
        else:
            loss = model(imgs, tokens, ids_shuffle, cls_t)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def pretrain(arm: str, model: URFM, images01: torch.Tensor, targets, a, seed: int | None = None,
             on_point=None) -> list[float]:
    """``targets``: the patch targets [N, n, D], or ``Targets`` (with the CLS and saliency MILAN's switches use).
    ``seed`` (default ``a.seed``): the batches and masks, the same in every arm. The model, images and targets
    live on one device. ``--budget-s``: train for that many seconds instead of ``--steps``; ``on_point(fraction,
    step, seconds)`` is called (training clock paused) at each of ``--probe-points`` and at the end, with the
    training seconds so far (None without ``--budget-s``)."""
    cfg, dev = model.cfg, images01.device
    tokens, cls_t, keep = targets if isinstance(targets, Targets) else (targets, None, None)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=a.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    g = torch.Generator().manual_seed(a.seed if seed is None else seed)  # the same batches and masks in every arm
    budget = getattr(a, "budget_s", 0.0)
    clock = Clock(dev) if budget else None
    points = sorted(float(x) for x in (getattr(a, "probe_points", "") or "").split(",") if x)
    n, losses, pending, step = len(images01), [], [], 0
    sync_every = 10 if dev.type == "cuda" else 1
    model.train()
    while (clock.spent < budget if clock else step < a.steps):
        idx = torch.randint(0, n, (a.batch,), generator=g)
        noise = torch.rand(a.batch, cfg.num_patches, generator=g)  # the same draws whatever the masking
        ids_shuffle = attention_masking(keep[idx.to(dev)].cpu(), noise=noise) if cfg.mask_type == "attention" \
            else noise.argsort(1)
        f = lr_factor(step, a, clock)
        for group in opt.param_groups:
            group["lr"] = a.lr * f
        idx_d = idx.to(dev, non_blocking=True)
        batch_targets = (None, None) if arm == "pixel" else (tokens[idx_d], None if cls_t is None else cls_t[idx_d])
        pending.append(train_step(arm, model, opt, as01(images01[idx_d]), batch_targets, ids_shuffle.to(dev),
                                  getattr(a, "amp", False)))
        step += 1
        if step % sync_every == 0 or not clock and step == a.steps:
            losses += check_losses(arm, pending, step)
            pending = []
            if clock:
                clock.spent, clock.t0 = clock.read(), time.perf_counter()
        progress = clock.spent / budget if clock else step / a.steps
        if clock and not pending and step % 500 == 0:
            print(f"  [{arm}] step {step:6d} {clock.spent:6.1f}/{budget:g}s loss {losses[-1]:.4f} lr {a.lr * f:.2e}",
                  flush=True)
        elif not clock and ((step - 1) % max(1, a.steps // 5) == 0 or step == a.steps):
            print(f"  [{arm}] step {step - 1:5d}/{a.steps} loss {losses[-1]:.4f} lr {a.lr * f:.2e}", flush=True)
        while points and on_point and points[0] < 1 and progress >= points[0]:
            clock.pause() if clock else None
            on_point(points.pop(0), step, clock.spent if clock else None)
            clock.resume() if clock else None
    losses += check_losses(arm, pending, step)
    if on_point:
        on_point(1.0, step, clock.read() if clock else None)
    return losses


def check_losses(arm: str, pending: list[torch.Tensor], step: int) -> list[float]:
    """The losses as floats (one synchronisation for a batch of steps); a non-finite one stops the run."""
    if not pending:
        return []
    values = torch.stack(pending).float().tolist()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise FloatingPointError(f"{arm}: loss {v} at step {step - len(values) + i}")
    return values


@torch.no_grad()
def held_out_loss(model: URFM, images01: torch.Tensor, targets, seed: int = 123) -> float:
    """Mean URFM loss on images never trained on, with fixed random masks (the same for every model)."""
    model.eval()
    targets, cls_t, _ = targets if isinstance(targets, Targets) else (targets, None, None)
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(images01), 64):
        x = normalize(images01[i : i + 64], IMAGENET_MEAN, IMAGENET_STD)
        ids = torch.rand(len(x), model.cfg.num_patches, generator=g).argsort(1)
        total += model(x, targets[i : i + 64], ids, None if cls_t is None else cls_t[i : i + 64])[0].item() * len(x)
        n += len(x)
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# Data


def synthetic01(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = synthetic.generate(n, size=size, seed=seed)
    return x.float().div(255).expand(-1, 3, -1, -1).contiguous(), y


def real_frames(size: int, workdir: Path) -> tuple[torch.Tensor, int]:
    """Held-out real ultrasound frames: pydicom-data/deid-data DICOM test files -> urfm_fast.prepare ->
    centre square crops at ``size`` px, [N, 3, S, S] in [0, 1]. Empty when neither package is installed."""
    from urfm_fast.data import ShardDataset, convert
    from urfm_fast.data.sources import PrepareError

    files = []
    try:
        from pydicom.data import get_testdata_file

        files += [p for p in (get_testdata_file(n) for n in PYDICOM_US) if p]
    except Exception:  # pydicom-data missing: get_testdata_file would try to download
        pass
    try:
        import deid_data

        us = Path(deid_data.__file__).parent / "data" / "ultrasounds"
        files += [str(us / n) for n in DEID_US if (us / n).exists()]
    except ImportError:
        pass
    if not files:
        return torch.empty(0, 3, size, size), 0
    src = workdir / "real_src"
    src.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):  # neutral names: no file name of the source reaches any output
        link = src / f"scan{i:02d}{Path(f).suffix}"
        if not link.exists():
            os.symlink(f, link)
    try:
        convert.prepare([src], workdir / "real_shards", short_side=size, frame_stride=10, workers=1, progress=False)
    except PrepareError as e:  # e.g. the de-identification's text detector is not installed: a logged skip
        print(f"held-out real frames skipped: {e}", flush=True)
        return torch.empty(0, 3, size, size), 0
    ds = ShardDataset(workdir / "real_shards")
    crops = []
    for i in range(len(ds)):
        img = ds[i]
        h, w = img.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        crops.append(img[:, top : top + size, left : left + size])
    x = torch.stack(crops).float().div(255).expand(-1, 3, -1, -1).contiguous()
    return x, len(files)


# ---------------------------------------------------------------------------------------------
# Driver


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="folder for label_efficiency.{md,png,json}")
    p.add_argument("--ckpt-dir", default="runs/label_efficiency", help="the arms' checkpoints")
    p.add_argument("--teacher", default=EFFICIENTNET_LITE0, help="the pretrained teacher (any --teacher of "
                   "urfm_fast.pretrain: efficientnet_lite0, timm:MODEL=FILE, open_clip:MODEL=FILE, BiomedCLIP path)")
    p.add_argument("--teacher-size", type=int, default=128,
                   help="teacher input size (0: the teacher's own; 128 keeps EfficientNet-Lite0 cheap on CPU)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8, help="student patch size (8: the teacher's own 8x8 grid at 128px)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--decoder-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--mask-ratios", default="", help="also pretrain the urfm recipe at these mask ratios, e.g. "
                   "0,0.25,0.5,0.75 (0: the distill arm; --mask-ratio: the urfm arm; r: an arm urfm_m<r>)")
    p.add_argument("--target-norm", action="store_true", help="LayerNorm the teacher targets (MaskDistill)")
    p.add_argument("--target-std", action="store_true",
                   help="standardise each target channel over the pretraining set (removes the component all "
                        "images share, which dominates a cosine loss on non-negative CNN features)")
    p.add_argument("--target-center", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract each grid position's mean target over the pretraining images (the layout all "
                        "images share) before the loss; held-out losses use the same shift")
    p.add_argument("--loss-on", default="masked", choices=list(RECIPE_CHOICES["loss_on"]),
                   help="all_cls: every patch and the CLS token, against the teacher's CLS (MILAN)")
    p.add_argument("--mask-type", default="random", choices=["random", "attention"],
                   help="attention: visible patches sampled by the teacher's saliency (MILAN)")
    p.add_argument("--decoder", default="standard", choices=list(RECIPE_CHOICES["decoder"]),
                   help="prompting: only the mask tokens pass through the decoder (MILAN)")
    p.add_argument("--pretrain-images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-train", type=int, default=2000)
    p.add_argument("--eval-n", type=int, default=1000, help="images of the evaluation split")
    p.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="score on the test split (reported) or a separate validation split (to choose settings)")
    p.add_argument("--seeds", default="0,1,2", help="probe seeds; fine-tuning uses the first")
    p.add_argument("--pool", default="token", choices=["token", "avg"],
                   help="the ViT arms' feature for the probes and fine-tuning: CLS token or mean of patch tokens")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-min-steps", type=int, default=30)
    p.add_argument("--ft-batch", type=int, default=32)
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--arms", default="urfm,urfm_random_teacher,pixel,random",
                   help="ViT arms to pretrain and evaluate (ablations: a subset, on --eval-split val); also "
                        "distill (mask 0, loss on every token: feature distillation)")
    p.add_argument("--reuse", action="store_true", help="take the arms' checkpoints from --ckpt-dir (an earlier "
                   "run with the same pretraining settings) instead of pretraining again")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="pretraining images; initial weights, batches and masks "
                   "unless --pretrain-seeds")
    p.add_argument("--pretrain-seeds", default="", help="pretrain every arm once per seed (initial weights, batches, "
                   "masks; the images stay --seed's), e.g. 0,1: tables pool the seeds, with their spread")
    p.add_argument("--name", default="label_efficiency", help="file name of the outputs in --out")
    g = p.add_argument_group("the curve: probes along each arm's run, on a GPU (--preset gpu)")
    g.add_argument("--preset", choices=list(PRESETS), help="defaults for a run (flags given still win); gpu: the "
                   "CPU architecture at ~100x its samples in <= 300 s on one H100/H200 (see --plan)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: images, teacher targets, student and "
                   "batches all live there")
    g.add_argument("--amp", action="store_true", help="bf16 autocast for the student and the teacher")
    g.add_argument("--budget-s", type=float, default=0.0, help="train each arm for this many seconds (probes "
                   "excluded) instead of --steps; the steps taken are recorded. Turns on the curve")
    g.add_argument("--probe-points", default="", help="fractions of each arm's run at which its encoder is probed "
                   "(linear + k-NN), e.g. 0.125,0.25,0.5; the end is always probed")
    g.add_argument("--probe-fractions", default="0.01,0.1,1", help="label fractions of the curve's probes")
    g.add_argument("--deadline-s", type=float, default=0.0, help="the whole run's seconds from start: an arm that "
                   "would overrun gets a shorter budget (said in the report)")
    g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="the student's hot path (URFM_KERNELS); the gpu preset uses torch (SDPA): the recipe's "
                        "answer must not hang on the kernels that bench/gpu_check.sh is there to check")
    g.add_argument("--plan", action="store_true", help="print the phases and their time budgets; run nothing")
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"],
                   help="segmentation: the arms under a linear dense probe on lesion masks (dense_probe.py)")
    _dense_probe().add_arguments(p)
    return p


def _dense_probe():
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside this file, however it was loaded
    import dense_probe

    return dense_probe


def parse_args(argv=None):
    """Flags, with ``--preset``'s values as defaults (any flag given on the command line wins)."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.preset:
        p.set_defaults(**PRESETS[a.preset])
        a = p.parse_args(argv)
    return a


def arm_label(arm: str, seed: int, a) -> str:
    """The backbone's name in the results: the arm, with ``@s<seed>`` when there are several pretraining seeds."""
    return f"{arm}@s{seed}" if len(pretrain_seeds(a)) > 1 else arm


def pretrain_seeds(a) -> list[int]:
    return [int(x) for x in a.pretrain_seeds.split(",")] if a.pretrain_seeds else [a.seed]


def pretrain_arms(a, cfg: URFMConfig, teachers: dict, images01: torch.Tensor, ckpt_dir: Path,
                  seed: int | None = None, only: list[str] | None = None) -> dict:
    """Pretrain every arm (or ``only`` these) from the common init of ``seed`` (initial weights, batches, masks;
    default ``a.seed``); returns per-arm checkpoint path, loss curve and seconds, keyed by ``arm_label``."""
    seed = a.seed if seed is None else seed
    torch.manual_seed(seed)
    init = URFM(cfg).state_dict()  # the common starting point
    out = {}
    for arm in only or arm_names(a):
        t0 = time.perf_counter()
        width = teachers[teacher_key(arm)].out_dim if teacher_arm(arm) else cfg.patch_size**2 * 3  # pixel: p*p*3
        arm_cfg = URFMConfig.from_dict({**cfg.to_dict(), "target_dim": width, **arm_recipe(arm, a)})
        model = build_student(arm_cfg, init)
        label = arm_label(arm, seed, a)
        path = ckpt_dir / f"{label}.pth"
        args = dict(model="vit_tiny", objective=arm, steps=a.steps, batch=a.batch, img_size=a.img_size,
                    pretrain_images=a.pretrain_images, lr=a.lr, seed=seed)
        if a.reuse:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            same_cfg = URFMConfig.from_dict(saved["config"]).to_dict() == arm_cfg.to_dict()  # defaults filled in
            if saved["args"].get("steps") != a.steps or not same_cfg:
                raise SystemExit(f"error: --reuse: {path} was pretrained with other settings")
            model.load_state_dict(saved["model"])
            out[label] = dict(path=path, curve=saved.get("pretrain_loss", []), seconds=0.0, model=model, arm=arm,
                              seed=seed)
            continue
        targets = teachers.get(f"{teacher_key(arm)}_targets")
        curve = [] if arm == "random" else pretrain(arm, model, images01, targets, a, seed)
        torch.save({"model": model.state_dict(), "epoch": 0, "step": len(curve), "args": args,
                    "config": arm_cfg.to_dict(), "pretrain_loss": curve}, path)
        out[label] = dict(path=path, curve=curve, seconds=time.perf_counter() - t0, model=model, arm=arm,
                          seed=seed)
        print(f"{label}: {out[label]['seconds']:.0f}s", flush=True)
    return out


def teacher_key(arm: str) -> str:
    """Which teacher's targets an arm learns from: ``urfm`` (the pretrained one) or ``urfm_random_teacher``."""
    return "urfm_random_teacher" if arm == "urfm_random_teacher" else "urfm"


def real_scan_losses(a, arms: dict, teachers: dict, cfg: URFMConfig, held_synth: torch.Tensor,
                     real: tuple[torch.Tensor, int]) -> dict:
    """Each teacher arm's loss (trained vs. its initial weights) on held-out synthetic and real frames. Each arm
    is scored with its own recipe: ``distill``'s loss covers every token, the masked arms' the masked ones."""
    real, n_files = real
    res = {"real_files": n_files, "real_frames": len(real), "synthetic_frames": len(held_synth)}
    targets, inits = teachers.setdefault("held_out_targets", {}), {}
    for label, v in arms.items():
        arm = v["arm"]
        if not teacher_arm(arm):
            continue
        key = teacher_key(arm)
        if v["seed"] not in inits:  # the common initial weights of that pretraining seed
            torch.manual_seed(v["seed"])
            inits[v["seed"]] = URFM(cfg).state_dict()
        start = build_student(v["model"].cfg, inits[v["seed"]])
        for name, imgs in (("synthetic", held_synth), ("real", real)):
            if not len(imgs):
                continue
            if (key, name) not in targets:
                tg = teacher_targets(teachers[key], imgs, cfg.grid_size, cls=cfg.loss_on == "all_cls")
                targets[key, name] = apply_stats(tg, teachers.get(f"{key}_stats"))
            tg = targets[key, name]
            res[f"{label}/{name}"] = dict(trained=held_out_loss(v["model"], imgs, tg),
                                          init=held_out_loss(start, imgs, tg))
    return res


def evaluate_arms(a, arms: dict, teacher, seeds: list[int], with_teacher: bool = True) -> list[dict]:
    """Linear probe and k-NN (+ fine-tuning at the first seed) of every arm in ``arms``, and of the teacher's
    pooled map when ``with_teacher``."""
    x, y = synthetic.generate(a.eval_train, size=a.img_size, seed=EVAL_SEEDS["train"])
    xe, ye = synthetic.generate(a.eval_n, size=a.img_size, seed=EVAL_SEEDS[a.eval_split])
    splits = {"train": Split(x.expand(-1, 3, -1, -1).contiguous(), y),
              a.eval_split: Split(xe.expand(-1, 3, -1, -1).contiguous(), ye)}
    classes = list(synthetic.CLASSES)
    backbones = [resolve_backbone(f"{label}={arms[label]['path']}", "vit_tiny", a.pool, None) for label in arms]
    ceiling = Backbone("teacher", teacher.source, lambda num_classes=0, drop_path_rate=0.0: PooledTeacher(teacher),
                       (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), a.img_size,
                       {"format": "teacher", "source": teacher.source, "trainable": False})
    dev = torch.device("cpu")
    records = run(backbones + [ceiling] * with_teacher, splits, classes, ["linear", "knn"], [0.01, 0.1, 1.0],
                  seeds, dev)
    if not a.no_finetune:
        records += run(backbones, splits, classes, ["finetune"], [0.01, 0.1, 1.0], seeds[:1], dev,
                       EvalConfig(ft_epochs=a.ft_epochs, ft_min_steps=a.ft_min_steps, ft_batch_size=a.ft_batch))
    return records


def pooled_summary(records: list[dict]) -> list[dict]:
    """``summarize`` over every pretraining seed of an arm (``urfm@s0``, ``urfm@s1`` -> ``urfm``): mean ± std
    over all pretraining x probe seeds, and ``accuracy_seed_std``, the std of the pretraining seeds' means."""
    base = lambda label: label.partition("@s")[0]
    per_seed: dict[tuple, list[float]] = {}
    for row in summarize(records):
        per_seed.setdefault((base(row["backbone"]), row["protocol"], row["fraction"]), []).append(row["accuracy"])
    out = summarize([{**r, "backbone": base(r["backbone"])} for r in records])
    for row in out:
        means = torch.tensor(per_seed[row["backbone"], row["protocol"], row["fraction"]], dtype=torch.float64)
        row["pretrain_seeds"] = len(means)
        row["accuracy_seed_std"] = float(means.std()) if len(means) > 1 else 0.0
    return out


def target_check(summary: list[dict]) -> list[dict]:
    """urfm against pixel and random at 1 % and 10 %: the margin and the larger of the two std."""
    cell = {(r["backbone"], r["protocol"], r["fraction"]): r for r in summary}
    rows = []
    for protocol in ("linear", "knn"):
        for frac in (0.01, 0.1):
            u = cell.get(("urfm", protocol, frac))
            for other in ("pixel", "random"):
                o = cell.get((other, protocol, frac))
                if u and o:
                    std = max(u["accuracy_std"], o["accuracy_std"])
                    margin = u["accuracy"] - o["accuracy"]
                    rows.append(dict(protocol=protocol, fraction=frac, versus=other, margin=margin, std=std,
                                     met=margin > 2 * std))
    return rows


def headline_table(summary: list[dict]) -> str:
    """Accuracy per arm: mean ± std over every run (pretraining x probe seeds), and with several pretraining
    seeds the std of their means in brackets."""
    cell = {(r["backbone"], r["protocol"], r["fraction"]): r for r in summary}
    arms = list(dict.fromkeys(r["backbone"] for r in summary))
    cols = [(p, f) for p in ("linear", "knn") for f in (0.01, 0.1, 1.0)]
    head = "| arm | " + " | ".join(f"{'k-NN' if p == 'knn' else p} {f:.0%}" for p, f in cols) + " |"

    def fmt(r):
        if r is None:
            return "-"
        seeds = f" [{100 * r['accuracy_seed_std']:.1f}]" if r.get("pretrain_seeds", 1) > 1 else ""
        return f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}{seeds}"

    rows = [f"| {arm} | " + " | ".join(fmt(cell.get((arm, p, f))) for p, f in cols) + " |" for arm in arms]
    return "\n".join([head, "|---" * (len(cols) + 1) + "|", *rows])


def recipe_text(a, arms: dict) -> str:
    """One phrase per pretrained arm: its mask ratio and loss."""
    seen = {}
    for v in arms.values():
        c = v["model"].cfg
        seen.setdefault(v["arm"], f"`{v['arm']}` mask {c.mask_ratio:g}, loss on {c.loss_on}"
                        + (" (pixels)" if v["arm"] == "pixel" else ""))
    return "; ".join(x for k, x in seen.items() if k != "random")


def write_outputs(a, argv, out: Path, cfg, teacher, arms, losses, records, summary, minutes,
                  cpu_minutes: float = 0.0) -> None:
    cmd = "python experiments/label_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    checks = target_check(summary)
    curve = ", ".join(f"{k} {v['curve'][0]:.3f} -> {sum(v['curve'][-50:]) / len(v['curve'][-50:]):.3f}"
                      for k, v in arms.items() if v["curve"])
    loss_rows = "\n".join(f"| {k} | {v['init']:.3f} | {v['trained']:.3f} |" for k, v in losses.items()
                           if isinstance(v, dict))
    check_rows = "\n".join(f"| {c['protocol']} | {c['fraction']:g} | {c['versus']} | {100 * c['margin']:+.1f} | "
                           f"{100 * c['std']:.1f} | {'yes' if c['met'] else 'no'} |" for c in checks)
    title = f"Synthetic lesions, {a.img_size}px ViT-Ti/{a.patch} x{a.depth}, teacher {teacher.source}"
    name = a.name
    plot(summary, out / f"{name}.png", title=title)
    (out / f"{name}.md").write_text(
        f"# Label efficiency on synthetic lesions (teacher: {teacher.source})\n\n"
        f"`{cmd.strip()}`: {minutes:.1f} min with {a.threads} CPU threads ({cpu_minutes:.1f} CPU-minutes, user + "
        f"system; load average {os.getloadavg()[1]:.1f} over the last 5 minutes of the run).\n\n"
        f"Pretraining: {a.pretrain_images} synthetic images (no augmentation; teacher targets cached), "
        f"{a.steps} steps x {a.batch}, AdamW lr {a.lr}, pretraining seeds {a.pretrain_seeds or a.seed} "
        f"(initial weights, batches, masks; images seed {a.seed}), mask {a.mask_ratio}, "
        f"ViT-Ti width 192 x {a.depth} blocks, "
        f"{a.img_size}px, patch {a.patch} ({cfg.num_patches} tokens), decoder {a.decoder_dim}d{a.decoder_depth}b, "
        f"target norm {a.target_norm}, centred {a.target_center}, standardised {a.target_std}, loss on {a.loss_on}, "
        f"masking {a.mask_type}, decoder {a.decoder}. "
        f"Teacher input {teacher.input_size}px, "
        f"{teacher.out_dim}-d map resampled to {cfg.grid_size}x{cfg.grid_size}. "
        f"Loss (first step -> mean of the last 50): {curve}.\n\n"
        f"Evaluation on the `{a.eval_split}` split: {a.eval_train} labelled train / {a.eval_n} images, "
        f"linear probe and k-NN over seeds {a.seeds}, "
        + ("no fine-tuning (--no-finetune); " if a.no_finetune else
           f"fine-tuning seed {a.seeds.split(',')[0]} only (std 0); ") +
        "`teacher` = the pretrained teacher's pooled map (probes only). Accuracy etc. in %, mean ± std.\n\n"
        f"Arms: {recipe_text(a, arms)}.\n\n## Accuracy (%), mean ± std over all runs [std of the pretraining "
        "seeds' means]\n\n" + headline_table(summary) + "\n\n## Every metric\n\n"
        + format_table(summary, markdown=True) + f"\n\n![label efficiency]({name}.png)\n\n"
        "## Target: urfm beats pixel and random by more than 2 std (accuracy, points)\n\n"
        "| protocol | fraction | versus | margin | larger std | met |\n|---|---|---|---|---|---|\n"
        + check_rows + "\n\n## URFM loss on held-out frames (fixed masks)\n\n"
        f"{losses.get('real_frames', 0)} real ultrasound frames from {losses.get('real_files', 0)} DICOM test "
        f"files (pydicom-data, deid-data) through `urfm_fast.prepare`, centre {a.img_size}px crops; "
        f"{losses['synthetic_frames']} unseen synthetic images. Each arm's student against its own initial "
        "weights, each with its own teacher's targets.\n\n| arm/frames | init | trained |\n|---|---|---|\n"
        + loss_rows + "\n")
    (out / f"{name}.json").write_text(json.dumps(dict(
        command=cmd.strip(), args=vars(a), teacher=teacher.source, minutes=round(minutes, 2),
        cpu_minutes=round(cpu_minutes, 2), load_average=[round(x, 2) for x in os.getloadavg()],
        threads=a.threads, summary=summary, target_check=checks, held_out_loss=losses, runs=records,
        pretrain_seconds={k: round(v["seconds"], 1) for k, v in arms.items()},
        pretrain_loss={k: v["curve"][::10] for k, v in arms.items()}), indent=1) + "\n")
    print(f"wrote {out}/{name}.{{md,png,json}} in {minutes:.1f} min", flush=True)


def student_config(a) -> URFMConfig:
    """The ViT-Ti student and its recipe, from the flags."""
    return URFMConfig.preset("vit_tiny", img_size=a.img_size, patch_size=a.patch, depth=a.depth,
                             decoder_embed_dim=a.decoder_dim, decoder_depth=a.decoder_depth, decoder_num_heads=4,
                             mask_ratio=a.mask_ratio, target_norm=a.target_norm, loss_on=a.loss_on,
                             mask_type=a.mask_type, decoder=a.decoder)


def pretrained_teacher(a, grid: int):
    """``--teacher`` for a student grid of ``grid`` patches per side; None (said on stderr) if it cannot load."""
    try:
        return load_teacher(a.teacher, grid=grid, input_size=a.teacher_size or None)
    except (TeacherUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------
# The curve: each arm trained for a time budget on one device, its encoder probed along the way

# --preset gpu: the CPU experiment's architecture, teacher and settings (chosen on the validation split on
# CPU; nothing here was tuned on a GPU) at ~100x its samples: the question is whether the 75 % mask wins back
# its place against distillation (mask 0) once samples are cheap. Batch 256 with lr 2e-3 (square-root scaling
# of the CPU's 1e-3 at 32, rounded down); 65,536 distinct images (the CPU run: 4,096); 3 trained arms x 50 s.
PRESETS = {
    "gpu": dict(device="cuda", amp=True, budget_s=50.0, probe_points="0.125,0.25,0.5", deadline_s=270.0,
                pretrain_images=65536, batch=256, lr=2e-3, arms="urfm,distill,pixel,random", seeds="0,1,2",
                no_finetune=True, threads=8, out="gpu_out", name="label_efficiency_gpu",
                ckpt_dir="runs/label_efficiency_gpu", kernels="torch"),
}
# Planned seconds of the phases around the arms' budgets (--plan); measured ones go in the report.
PLAN_STARTUP_S, PLAN_DATA_S, PLAN_PROBE_S, PLAN_MARGIN_S = 20, 35, 5, 25


def plan_phases(a) -> list[tuple[str, float]]:
    """(phase, seconds) of a curve run, start-up (python, torch, CUDA, teacher) included."""
    trained = [x for x in arm_names(a) if x != "random"]
    points = len([x for x in a.probe_points.split(",") if x and float(x) < 1]) + 1
    phases = [("start-up: python, torch, CUDA context, teacher weights", PLAN_STARTUP_S),
              (f"data: render {a.pretrain_images} + {a.eval_train + a.eval_n} images, teacher targets", PLAN_DATA_S),
              ("probe teacher and random (references)", 2 * PLAN_PROBE_S)]
    for arm in trained:
        phases += [(f"train {arm}", a.budget_s), (f"probe {arm} at {points} points", points * PLAN_PROBE_S)]
    return phases + [("write reports, margin", PLAN_MARGIN_S)]


def print_plan(a) -> int:
    phases = plan_phases(a)
    for name, sec in phases:
        print(f"{sec:6.0f} s  {name}")
    print(f"{sum(s for _, s in phases):6.0f} s  total (deadline for the arms: {a.deadline_s:g} s after start-up)")
    return 0


def render(n: int, size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images rendered on ``device``: uint8 grey [n, 1, S, S] (kept as is: 1/12 of float RGB) and labels."""
    x, y = synthetic.generate(n, size=size, seed=seed, device=device)
    return x, y.cpu()


@torch.no_grad()
def device_targets(a, teacher, images: torch.Tensor, cfg: URFMConfig):
    """The teacher's targets of the pretraining images, cached on their device (fp32), centred as on CPU."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=a.amp):
        tg = teacher_targets(teacher, images, cfg.grid_size, batch=1024 if images.device.type == "cuda" else 64,
                             cls=cfg.loss_on == "all_cls", saliency=cfg.mask_type == "attention")
    tg = Targets(*(None if t is None else t.float() for t in tg)) if isinstance(tg, Targets) else tg.float()
    return apply_stats(tg, target_stats(tg, a.target_center, a.target_std))


class CurveReport:
    """The curve's results: JSON and markdown rewritten after every probe point, so a kill keeps what finished."""

    def __init__(self, a, argv, out: Path, teacher, device: torch.device):
        self.a, self.out, self.t0 = a, out, time.perf_counter()
        self.cmd = "python experiments/label_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
        self.teacher, self.device = teacher.source, device
        self.name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        self.phases, self.arms, self.records, self.notes = [], {}, [], []

    def phase(self, name: str, seconds: float) -> None:
        self.phases.append(dict(phase=name, seconds=round(seconds, 1)))
        self.write()

    def point(self, arm: str, frac: float, step: int, train_s: float, records: list[dict]) -> None:
        for r in records:
            r.update(backbone=arm, point=frac, step=step, samples=step * self.a.batch, train_seconds=round(train_s, 1))
        self.records += records
        self.write()

    def table(self) -> str:
        rows = {}
        for r in self.records:
            rows.setdefault((r["backbone"], r["point"]), []).append(r)
        cols = [(p, f) for p in ("linear", "knn") for f in (0.01, 0.1, 1.0)]
        head = ("| arm | point | steps | samples | train s | "
                + " | ".join(f"{'k-NN' if p == 'knn' else p} {f:.0%}" for p, f in cols) + " |")
        lines = [head, "|---" * (5 + len(cols)) + "|"]
        for (arm, frac), rs in rows.items():
            cell = {(s["protocol"], s["fraction"]): s for s in summarize(rs)}
            acc = [cell.get(c) for c in cols]
            lines.append(f"| {arm} | {'-' if frac is None else f'{frac:g}'} | {rs[0]['step']} | {rs[0]['samples']} | "
                         f"{rs[0]['train_seconds']} | " + " | ".join(
                             "-" if c is None else f"{100 * c['accuracy']:.1f} ± {100 * c['accuracy_std']:.1f}"
                             for c in acc) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        a, minutes = self.a, (time.perf_counter() - self.t0) / 60
        versions = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if self.device.type == "cuda" else "")
        phases = "\n".join(f"| {p['phase']} | {p['seconds']} |" for p in self.phases)
        md = (f"# Probe quality against samples seen ({self.name})\n\n`{self.cmd.strip()}`: {minutes:.1f} min so far "
              f"on {self.name} ({versions}); rewritten after every probe point.\n\n"
              f"Student ViT-Ti width 192 x {a.depth} blocks, {a.img_size}px, patch {a.patch}, decoder {a.decoder_dim}d"
              f"{a.decoder_depth}b; teacher {self.teacher} at {a.teacher_size or 'its own'}px, targets centred "
              f"{a.target_center}; {a.pretrain_images} synthetic pretraining images rendered on the device; batch "
              f"{a.batch}, AdamW lr {a.lr}, warm-up 10 % then cosine over each arm's {a.budget_s:g} s; bf16 autocast "
              f"{a.amp}. Arms: urfm = mask {a.mask_ratio}, loss on the masked tokens; distill = mask 0, loss on "
              f"every token; pixel = MAE's normalised pixels at mask {a.mask_ratio}; random = the common initial "
              f"weights; teacher = its pooled map (ceiling). Probes: linear and k-NN on the `{a.eval_split}` split "
              f"({a.eval_train} labelled train / {a.eval_n} images), seeds {a.seeds}; accuracy in %, mean ± std over "
              "the probe seeds.\n\n" + self.table() + "\n\n## Phases (seconds)\n\n| phase | seconds |\n|---|---|\n"
              + phases + "\n" + "".join(f"\n- {n}" for n in self.notes) + "\n")
        _atomic_write(self.out / f"{a.name}.md", md)
        _atomic_write(self.out / f"{a.name}.json", json.dumps(dict(
            command=self.cmd.strip(), device=self.name, versions=versions, args=vars(a), teacher=self.teacher,
            minutes=round(minutes, 2), phases=self.phases, arms=self.arms, notes=self.notes,
            summary=self.summary(), runs=self.records), indent=1) + "\n")

    def summary(self) -> list[dict]:
        out = []
        for (arm, frac) in dict.fromkeys((r["backbone"], r["point"]) for r in self.records):
            rs = [r for r in self.records if (r["backbone"], r["point"]) == (arm, frac)]
            out += [dict(row, point=frac, step=rs[0]["step"], samples=rs[0]["samples"]) for row in summarize(rs)]
        return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def probe_checkpoint(a, label: str, path: Path, splits: dict, device: torch.device) -> list[dict]:
    """Linear probe and k-NN of a saved student (read back as evaluate reads any checkpoint)."""
    bb = resolve_backbone(f"{label}={path}", "vit_tiny", a.pool, None)
    return run([bb], splits, list(synthetic.CLASSES), ["linear", "knn"], fractions(a),
               [int(s) for s in a.seeds.split(",")], device, progress=lambda msg: None)


def fractions(a) -> list[float]:
    return [float(x) for x in a.probe_fractions.split(",")]


def arm_budget(a, t_start: float, arms_left: int) -> float:
    """--budget-s, or less when the arms left would run past --deadline-s (probes at their planned cost)."""
    if not a.deadline_s:
        return a.budget_s
    points = len([x for x in a.probe_points.split(",") if x and float(x) < 1]) + 1
    left = a.deadline_s - (time.perf_counter() - t_start) - arms_left * points * PLAN_PROBE_S
    return max(0.0, min(a.budget_s, left / max(1, arms_left)))


def main_curve(a, argv) -> int:
    t_start = time.perf_counter()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    ops.set_backend(a.kernels)
    cfg = student_config(a)
    teacher = pretrained_teacher(a, cfg.grid_size)
    if teacher is None:
        return 2
    teacher = teacher.to(dev)
    out, ckpt_dir = Path(a.out), Path(a.ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    report = CurveReport(a, argv, out, teacher, dev)
    report.phase("start-up in main (teacher to device)", time.perf_counter() - t_start)

    t0 = time.perf_counter()
    images, _ = render(a.pretrain_images, a.img_size, a.seed, dev)  # labels never used
    targets = device_targets(a, teacher, images, cfg)
    (x, y), (xe, ye) = (render(n, a.img_size, EVAL_SEEDS[k], dev) for n, k in ((a.eval_train, "train"),
                                                                                (a.eval_n, a.eval_split)))
    splits = {"train": Split(x.expand(-1, 3, -1, -1).contiguous(), y),
              a.eval_split: Split(xe.expand(-1, 3, -1, -1).contiguous(), ye)}
    report.phase(f"data: {a.pretrain_images} + {a.eval_train + a.eval_n} images rendered, teacher targets",
                 time.perf_counter() - t0)

    t0 = time.perf_counter()
    ceiling = Backbone("teacher", teacher.source, lambda num_classes=0, drop_path_rate=0.0: PooledTeacher(teacher),
                       (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), a.img_size,
                       {"format": "teacher", "source": teacher.source, "trainable": False})
    report.point("teacher", None, 0, 0.0, run([ceiling], splits, list(synthetic.CLASSES), ["linear", "knn"],
                                              fractions(a), [int(s) for s in a.seeds.split(",")], dev,
                                              progress=lambda msg: None))
    torch.manual_seed(a.seed)
    init = URFM(cfg).state_dict()  # the common starting point
    trained = [arm for arm in arm_names(a) if arm != "random"]
    for i, arm in enumerate(["random"] * ("random" in arm_names(a)) + trained):
        width = teacher.out_dim if teacher_arm(arm) else cfg.patch_size**2 * 3
        model = build_student(URFMConfig.from_dict({**cfg.to_dict(), "target_dim": width, **arm_recipe(arm, a)}),
                              init).to(dev)
        budget = 0.0 if arm == "random" else arm_budget(a, t_start, len(trained) - i + ("random" in arm_names(a)))
        if arm != "random" and budget < a.budget_s:
            report.notes.append(f"{arm}: budget cut to {budget:.1f} s of {a.budget_s:g} s to meet --deadline-s")
        t_arm = time.perf_counter()

        def on_point(frac, step, train_s, arm=arm, model=model):
            path = ckpt_dir / f"{arm}_{frac:g}.pth"
            torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "epoch": 0,
                        "step": step, "config": model.cfg.to_dict(), "args": dict(objective=arm, step=step)}, path)
            report.point(arm, frac, step, train_s or 0.0, probe_checkpoint(a, f"{arm}_{frac:g}", path, splits, dev))
            model.train()
            print(f"{arm}: point {frac:g}, step {step}, {train_s or 0.0:.1f} s trained", flush=True)

        if arm == "random" or budget <= 0:
            on_point(1.0, 0, 0.0) if arm == "random" else report.notes.append(f"{arm}: skipped, no time left")
            continue
        run_args = argparse.Namespace(**{**vars(a), "budget_s": budget})
        curve = pretrain(arm, model, images, targets if teacher_arm(arm) else None, run_args, a.seed, on_point)
        report.arms[arm] = dict(steps=len(curve), samples=len(curve) * a.batch, budget_s=round(budget, 1),
                                loss_first=curve[0] if curve else None,
                                loss_last50=sum(curve[-50:]) / max(1, len(curve[-50:])),
                                loss=curve[:: max(1, len(curve) // 200)])
        report.phase(f"train + probe {arm}", time.perf_counter() - t_arm)
    print(f"wrote {out}/{a.name}.{{md,json}} in {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    return 0


def jobs(a) -> list[tuple[int, str]]:
    """(pretraining seed, arm) in the order they run: --arms for every seed, then the --mask-ratios arms."""
    arms = arm_names(a)
    given = [x for x in a.arms.split(",") if x]
    groups = [[x for x in arms if x in given], [x for x in arms if x not in given]]
    return [(seed, arm) for group in groups for seed in pretrain_seeds(a) for arm in group]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.plan:
        return print_plan(a)
    if a.task == "segmentation":
        return _dense_probe().main(a, argv)
    if a.budget_s or a.probe_points:
        return main_curve(a, argv)
    torch.set_num_threads(a.threads)
    out, ckpt_dir = Path(a.out), Path(a.ckpt_dir)
    t_start = time.perf_counter()
    cfg = student_config(a)
    teacher = pretrained_teacher(a, cfg.grid_size)
    if teacher is None:
        return 2
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    teachers = {"urfm": teacher}
    if "urfm_random_teacher" in arm_names(a):
        teachers["urfm_random_teacher"] = random_teacher_like(a.teacher, cfg.grid_size, a.teacher_size or None)

    t0 = time.perf_counter()
    images01, _ = synthetic01(a.pretrain_images, a.img_size, a.seed)  # labels never used
    if not a.reuse or a.target_center or a.target_std:  # --reuse still needs the statistics
        for key in dict.fromkeys(teacher_key(x) for x in arm_names(a) if teacher_arm(x)):
            tg = teacher_targets(teachers[key], images01, cfg.grid_size, cls=cfg.loss_on == "all_cls",
                                 saliency=cfg.mask_type == "attention")  # (N, n, D) or Targets
            teachers[f"{key}_stats"] = stats = target_stats(tg, a.target_center, a.target_std)
            teachers[f"{key}_targets"] = apply_stats(tg, stats)
        print(f"{len(images01)} pretraining images, teacher targets in {time.perf_counter() - t0:.0f}s", flush=True)
    held, _ = synthetic01(256, a.img_size, seed=EVAL_SEEDS["val"] + 1)  # unseen, unlabelled
    with tempfile.TemporaryDirectory() as tmp:
        real = real_frames(a.img_size, Path(tmp))

    all_arms, losses, records = {}, {}, []
    seeds = [int(s) for s in a.seeds.split(",")]
    for i, (seed, arm) in enumerate(jobs(a)):  # results rewritten after each arm: a kill keeps what finished
        arms = pretrain_arms(a, cfg, teachers, images01, ckpt_dir, seed, only=[arm])
        all_arms.update(arms)
        losses.update(real_scan_losses(a, arms, teachers, cfg, held, real))
        t0 = time.perf_counter()
        records += evaluate_arms(a, arms, teacher, seeds, with_teacher=i == 0)
        print(f"evaluation: {time.perf_counter() - t0:.0f}s", flush=True)
        minutes = (time.perf_counter() - t_start) / 60
        cpu_minutes = sum(os.times()[:2]) / 60  # this process's user + system time, every thread
        write_outputs(a, argv, out, cfg, teacher, all_arms, losses, records, pooled_summary(records), minutes,
                      cpu_minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

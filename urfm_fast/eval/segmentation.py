"""Segmentation protocols and metrics: a linear head on frozen patch tokens, and fine-tuning a DPT head
(segmentation-models-pytorch) over the whole backbone; Dice, IoU and pixel accuracy from one confusion
matrix over the evaluation split, and per-pixel average precision per class from a histogram of the softmax
scores (threshold-free: it ranks backbones even where argmax predicts little foreground).

Backbone contract: ``m.forward_features(x)`` returns tokens [B, P + h*w, D] with P =
``m.num_prefix_tokens`` (0 when absent) and the patch grid (h, w) is ``m.patch_embed.grid_size``, or
``m.feature_grid`` for models without a patch embedding (a CNN teacher's map).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast.eval.config import EvalConfig
from urfm_fast.eval.data import sweep, train_and_eval
from urfm_fast.eval.protocols import (
    DROP_PATH,
    LAYER_DECAY,
    WEIGHT_DECAY,
    autocast_for,
    extract_features,
    index_batches,
    normalize_u8,
    optimizer_step,
    progress_bar,
)
from urfm_fast.eval.report import row_text
from urfm_fast.train.schedule import lr_at

if TYPE_CHECKING:
    from urfm_fast.eval.backbones import Backbone
    from urfm_fast.eval.seg_data import SegSplit

AP_BINS = 4096


# ---------------------------------------------------------------------------------------------
# Metrics: one confusion matrix over the whole evaluation split (pixels pooled over images)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [C, C] pixel counts, rows = true class, columns = predicted; any shapes, equal."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(cm) -> dict:
    """Per-class Dice 2TP / (2TP + FP + FN) and IoU TP / (TP + FP + FN) (NaN for a class that is neither in
    the truth nor predicted), their means over the foreground classes (1..C-1) that are defined, and
    pixel accuracy. With one class only (no foreground) the means are NaN."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    fg = slice(1, None)
    mean = lambda v: float(np.nanmean(v[fg])) if np.isfinite(v[fg]).any() else float("nan")
    return {
        "dice": mean(dice), "iou": mean(iou),
        "dice_per_class": [float(v) for v in dice], "iou_per_class": [float(v) for v in iou],
        "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1.0)),
        "confusion": cm.astype(np.int64).tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Average precision per class: one-vs-rest on the softmax probability of the class, pixels pooled


def _ap_at_thresholds(tp: torch.Tensor, fp: torch.Tensor) -> float:
    """AP = sum over thresholds (descending) of (R_n - R_n-1) * P_n, sklearn's average_precision_score, from
    the cumulative true and false positives at each threshold; NaN without positives."""
    tp, fp = tp.double(), fp.double()
    if len(tp) == 0 or tp[-1] == 0:
        return float("nan")
    precision = tp / (tp + fp).clamp_min(1)  # 0/0 only before the first pixel, where recall does not move
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / tp[-1]
    return float((recall_gain * precision).sum())


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Exact AP of one class: pixels sorted by score, equal scores one threshold (as sklearn), so a tie of a
    positive and a negative counts at the precision after both."""
    scores, order = scores.flatten().double().sort(descending=True)
    hit = positive.flatten()[order].long()
    last = torch.ones_like(hit, dtype=torch.bool)  # the last pixel of each run of equal scores
    last[:-1] = scores[1:] != scores[:-1]
    return _ap_at_thresholds(hit.cumsum(0)[last], (1 - hit).cumsum(0)[last])


def score_histogram(prob: torch.Tensor, target: torch.Tensor, bins: int = AP_BINS) -> torch.Tensor:
    """int64 [C, 2, bins] of probabilities [B, C, H, W] against masks [B, H, W]: per class, how many pixels
    that are not (row 0) or are (row 1) of the class have their probability of it in each bin of width
    1/bins. Summed over batches, the counts of a whole split in fixed memory."""
    C = prob.shape[1]
    cls = torch.arange(C, device=prob.device).view(1, C, 1, 1)
    is_pos = (target.to(prob.device).unsqueeze(1) == cls).long()
    b = (prob.float() * bins).long().clamp_(0, bins - 1)
    idx = (cls * 2 + is_pos) * bins + b
    return torch.bincount(idx.flatten(), minlength=C * 2 * bins).reshape(C, 2, bins).cpu()


def histogram_ap(hist: torch.Tensor) -> list[float]:
    """AP per class from score_histogram's counts: the exact AP of the probabilities rounded down to the
    bins (pixels in one bin count as tied). Only the order inside a bin is lost, which moves AP where a bin
    holds many pixels against those ranked above it; on random scores, 4096 bins stay within 1e-3 of the
    exact AP (tested). NaN for a class without positives."""
    desc = hist.flip(-1).cumsum(-1)  # (C, 2, bins): counts at or above each bin's lower edge, highest first
    return [_ap_at_thresholds(desc[c, 1], desc[c, 0]) for c in range(len(hist))]


def ap_metrics(hist: torch.Tensor) -> dict:
    """``ap_per_class`` (background first) and ``mean_ap``, their mean over the foreground classes that have
    positives in the evaluation split (NaN when none has)."""
    ap = histogram_ap(hist)
    fg = [v for v in ap[1:] if math.isfinite(v)]
    return {"mean_ap": sum(fg) / len(fg) if fg else float("nan"), "ap_per_class": ap}


def split_counts(batches, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The confusion matrix and score histogram over a split's (logits [B, C, H, W], masks [B, H, W])."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    hist = torch.zeros(num_classes, 2, AP_BINS, dtype=torch.int64)
    for logits, target in batches:
        cm += confusion_matrix(logits.argmax(1), target, num_classes)
        hist += score_histogram(logits.float().softmax(1), target)
    return cm, hist


def split_metrics(cm: torch.Tensor, hist: torch.Tensor) -> dict:
    return {**segmentation_metrics(cm), **ap_metrics(hist)}


# ---------------------------------------------------------------------------------------------
# Frozen patch tokens


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(h, w) of a backbone's token grid (see the module docstring)."""
    if hasattr(model, "patch_embed"):
        return tuple(int(v) for v in model.patch_embed.grid_size)
    if hasattr(model, "feature_grid"):
        return tuple(int(v) for v in model.feature_grid)
    raise ValueError(f"{type(model).__name__} has neither patch_embed nor feature_grid: no patch grid for dense probes")


def _tokens(model: nn.Module, x: torch.Tensor, layers: int) -> torch.Tensor:
    """[B, h*w, D * layers]: the last ``layers`` blocks' patch tokens (after the final norm, DINOv2's recipe)."""
    if layers == 1:
        return model.forward_features(x)[:, getattr(model, "num_prefix_tokens", 0):]
    maps = model.forward_intermediates(x, indices=layers, norm=True, output_fmt="NCHW", intermediates_only=True)
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=-1)  # each (B, D, h, w) -> (B, hw, D)


def check_probe_layers(model: nn.Module, layers: int, label: str) -> None:
    if layers > 1 and not hasattr(model, "forward_intermediates"):
        raise ValueError(f"[{label}] --probe-layers {layers} needs forward_intermediates (timm ViTs); "
                         "this backbone supports --probe-layers 1 only")


def extract_tokens(model: nn.Module, images: torch.Tensor, bb: Backbone, device, batch_size=64, layers=1,
                   show_progress: bool = False) -> torch.Tensor:
    """Frozen patch tokens of uint8 images: fp16 [N, h*w, D * layers] on the CPU (half the memory of fp32;
    the probe trains in fp32)."""
    check_probe_layers(model, layers, bb.label)
    return extract_features(model, images, bb, device, batch_size, show_progress, what="tokens",
                            forward=lambda m, x: _tokens(m, x, layers).to(torch.float16))


class LinearSegHead(nn.Module):
    """BatchNorm without affine + a linear layer per token (the classification probe, applied to every
    patch); logits bilinearly upsampled from the token grid to the mask."""

    def __init__(self, dim: int, num_classes: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, D = tokens.shape  # (B, h*w, D)
        logits = self.fc(self.bn(tokens.reshape(B * N, D).float())).reshape(B, *self.grid, -1)  # (B, h, w, C)
        return F.interpolate(logits.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def class_weights(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy weights from the training masks: w_c = f_c ** -1/2 for a class of pixel frequency f_c,
    normalised to mean 1 over the classes present (0 for an absent class, which no target names). The
    square root keeps a 1.6 % lesion class at 8x the background's weight, not the 60x of inverse frequency,
    which would trade the background for false positives."""
    counts = torch.bincount(masks.flatten().long(), minlength=num_classes).double()
    present = counts > 0
    w = torch.where(present, (counts / counts.sum()).rsqrt(), 0.0)
    return (w / w[present].mean()).float()


def seg_loss_fn(name: str, masks: torch.Tensor, num_classes: int):
    """The linear probe's loss (--seg-loss): ``ce`` per-pixel cross-entropy; ``ce_dice`` + soft Dice (the DPT
    fine-tune's), whose per-class overlap term does not let a small foreground vanish in the pixel mean;
    ``weighted_ce`` cross-entropy with class_weights of the training masks."""
    if name == "ce_dice":
        return lambda logits, y: F.cross_entropy(logits, y) + dice_loss(logits, y)
    if name == "weighted_ce":
        weight = class_weights(masks, num_classes)
        return lambda logits, y: F.cross_entropy(logits, y, weight=weight)
    if name == "ce":
        return F.cross_entropy
    raise ValueError(f"unknown segmentation loss {name!r}")


def linear_seg_probe(train_t, train_m, eval_t, eval_m, grid, num_classes, seed, *, epochs, lr, min_steps, loss,
                     batch_size=64) -> tuple[torch.Tensor, torch.Tensor]:
    """Train LinearSegHead on cached tokens [N, h*w, D] and masks [N, H, W] with the loss named ``loss``
    (seg_loss_fn); the evaluation split's confusion matrix and score histogram (split_counts)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearSegHead(train_t.shape[-1], num_classes, grid)
    loss_fn = seg_loss_fn(loss, train_m, num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n, size = len(train_t), tuple(train_m.shape[-2:])
    bs = min(batch_size, n)
    steps = max(epochs * math.ceil(n / bs), min_steps)
    for step, idx in enumerate(index_batches(n, bs, steps, g)):
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, 1.0, 0.0, steps // 10, steps)
        # a batch of one image still has h*w tokens for BatchNorm's statistics
        step_loss = loss_fn(head(train_t[idx], size), train_m[idx].long())
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        batches = ((head(eval_t[i : i + 64], size), eval_m[i : i + 64]) for i in range(0, len(eval_t), 64))
        return split_counts(batches, num_classes)


# ---------------------------------------------------------------------------------------------
# Fine-tuning: DPT (segmentation-models-pytorch) over the backbone


SMP_MISSING = ("--protocol finetune --task segmentation needs segmentation-models-pytorch: "
               "pip install 'urfm_fast[seg]'")


def _dpt_encoder(src: nn.Module) -> tuple[str, dict]:
    """The timm name and keyword arguments that rebuild ``src`` (a timm ViT) inside smp's encoder."""
    name = src.pretrained_cfg.get("architecture", "")
    kw = dict(img_size=tuple(src.patch_embed.img_size))
    if name.startswith("urfm_vit"):  # our registered names take the shape from keyword arguments
        blk = src.blocks[0]
        shape = dict(embed_dim=src.embed_dim, depth=len(src.blocks), num_heads=blk.attn.num_heads,
                     mlp_ratio=blk.mlp.fc1.out_features / src.embed_dim, patch_size=src.patch_embed.patch_size[0])
        kw.update(pretrained_cfg_overlay=dict(model_args=shape), global_pool=src.global_pool)
        if not isinstance(src.fc_norm, nn.Identity):
            kw["fc_norm"] = True
    return name, kw


def build_dpt(bb: Backbone, num_classes: int, drop_path_rate: float = 0.1) -> nn.Module:
    """smp's DPT over the backbone, its encoder loaded strictly with the backbone's weights. The decoder's
    widths follow smp's defaults (DPT-Large's) scaled by the encoder width / 1024."""
    import segmentation_models_pytorch as smp
    from timm.models import VisionTransformer

    if bb.meta.get("trainable") is False:
        raise ValueError(f"[{bb.label}] can only be probed (frozen): --protocol finetune does not apply to it")
    src = bb.make(num_classes=0, drop_path_rate=drop_path_rate)
    if not isinstance(src, VisionTransformer):
        raise ValueError(f"[{bb.label}] DPT fine-tuning needs a timm VisionTransformer, got {type(src).__name__}")
    name, kw = _dpt_encoder(src)
    depth = min(4, len(src.blocks))
    k = src.embed_dim / 1024
    inter = [max(16, int(c * k)) for c in (256, 512, 1024, 1024)][:depth]
    model = smp.DPT(f"tu-{name}", encoder_weights=None, encoder_depth=depth, classes=num_classes,
                    decoder_intermediate_channels=inter, decoder_fusion_channels=max(16, int(256 * k)),
                    drop_path_rate=drop_path_rate, **kw)
    try:
        model.encoder.model.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:  # a missing or mis-shaped key: the first line of torch's report names it
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"[{bb.label}] weights do not fit smp's DPT encoder: {msg}") from None
    return model


def _param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay over the encoder (timm's rule, as in classification fine-tuning); decoder and
    head at the full lr. No weight decay on biases and norms."""
    from timm.optim._param_groups import param_groups_layer_decay

    groups = param_groups_layer_decay(model.encoder.model, weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=model.encoder.model.no_weight_decay())
    enc = {id(p) for p in model.encoder.parameters()}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in enc and p.requires_grad]
    groups.append(dict(params=[p for _, p in rest if p.ndim > 1], weight_decay=weight_decay, lr_scale=1.0))
    groups.append(dict(params=[p for _, p in rest if p.ndim <= 1], weight_decay=0.0, lr_scale=1.0))
    return [g for g in groups if g["params"]]


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft multi-class Dice loss over the classes present in the batch's truth (smp's DiceLoss rule)."""
    C = logits.shape[1]
    prob = logits.softmax(1).flatten(2)  # (B, C, H*W)
    onehot = F.one_hot(target.long(), C).flatten(1, 2).transpose(1, 2).to(prob.dtype)  # (B, C, H*W)
    inter, total = (prob * onehot).sum((0, 2)), (prob + onehot).sum((0, 2))
    dice = (2 * inter) / total.clamp_min(1e-7)
    present = onehot.sum((0, 2)) > 0
    return (1 - dice)[present].mean() if present.any() else logits.sum() * 0


def finetune_segmentation(bb: Backbone, train: SegSplit, evals: SegSplit, num_classes, seed, device, cfg: EvalConfig,
                          show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DPT over the whole backbone, AdamW, warm-up + cosine, cross-entropy + Dice loss, horizontal flips
    (``cfg.ft_*``; layer decay, drop-path and weight decay as in classification fine-tuning);
    returns the evaluation split's confusion matrix and score histogram."""
    torch.manual_seed(seed)
    model = build_dpt(bb, num_classes, DROP_PATH).to(device)
    g = torch.Generator().manual_seed(seed)
    n = len(train.images)
    bs = min(cfg.ft_batch_size, n)
    lr = cfg.ft_blr * bs / 256
    groups = _param_groups(model, WEIGHT_DECAY, LAYER_DECAY)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    steps = max(cfg.ft_epochs * math.ceil(n / bs), cfg.ft_min_steps)
    model.train()
    bar = progress_bar(steps, f"[{bb.label}] fine-tune DPT", "step", show_progress)
    for step, idx in enumerate(index_batches(n, bs, steps, g)):
        f = lr_at(step, 1.0, 0.0, max(1, steps // 10), steps)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * f
        idx = idx.repeat(2) if len(idx) == 1 else idx  # BatchNorm in the decoder needs two samples
        x = train.images[idx].to(device, non_blocking=True)
        y = train.masks[idx].to(device).long()
        flip = torch.rand(len(idx), generator=g) < 0.5  # horizontal only: ultrasound is not upside-down
        x, y = torch.where(flip[:, None, None, None].to(device), x.flip(-1), x), torch.where(
            flip[:, None, None].to(device), y.flip(-1), y)
        with autocast_for(device):
            logits = _resize_logits(model(normalize_u8(x, bb.mean, bb.std)).float(), y.shape[-2:])
            loss = F.cross_entropy(logits, y) + dice_loss(logits, y)
        optimizer_step(opt, loss, step, "segmentation fine-tuning")
        bar.update(1)
    bar.close()
    return predict_counts(model, evals, bb, device, num_classes)


def _resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_counts(model: nn.Module, split: SegSplit, bb: Backbone, device, num_classes, batch_size=32):
    """The split's confusion matrix and score histogram (split_counts), counted on the device."""
    model.eval()
    return split_counts(_logits_and_masks(model, split, bb, device, batch_size), num_classes)


def _logits_and_masks(model: nn.Module, split: SegSplit, bb: Backbone, device, batch_size: int):
    for i in range(0, len(split.images), batch_size):
        x = normalize_u8(split.images[i : i + batch_size].to(device), bb.mean, bb.std)
        y = split.masks[i : i + batch_size].to(device)
        with autocast_for(device):
            logits = model(x)
        yield _resize_logits(logits.float(), y.shape[-2:]), y


# ---------------------------------------------------------------------------------------------
# Driver: every backbone x protocol x fraction x seed


def run_segmentation(backbones: list[Backbone], splits: dict, classes: list[str], protocols, fractions, seeds,
                     device, cfg: EvalConfig | None = None, progress=print, done=(), on_record=None,
                     show_progress: bool = False, probe_batch: int = 64) -> list[dict]:
    """Every backbone x protocol x fraction x seed not in ``done``; one record per row with dice, iou, their
    per-class lists, pixel accuracy, the confusion matrix, mean_ap and ap_per_class, each handed to
    ``on_record`` as it finishes (default: its line to ``progress``). ``probe_batch``: images per step of the
    linear probe."""
    cfg = cfg or EvalConfig()
    train, eval_name, ev = train_and_eval(splits)
    C = len(classes)

    def tokens(bb, protocols):
        if "linear" not in protocols:
            return None
        t0 = time.perf_counter()
        model = bb.make()
        grid = patch_grid(model)
        toks = tuple(extract_tokens(model, s.images, bb, device, cfg.batch_size, cfg.probe_layers, show_progress)
                     for s in (train, ev))
        progress(f"[{bb.label}] tokens {tuple(toks[0].shape)} + {tuple(toks[1].shape)} (grid {grid[0]}x"
                 f"{grid[1]}) in {time.perf_counter() - t0:.1f}s")
        return toks, grid

    def score(bb, protocol, seed, idx, prepared):
        if protocol == "linear":
            (train_t, eval_t), grid = prepared
            counts = linear_seg_probe(train_t[idx], train.masks[idx], eval_t, ev.masks, grid, C, seed,
                                      epochs=cfg.lp_epochs, lr=cfg.lp_lr, min_steps=cfg.lp_min_steps,
                                      loss=cfg.seg_loss, batch_size=probe_batch)
        else:
            counts = finetune_segmentation(bb, train.subset(idx), ev, C, seed, device, cfg, show_progress)
        return split_metrics(*counts)

    return sweep(backbones, train, train.strata.numpy(), eval_name, len(ev.masks), protocols, fractions, seeds,
                 tokens, score, done, on_record or (lambda r: progress(row_text(r))))

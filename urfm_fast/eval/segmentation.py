"""Segmentation protocols and metrics: a linear head on frozen patch tokens, and fine-tuning a DPT head
(segmentation-models-pytorch) over the whole backbone; Dice, IoU and pixel accuracy from one confusion
matrix over the evaluation split.

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

from urfm_fast.eval.protocols import _autocast, _bar, _batches, _normalize, extract_features, optimizer_step
from urfm_fast.train.schedule import lr_at

if TYPE_CHECKING:
    from urfm_fast.eval.backbones import Backbone
    from urfm_fast.eval.seg_data import SegSplit

SEG_METRICS = ("dice", "iou", "pixel_accuracy")


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


def linear_seg_probe(train_t, train_m, eval_t, eval_m, grid, num_classes, seed, epochs=100, lr=0.1, batch_size=64,
                     min_steps=300) -> torch.Tensor:
    """Train LinearSegHead on cached tokens [N, h*w, D] and masks [N, H, W]; the evaluation confusion matrix."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearSegHead(train_t.shape[-1], num_classes, grid)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n, size = len(train_t), tuple(train_m.shape[-2:])
    bs = min(batch_size, n)
    steps = max(epochs * math.ceil(n / bs), min_steps)
    for step, idx in enumerate(_batches(n, bs, steps, g)):
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, 1.0, 0.0, steps // 10, steps)
        # a batch of one image still has h*w tokens for BatchNorm's statistics
        loss = F.cross_entropy(head(train_t[idx], size), train_m[idx].long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(eval_t), 64):
            pred = head(eval_t[i : i + 64], size).argmax(1)
            cm += confusion_matrix(pred, eval_m[i : i + 64], num_classes)
    return cm


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


def finetune_segmentation(bb: Backbone, train: SegSplit, evals: SegSplit, num_classes, seed, device, epochs=30,
                          batch_size=16, blr=1e-3, layer_decay=0.65, drop_path=0.1, weight_decay=0.05,
                          min_steps=100, show_progress: bool = False) -> torch.Tensor:
    """DPT over the whole backbone, AdamW, warm-up + cosine, cross-entropy + Dice loss, horizontal flips;
    returns the evaluation split's confusion matrix."""
    torch.manual_seed(seed)
    model = build_dpt(bb, num_classes, drop_path).to(device)
    g = torch.Generator().manual_seed(seed)
    n = len(train.images)
    bs = min(batch_size, n)
    lr = blr * bs / 256
    groups = _param_groups(model, weight_decay, layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    steps = max(epochs * math.ceil(n / bs), min_steps)
    model.train()
    bar = _bar(steps, f"[{bb.label}] fine-tune DPT", "step", show_progress)
    for step, idx in enumerate(_batches(n, bs, steps, g)):
        f = lr_at(step, 1.0, 0.0, max(1, steps // 10), steps)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * f
        idx = idx.repeat(2) if len(idx) == 1 else idx  # BatchNorm in the decoder needs two samples
        x = train.images[idx].to(device, non_blocking=True)
        y = train.masks[idx].to(device).long()
        flip = torch.rand(len(idx), generator=g) < 0.5  # horizontal only: ultrasound is not upside-down
        x, y = torch.where(flip[:, None, None, None].to(device), x.flip(-1), x), torch.where(
            flip[:, None, None].to(device), y.flip(-1), y)
        with _autocast(device):
            logits = _resize_logits(model(_normalize(x, bb.mean, bb.std)).float(), y.shape[-2:])
            loss = F.cross_entropy(logits, y) + dice_loss(logits, y)
        optimizer_step(opt, loss, step, "segmentation fine-tuning")
        bar.update(1)
    bar.close()
    return predict_confusion(model, evals, bb, device, num_classes)


def _resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_confusion(model: nn.Module, split: SegSplit, bb: Backbone, device, num_classes, batch_size=32):
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(0, len(split.images), batch_size):
        x = _normalize(split.images[i : i + batch_size].to(device), bb.mean, bb.std)
        y = split.masks[i : i + batch_size]
        with _autocast(device):
            pred = _resize_logits(model(x).float(), y.shape[-2:]).argmax(1)
        cm += confusion_matrix(pred.cpu(), y, num_classes)
    return cm


# ---------------------------------------------------------------------------------------------
# Driver: every backbone x protocol x fraction x seed


def _record(label, protocol, frac, seed, n_train, eval_name, n_eval, t0, m: dict, progress) -> dict:
    progress(f"[{label}] {protocol:8s} frac={frac:<5g} seed={seed} n={n_train:5d} "
             f"dice={m['dice']:.4f} iou={m['iou']:.4f} pixel_acc={m['pixel_accuracy']:.4f}")
    return dict(backbone=label, protocol=protocol, fraction=frac, seed=seed, n_train=n_train, eval_split=eval_name,
                n_eval=n_eval, seconds=round(time.perf_counter() - t0, 2), **m)


def run_segmentation(backbones: list[Backbone], splits: dict, classes: list[str], protocols, fractions, seeds,
                     device, hp: dict | None = None, progress=print) -> list[dict]:
    """One record per run with dice, iou, their per-class lists, pixel accuracy and the confusion matrix."""
    from urfm_fast.eval.data import label_runs, train_and_eval

    hp = hp or {}
    train, eval_name, ev = train_and_eval(splits)
    C = len(classes)
    records = []
    for bb in backbones:
        toks = None
        if "linear" in protocols:
            t0 = time.perf_counter()
            model = bb.make()
            grid = patch_grid(model)
            toks = tuple(extract_tokens(model, s.images, bb, device, hp.get("batch_size", 64),
                                        hp.get("probe_layers", 1), hp.get("show_progress", False))
                         for s in (train, ev))
            del model
            progress(f"[{bb.label}] tokens {tuple(toks[0].shape)} + {tuple(toks[1].shape)} (grid {grid[0]}x"
                     f"{grid[1]}) in {time.perf_counter() - t0:.1f}s")
        for protocol, frac, seed, idx in label_runs(protocols, fractions, seeds, train.strata.numpy(), train.groups):
            t0 = time.perf_counter()
            if protocol == "linear":
                cm = linear_seg_probe(toks[0][idx], train.masks[idx], toks[1], ev.masks, grid, C, seed,
                                      epochs=hp.get("lp_epochs", 100), lr=hp.get("lp_lr", 0.1),
                                      batch_size=hp.get("seg_batch_size", 64),
                                      min_steps=hp.get("lp_min_steps", 300))
            else:
                cm = finetune_segmentation(bb, train.subset(idx), ev, C, seed, device,
                                           epochs=hp.get("ft_epochs", 30), blr=hp.get("ft_blr", 1e-3),
                                           batch_size=hp.get("ft_batch_size", 16),
                                           min_steps=hp.get("ft_min_steps", 100),
                                           show_progress=hp.get("show_progress", False))
            records.append(_record(bb.label, protocol, frac, seed, len(idx), eval_name, len(ev.masks), t0,
                                   segmentation_metrics(cm), progress))
    return records

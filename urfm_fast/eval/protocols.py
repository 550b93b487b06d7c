"""Evaluation protocols and metrics: linear probe, weighted k-NN and end-to-end fine-tuning (conventions:
the docstring of the command, urfm_fast.evaluate); accuracy, macro-AUC, macro-F1 and the confusion matrix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from urfm_fast.data.augment import normalize, random_resized_crop
from urfm_fast.train.schedule import lr_at

if TYPE_CHECKING:
    from urfm_fast.eval.backbones import Backbone
    from urfm_fast.eval.config import EvalConfig
    from urfm_fast.eval.data import Split


# ---------------------------------------------------------------------------------------------
# Metrics (numpy; no scikit-learn)


def _auc_binary(score: np.ndarray, pos: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic with average ranks for ties."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    s = score[order]
    i = 0
    while i < len(s):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """accuracy, macro one-vs-rest AUC (classes with positives and negatives), macro F1, confusion matrix."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(cm, (labels, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0  # F1 is undefined for a class nobody has or predicts
    f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    aucs = [_auc_binary(probs[:, c], labels == c) for c in range(num_classes)
            if 0 < (labels == c).sum() < len(labels)]
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion": cm.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Protocols


def autocast_for(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def optimizer_step(opt, loss: torch.Tensor, step: int, what: str) -> None:
    """One step of a fine-tuning loop; a NaN/Inf loss stops the run (a broken recipe, not a bad batch)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} loss is {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def normalize_u8(x_u8: torch.Tensor, mean, std) -> torch.Tensor:
    return normalize(x_u8.float() / 255.0, mean, std)


def progress_bar(total: int, desc: str, unit: str, show: bool):
    """A tqdm bar on stderr for a loop that can take minutes; ``show`` False: none (quiet, not a terminal)."""
    if not show:  # no bar, no tqdm needed (a bare GPU machine may lack it)
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, mininterval=1.0)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, bb: Backbone, device, batch_size=256,
                     show_progress: bool = False, forward=None, what: str = "features") -> torch.Tensor:
    """Pooled features [N, D] (fp32, CPU) of uint8 images, model in eval mode; ``forward(model, x)``
    replaces ``model(x)`` (e.g. patch tokens for dense probes) and sets the output's dtype."""
    model.eval().to(device)
    out = []
    with progress_bar(len(images), f"[{bb.label}] {what}", "img", show_progress) as bar:
        for i in range(0, len(images), batch_size):
            x = normalize_u8(images[i : i + batch_size].to(device, non_blocking=True), bb.mean, bb.std)
            with autocast_for(device):
                out.append(model(x).float().cpu() if forward is None else forward(model, x).cpu())
            bar.update(len(x))
    return torch.cat(out)


def index_batches(n: int, bs: int, steps: int, g: torch.Generator):
    """``steps`` index batches of size ``bs``: seeded epochs without replacement, last partial batch dropped."""
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + bs]
        pos += bs


def train_cached(opt, lr: float, n: int, batch_size: int, epochs: int, min_steps: int, g: torch.Generator,
                 loss_of) -> None:
    """The probes' loop over cached inputs: ``epochs`` (at least ``min_steps`` steps) of seeded batches,
    warm-up over a tenth of the steps then cosine from ``lr``; ``loss_of(indices)`` gives a batch's loss."""
    bs = min(batch_size, n)
    steps = max(epochs * math.ceil(n / bs), min_steps)
    for step, idx in enumerate(index_batches(n, bs, steps, g)):
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(step, 1.0, 0.0, steps // 10, steps)
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def linear_probe(train_f, train_y, eval_f, num_classes, seed, *, epochs, lr, min_steps, batch_size=256):
    """MAE's probe on cached features: BatchNorm1d(affine=False) + Linear, SGD, cosine; returns probs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d = train_f.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), nn.Linear(d, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)  # MAE's probe init
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)

    def loss_of(idx):  # BatchNorm needs 2+ samples per batch; a 1-image class-fraction set trains on duplicates
        xb, yb = (train_f[idx], train_y[idx]) if len(idx) > 1 else (train_f[idx].repeat(2, 1), train_y[idx].repeat(2))
        return F.cross_entropy(head(xb), yb)

    train_cached(opt, lr, len(train_f), batch_size, epochs, min_steps, g, loss_of)
    head.eval()
    with torch.no_grad():
        return head(eval_f).softmax(-1)


def knn_classify(train_f, train_y, eval_f, num_classes, *, k, temperature, chunk=1024):
    """DINO's weighted k-NN on L2-normalised features; returns class scores normalised to sum 1."""
    train_f = F.normalize(train_f, dim=1)
    eval_f = F.normalize(eval_f, dim=1)
    k = min(k, len(train_f))
    out = []
    for i in range(0, len(eval_f), chunk):
        sim = eval_f[i : i + chunk] @ train_f.T  # (b, Ntrain)
        top, idx = sim.topk(k, dim=1)  # (b, k)
        w = (top / temperature).exp()
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], w)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)


# The fine-tuning recipe's constants (MAE's, scaled down); its schedule (epochs, batch, lr) is in EvalConfig.
LAYER_DECAY, DROP_PATH, WEIGHT_DECAY, LABEL_SMOOTHING = 0.65, 0.1, 0.05, 0.1


def finetune(bb: Backbone, train: Split, eval_images: torch.Tensor, num_classes, seed, device, cfg: EvalConfig,
             show_progress: bool = False):
    """End-to-end fine-tuning (MAE recipe, scaled down; ``cfg.ft_*``); returns probabilities on eval_images."""
    from timm.optim import create_optimizer_v2

    if not bb.meta.get("trainable", True):
        raise ValueError(f"backbone {bb.label!r} ({bb.spec}) is a frozen teacher; it can be probed (linear, knn), "
                         "not fine-tuned")
    model = bb.make(num_classes=num_classes, drop_path_rate=DROP_PATH).to(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)  # batch order
    crop_g = torch.Generator(device).manual_seed(seed)  # crops, drawn on the device the batch is on
    n = len(train.labels)
    bs = min(cfg.ft_batch_size, n)
    lr = cfg.ft_blr * bs / 256
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]  # layer-scaled lr; the schedule multiplies this
    steps = max(cfg.ft_epochs * math.ceil(n / bs), cfg.ft_min_steps)
    warmup = max(1, steps // 10)
    model.train()
    bar = progress_bar(steps, f"[{bb.label}] fine-tune", "step", show_progress)
    for step, idx in enumerate(index_batches(n, bs, steps, g)):
        f = lr_at(step, 1.0, 0.0, warmup, steps)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * f
        # pretraining's crop + flip (torchvision's rule, no vertical flip); scale 0.5-1 keeps a lesion in view
        x = random_resized_crop(train.images[idx].to(device, non_blocking=True), train.images.shape[-1],
                                scale=(0.5, 1.0), generator=crop_g)
        x = normalize(x, bb.mean, bb.std)
        y = train.labels[idx].to(device)
        with autocast_for(device):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=LABEL_SMOOTHING)
        optimizer_step(opt, loss, step, "fine-tuning")
        bar.update(1)
        if show_progress and step % 10 == 0:  # .item() syncs the device: only for a visible bar
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    logits = extract_features(model, eval_images, bb, device, show_progress=show_progress)
    return logits.softmax(-1)

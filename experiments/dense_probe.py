"""Label efficiency, densely: do the label-efficiency arms' patch tokens segment the synthetic lesions?

    python experiments/label_efficiency.py --task segmentation --out docs   # docs/label_efficiency_seg.md
    python experiments/label_efficiency.py --task segmentation --reuse --out docs   # the arms of an earlier run

The arms of label_efficiency.py (the same pretraining flags and checkpoints in ``--ckpt-dir``; ``--reuse``
takes them from an earlier run) and the pretrained teacher's own feature map (``teacher``), each frozen and
probed by urfm_fast.evaluate's linear dense probe (BatchNorm without affine + a linear layer on every patch
token, logits bilinearly upsampled to the mask, cross-entropy per pixel) at 1 %, 10 % and 100 % of
``--seg-train`` labelled synthetic images (masks: background + the three lesion classes, exact per pixel),
over ``--seeds``. Scored on ``--seg-n`` test images (seed 2000) or, with ``--eval-split val``, a separate
validation set (seed 3000); nothing is chosen on the test split. Mean Dice and IoU over the three lesion
classes and pixel accuracy, from one confusion matrix per run over the whole evaluation split, and per-pixel
average precision (``pixel AP``) from the probe's softmax scores.
Writes ``label_efficiency_seg.{md,png,json}`` to ``--out``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from urfm_fast.data import synthetic
from urfm_fast.eval.backbones import Backbone, resolve_backbone
from urfm_fast.eval.config import EvalConfig
from urfm_fast.eval.report import format_table, json_safe, plot, summarize
from urfm_fast.eval.seg_data import SegSplit
from urfm_fast.eval.segmentation import run_segmentation

FRACTIONS = (0.01, 0.1, 1.0)


def add_arguments(p) -> None:
    """label_efficiency.py's flags of the segmentation task."""
    g = p.add_argument_group("--task segmentation")
    g.add_argument("--seg-train", type=int, default=500, help="labelled training images of the dense probe")
    g.add_argument("--seg-n", type=int, default=250, help="images of the dense probe's evaluation split")
    g.add_argument("--seg-epochs", type=int, default=40, help="dense-probe epochs")
    g.add_argument("--seg-min-steps", type=int, default=300, help="dense-probe steps at least (small fractions)")
    g.add_argument("--seg-batch", type=int, default=32, help="dense-probe batch (images)")


class DenseTeacher(nn.Module):
    """The teacher's own feature map as a frozen backbone: tokens [B, h*w, D], no prefix tokens."""

    num_prefix_tokens = 0

    def __init__(self, teacher, img_size: int):
        super().__init__()
        self.teacher = teacher
        with torch.no_grad():
            self.feature_grid = tuple(teacher.feature_map(torch.zeros(1, 3, img_size, img_size)).shape[-2:])

    def forward_features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.teacher.feature_map(x01).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


def seg_splits(a) -> dict[str, SegSplit]:
    from label_efficiency import EVAL_SEEDS

    out = {}
    for name, n in (("train", a.seg_train), (a.eval_split, a.seg_n)):
        x, _, m = synthetic.generate(n, size=a.img_size, seed=EVAL_SEEDS[name], masks=True)
        out[name] = SegSplit(x.expand(-1, 3, -1, -1).contiguous(), m)
    return out


def pretrained_arms(a):
    """label_efficiency.py's arms: pretrained now, or loaded from --ckpt-dir with --reuse. -> (arms, teacher)."""
    import label_efficiency as le

    cfg = le.student_config(a)
    teacher = le.pretrained_teacher(a, cfg.grid_size)
    if teacher is None:
        return None, None
    Path(a.ckpt_dir).mkdir(parents=True, exist_ok=True)
    teachers = {"urfm": teacher, "urfm_random_teacher": le.random_teacher_like(a.teacher, cfg.grid_size,
                                                                              a.teacher_size or None)}
    images01, _ = le.synthetic01(a.pretrain_images, a.img_size, a.seed)  # labels never used
    if not a.reuse:  # --reuse loads the weights; the targets only serve pretraining
        for arm in (x for x in le.URFM_ARMS if x in a.arms.split(",")):
            tg = le.teacher_targets(teachers[arm], images01, cfg.grid_size, cls=cfg.loss_on == "all_cls",
                                    saliency=cfg.mask_type == "attention")
            teachers[f"{arm}_targets"] = le.apply_stats(tg, le.target_stats(tg, a.target_center, a.target_std))
    return le.pretrain_arms(a, cfg, teachers, images01, Path(a.ckpt_dir)), teacher


def main(a, argv=None) -> int:
    """label_efficiency.py --task segmentation, after its flags are parsed."""
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    arms, teacher = pretrained_arms(a)
    if arms is None:
        return 2
    t0 = time.perf_counter()
    backbones = [resolve_backbone(f"{arm}={arms[arm]['path']}", "vit_tiny", a.pool, None) for arm in arms]
    dense = DenseTeacher(teacher, a.img_size)
    backbones.append(Backbone("teacher", teacher.source, lambda num_classes=0, drop_path_rate=0.0: dense,
                              (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), a.img_size,
                              {"format": "teacher", "source": teacher.source, "trainable": False}))
    # plain cross-entropy: the loss docs/label_efficiency_seg.md was measured with (evaluate's default differs)
    cfg = EvalConfig(lp_epochs=a.seg_epochs, lp_min_steps=a.seg_min_steps, lp_lr=0.1, batch_size=64, seg_loss="ce")
    seeds = [int(s) for s in a.seeds.split(",")]
    records = run_segmentation(backbones, seg_splits(a), list(synthetic.SEG_CLASSES), ["linear"], FRACTIONS, seeds,
                               torch.device("cpu"), cfg, progress=lambda s: print(s, flush=True),
                               probe_batch=a.seg_batch)
    print(f"dense probes: {time.perf_counter() - t0:.0f}s", flush=True)
    minutes = (time.perf_counter() - t_start) / 60
    write_outputs(a, argv, Path(a.out), teacher, arms, records, minutes, sum(os.times()[:2]) / 60)
    return 0


def margins(summary: list[dict]) -> list[dict]:
    """Every arm against random init and the teacher, per fraction: Dice margin and the larger std."""
    cell = {(r["backbone"], r["fraction"]): r for r in summary}
    rows = []
    for (b, f), r in cell.items():
        for other in ("random", "teacher"):
            o = cell.get((other, f))
            if o and b != other and not (b == "teacher" and other == "random"):
                std = max(r["dice_std"], o["dice_std"])
                rows.append(dict(backbone=b, fraction=f, versus=other, margin=r["dice"] - o["dice"], std=std,
                                 beyond_2std=abs(r["dice"] - o["dice"]) > 2 * std))
    return rows


def per_class(records: list[dict], classes: list[str]) -> str:
    """Mean Dice per lesion class at 100 % labels, over seeds."""
    rows = ["| backbone | " + " | ".join(classes[1:]) + " |", "|---|" + "---|" * (len(classes) - 1)]
    for b in dict.fromkeys(r["backbone"] for r in records):
        rs = [r for r in records if r["backbone"] == b and r["fraction"] == 1.0]
        means = [sum(r["dice_per_class"][c] for r in rs) / len(rs) for c in range(1, len(classes))]
        rows.append(f"| {b} | " + " | ".join(f"{100 * v:.1f}" for v in means) + " |")
    return "\n".join(rows)


def write_outputs(a, argv, out: Path, teacher, arms: dict, records, minutes: float, cpu_minutes: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python experiments/label_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = summarize(records)
    rows = margins(summary)
    plot(summary, out / "label_efficiency_seg.png",
         title=f"Lesion masks, {a.img_size}px ViT-Ti/{a.patch} x{a.depth}: dense probe")
    margin_rows = "\n".join(f"| {r['backbone']} | {r['fraction']:g} | {r['versus']} | {100 * r['margin']:+.1f} | "
                            f"{100 * r['std']:.1f} | {'yes' if r['beyond_2std'] else 'no'} |" for r in rows)
    seconds = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in arms.items() if v["curve"])
    reused = (f"{a.steps} steps x {a.batch}, checkpoints of an earlier run (--reuse)" if a.reuse
              else f"{a.steps} steps x {a.batch}, pretrained in this run: {seconds}")
    text = (
        f"# Dense label efficiency on synthetic lesion masks (teacher: {teacher.source})\n\n"
        f"`{cmd.strip()}`: {minutes:.1f} min with {a.threads} CPU thread{'s' * (a.threads > 1)} on a 2-core x86_64 CPU "
        f"({cpu_minutes:.1f} CPU-minutes, user + system; load average {os.getloadavg()[1]:.1f} over the last 5 "
        f"minutes of the run).\n\n"
        f"Arms: label_efficiency.py's ({', '.join(arms)}; {a.pretrain_images} synthetic images, {reused}, "
        f"ViT-Ti width 192 x {a.depth} blocks, {a.img_size}px, patch {a.patch}) and `teacher`, the pretrained "
        f"teacher's own feature map at {teacher.input_size}px input. Linear dense probe on the frozen last-block "
        f"patch tokens: {a.seg_epochs} epochs (at least {a.seg_min_steps} steps) of SGD, batch {a.seg_batch} "
        f"images, lr 0.1, cosine. Labelled pool: {a.seg_train} synthetic images (seed 1000); evaluation: "
        f"`{a.eval_split}` split, {a.seg_n} images; probe seeds {a.seeds}. Dice and IoU: means over the three "
        "lesion classes (background excluded), in %, mean ± std over seeds.\n\n"
        + format_table(summary, markdown=True) + "\n\n![dense label efficiency](label_efficiency_seg.png)\n\n"
        "## Dice per lesion class at 100 % labels (mean over seeds)\n\n" + per_class(records, synthetic.SEG_CLASSES)
        + "\n\n## Margins in Dice (points) against random init and the teacher\n\n"
        "| backbone | fraction | versus | margin | larger std | beyond 2 std |\n|---|---|---|---|---|---|\n"
        + margin_rows + "\n")
    (out / "label_efficiency_seg.md").write_text(text)
    result = dict(command=cmd.strip(), args=vars(a), teacher=teacher.source, minutes=round(minutes, 2),
                  cpu_minutes=round(cpu_minutes, 2), load_average=[round(x, 2) for x in os.getloadavg()],
                  threads=a.threads, classes=list(synthetic.SEG_CLASSES), summary=summary, margins=rows, runs=records)
    (out / "label_efficiency_seg.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    print(format_table(summary))
    print(f"wrote {out}/label_efficiency_seg.{{md,png,json}} in {minutes:.1f} min")

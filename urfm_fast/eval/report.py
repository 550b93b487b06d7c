"""What evaluate reports: the per-row lines, the summary over seeds, the table, the label-efficiency plot,
TensorBoard scalars and results.json (strict JSON, written atomically after every row)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

# the metrics summarized, tabled (with their headers) and plotted (the first), per task
METRICS = {"classification": (("accuracy", "accuracy"), ("macro_auc", "macro-AUC"), ("macro_f1", "macro-F1")),
           "segmentation": (("dice", "Dice"), ("iou", "IoU"), ("mean_ap", "pixel AP"),
                            ("pixel_accuracy", "pixel acc."))}


def metrics_of(records: list[dict]) -> tuple[tuple[str, str], ...]:
    return METRICS["segmentation" if records and "dice" in records[0] else "classification"]


def row_text(r: dict) -> str:
    """One line per finished row: what ran and its metrics."""
    head = f"[{r['backbone']}] {r['protocol']:8s} frac={r['fraction']:<5g} seed={r['seed']} n={r['n_train']:5d} "
    if "dice" in r:
        return head + (f"dice={r['dice']:.4f} iou={r['iou']:.4f} pixel_ap={r['mean_ap']:.4f} "
                       f"pixel_acc={r['pixel_accuracy']:.4f}")
    return head + f"acc={r['accuracy']:.4f} auc={r['macro_auc']:.4f} f1={r['macro_f1']:.4f}"


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["backbone"], r["protocol"], r["fraction"]), []).append(r)
    out = []
    for (b, p, f), rs in groups.items():
        row = dict(backbone=b, protocol=p, fraction=f, n_train=rs[0]["n_train"], seeds=len(rs))
        for k, _ in metrics_of(rs):
            v = np.array([r[k] for r in rs], dtype=np.float64)
            row[k] = float(v.mean())
            row[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(row)
    return out


def format_table(summary: list[dict], markdown: bool = False) -> str:
    metrics = metrics_of(summary)
    head = ["backbone", "protocol", "fraction", "n_train"] + [h for _, h in metrics]
    rows = [[s["backbone"], s["protocol"], f"{s['fraction']:g}", str(s["n_train"])]
            + [f"{100 * s[k]:.1f} ± {100 * s[k + '_std']:.1f}" for k, _ in metrics]
            for s in summary]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def plot(summary: list[dict], path: Path, title: str = "Label efficiency") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(s["protocol"] for s in summary))
    key, name = metrics_of(summary)[0]
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.6), squeeze=False)
    for ax, p in zip(axes[0], protocols):
        for b in dict.fromkeys(s["backbone"] for s in summary):
            rows = sorted((s for s in summary if s["protocol"] == p and s["backbone"] == b),
                          key=lambda s: s["fraction"])
            x = [100 * s["fraction"] for s in rows]
            y = np.array([100 * s[key] for s in rows])
            e = np.array([100 * s[key + "_std"] for s in rows])
            ax.plot(x, y, marker="o", label=b)
            ax.fill_between(x, y - e, y + e, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images (%)")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(p)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_events(summary: list[dict], out: Path) -> None:
    """The label-efficiency curves as TensorBoard scalars (x = labelled training images), when installed."""
    from urfm_fast.train.tensorboard import add_scalars, summary_writer

    writer = summary_writer(out)
    if writer is None:
        return
    for s in summary:
        add_scalars(writer, f"{s['backbone']}/{s['protocol']}", s, s["n_train"], [k for k, _ in metrics_of([s])])
    writer.close()


_ABSENT = "undefined: a class neither in the evaluation split's masks nor predicted"
NULL_REASONS = {"macro_auc": "undefined: no class of the evaluation split has both positives and negatives "
                             "(a single-class split)",
                "dice": "undefined: no foreground class in the evaluation split's masks or predictions",
                "iou": "undefined: no foreground class in the evaluation split's masks or predictions",
                "dice_per_class": _ABSENT, "iou_per_class": _ABSENT,
                "mean_ap": "undefined: no foreground class has a pixel in the evaluation split's masks",
                "ap_per_class": "undefined: a class without a pixel in the evaluation split's masks"}


def json_safe(obj, key: str = ""):
    """results.json is strict JSON: a NaN or infinite number becomes null, and ``<key>_null_reason``
    beside it says why (json.dumps would write bare NaN, which strict parsers reject)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k] = json_safe(v, str(k))
            bad = isinstance(v, float) and not math.isfinite(v)
            if bad or (isinstance(v, list) and any(isinstance(x, float) and not math.isfinite(x) for x in v)):
                out[f"{k}_null_reason"] = NULL_REASONS.get(str(k).removesuffix("_std"), f"not a finite number ({v})")
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, key) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj




def write_json(path: Path, obj) -> None:
    """Strict JSON (json_safe), atomically: a reader (or a run killed mid-write) sees the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)

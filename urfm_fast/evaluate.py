"""Downstream evaluation with label-efficiency curves: linear probe, k-NN and fine-tuning.

    python -m urfm_fast.evaluate --backbone mae_vit_base_patch16_dec768d8b_all_biomedclip_1199.pth \\
        --data /data/busi --protocol linear,knn,finetune --label-fractions 0.01,0.1,1.0 --seeds 0,1,2
    python -m urfm_fast.evaluate --backbone urfm=runs/a.pth random=random --arch vit_tiny \\
        --data synthetic --img-size 64 --protocol linear,knn      # a demo on the built-in lesion task
    python -m urfm_fast.evaluate --backbone runs/a.pth --data /data/ultrabench/mmotu_v1.0.0 --mask-key \\
        tumor_mask_binary --protocol linear,finetune              # segmentation (docs/evaluation_segmentation.md)

Backbones (``--backbone``, several allowed, each optionally ``label=spec``; all from local files except
``timm:NAME``, each loaded strictly: a missing or mis-shaped key stops with one line naming it): one of our
checkpoints, an official URFM file, an export folder, a DCP folder (anything ``load_checkpoint`` reads);
``mae:FILE`` (an MAE-layout ViT: facebookresearch/mae, USF-MAE, the released URFM files; architecture from
the shapes, decoder dropped); ``random`` (``--arch`` at random init); ``timm:MODEL=FILE`` (any timm model,
weights from a local safetensors or torch file); ``teacher:SPEC`` (any pretrain ``--teacher`` spec, e.g.
``teacher:efficientnet_lite0`` or a BiomedCLIP file, frozen at its own input size and mean/std: linear and
knn only); or a timm model name (``timm:NAME``, timm's pretrained weights, which need a network or a cache).

Data (``--data``): an ImageFolder root with ``train/`` and ``val/`` (and optional ``test/``) class
sub-folders; a shard folder from ``python -m urfm_fast.prepare`` plus ``--labels CSV`` (format below);
or ``synthetic`` (urfm_fast.data.synthetic's four lesion classes, rendered on the fly; train and val come
from different seeds). Images are read once, converted to 3-channel grey/RGB, resized (short side) and
centre-cropped to the backbone's input size. Metrics are computed on ``test`` when it exists, else on
``val``.

Segmentation (``--task segmentation``, implied by masks; docs/evaluation_segmentation.md): an UltraBench
folder (``train.json``, ``validation.json``, ``test.json``; ``--label-key`` picks a class field,
``--mask-key`` a mask field such as ``tumor_mask_binary``, automatic when there is one candidate;
``patient`` groups the label fractions; ``scan_mask`` blanks pixels outside the scan unless
``--no-scan-mask``), ``images/`` + ``masks/`` folders (optionally under ``train/ val/ test/``; masks are
PNGs of class ids) or ``synthetic-seg`` (the lesions' exact masks). Images and masks are resized whole to
the input size. Protocols: ``linear`` (BatchNorm without affine + a linear layer on frozen patch tokens,
``--probe-layers 4`` concatenates the last four blocks, logits bilinearly upsampled) and ``finetune``
(segmentation-models-pytorch's DPT over the backbone, layer-wise lr decay, cross-entropy + Dice loss;
``pip install 'urfm_fast[seg]'``). Metrics from one confusion matrix over the evaluation split: mean Dice
and IoU over the foreground classes, per-class Dice and IoU, pixel accuracy.

Labels CSV for a shard folder (--labels): a header row, then one row per labelled image, keyed in one of
two ways:
  index,label,split        index = 0-based position of the image in DIR/index.jsonl (= ShardDataset item)
  path,label,split[,frame] path = the source path as prepare read it ("path" inside its SRC folder, or
                           "src/path" to tell two sources apart; DIR/index.jsonl holds only salted hashes
                           of them, matched here with the folder's key: DIR.key or --key FILE), e.g.
                           "liver/p01.png" or "cines.zip/a/cine.dcm"; without a frame column (or with it
                           empty) every frame of that file gets the row
label is a class name or id (classes are ordered numerically when all are integers, else by name); split
is train, val or test. A train split and a val or test split are required; extra columns are ignored and
images without a row are not used. Example:
  path,label,split
  benign/001.png,benign,train
  malignant/007.png,malignant,val

Protocols (MAE/DINO conventions):
- ``linear``: frozen backbone, pooled features (CLS or mean of patch tokens, ``--global-pool``) computed
  once, then BatchNorm without affine + a linear layer trained with SGD (momentum 0.9, no weight decay).
- ``knn``: cosine similarity to the labelled training features, k nearest vote with weights
  exp(sim / T) (DINO: k=20, T=0.07).
- ``finetune``: the whole backbone + a new head, AdamW with layer-wise lr decay 0.65, drop-path 0.1,
  label smoothing 0.1, random-resized-crop + horizontal flip, warm-up + cosine, bf16 on GPU.

Label fractions are class-stratified and nested: for a seed, each class's training images are put in
a seeded random order once and a fraction takes its first ceil(fraction * n_class) (at least one).

Outputs in ``--out``: ``results.json`` (accuracy, macro-AUC, macro-F1, confusion matrix per backbone,
protocol, fraction and seed, plus mean/std), the same table printed, ``label_efficiency.png`` and, with
tensorboard installed, the same curves as TensorBoard scalars (``BACKBONE/PROTOCOL/accuracy`` etc., x =
labelled training images). Progress bars on stderr while features are extracted and while fine-tuning
(off with ``--quiet`` or when stderr is not a terminal).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from urfm_fast.eval.backbones import Backbone, resolve_backbone  # noqa: F401 (re-exported)

# Data and protocols live in eval_data and eval_protocols (both import torch); their public names stay
# importable from here, bound on first use so --help answers before torch is imported. run() and main()
# read them as this module's globals (main binds them after parsing and keeps a name already set), so
# patching evaluate.<name> reaches them.
_LAZY = {
    "urfm_fast.eval.data": ("SPLITS", "Split", "_check_classes", "label_runs", "load_data", "load_imagefolder",
                            "load_shards", "load_synthetic", "read_shard_labels", "stratified_subset"),
    "urfm_fast.eval.protocols": ("classification_metrics", "extract_features", "finetune", "knn_classify",
                                 "linear_probe"),
}
if TYPE_CHECKING:
    from urfm_fast.eval.data import Split, label_runs, load_data
    from urfm_fast.eval.protocols import classification_metrics, extract_features, finetune, knn_classify, linear_probe


def _bind_lazy() -> None:
    for module, names in _LAZY.items():
        m = importlib.import_module(module)
        for name in names:
            globals().setdefault(name, getattr(m, name))


def __getattr__(name: str):
    if any(name in names for names in _LAZY.values()):
        _bind_lazy()
        return globals()[name]
    raise AttributeError(f"module 'urfm_fast.evaluate' has no attribute {name!r}")


log = logging.getLogger("urfm_fast.evaluate")
PROTOCOLS = ("linear", "knn", "finetune")
SEG_PROTOCOLS = ("linear", "finetune")
DEFAULT_PROTOCOLS = "linear,knn,finetune"
# the metrics summarized, tabled (with their headers) and plotted (the first), per task
METRICS = {"classification": (("accuracy", "accuracy"), ("macro_auc", "macro-AUC"), ("macro_f1", "macro-F1")),
           "segmentation": (("dice", "Dice"), ("iou", "IoU"), ("pixel_accuracy", "pixel acc."))}


def _metrics(records: list[dict]) -> tuple[tuple[str, str], ...]:
    return METRICS["segmentation" if records and "dice" in records[0] else "classification"]



# ---------------------------------------------------------------------------------------------
# Driver


def run(backbones: list[Backbone], splits: dict[str, Split], classes: list[str], protocols, fractions, seeds,
        device, hp: dict | None = None, progress=print) -> list[dict]:
    """Every backbone x protocol x fraction x seed; returns one record per run."""

    from urfm_fast.eval.data import train_and_eval

    _bind_lazy()
    hp = hp or {}
    train, eval_name, ev = train_and_eval(splits)
    C = len(classes)
    records = []
    for bb in backbones:
        feats = None
        if {"linear", "knn"} & set(protocols):
            t0 = time.perf_counter()
            model = bb.make()
            feats = tuple(extract_features(model, split.images, bb, device, hp.get("batch_size", 256),
                                           show_progress=hp.get("show_progress", False)) for split in (train, ev))
            del model
            progress(f"[{bb.label}] features {tuple(feats[0].shape)} + {tuple(feats[1].shape)} "
                     f"in {time.perf_counter() - t0:.1f}s")
        for protocol, frac, seed, idx in label_runs(protocols, fractions, seeds, train.labels.numpy(), train.groups):
            t0 = time.perf_counter()
            if protocol == "linear":
                probs = linear_probe(feats[0][idx], train.labels[idx], feats[1], C, seed,
                                     epochs=hp.get("lp_epochs", 100), lr=hp.get("lp_lr", 0.1),
                                     min_steps=hp.get("lp_min_steps", 300))
            elif protocol == "knn":
                probs = knn_classify(feats[0][idx], train.labels[idx], feats[1], C, k=hp.get("knn_k", 20),
                                     temperature=hp.get("knn_t", 0.07))
            else:
                probs = finetune(bb, Split(train.images[idx], train.labels[idx]), ev.images, C, seed, device,
                                 epochs=hp.get("ft_epochs", 30), blr=hp.get("ft_blr", 1e-3),
                                 batch_size=hp.get("ft_batch_size", 64), min_steps=hp.get("ft_min_steps", 100),
                                 show_progress=hp.get("show_progress", False))
            m = classification_metrics(probs.float().numpy(), ev.labels.numpy(), C)
            rec = dict(backbone=bb.label, protocol=protocol, fraction=frac, seed=seed, n_train=len(idx),
                       eval_split=eval_name, n_eval=len(ev.labels),
                       seconds=round(time.perf_counter() - t0, 2), **m)
            records.append(rec)
            progress(f"[{bb.label}] {protocol:8s} frac={frac:<5g} seed={seed} n={len(idx):5d} "
                     f"acc={m['accuracy']:.4f} auc={m['macro_auc']:.4f} f1={m['macro_f1']:.4f}")
    return records


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["backbone"], r["protocol"], r["fraction"]), []).append(r)
    out = []
    for (b, p, f), rs in groups.items():
        row = dict(backbone=b, protocol=p, fraction=f, n_train=rs[0]["n_train"], seeds=len(rs))
        for k, _ in _metrics(rs):
            v = np.array([r[k] for r in rs], dtype=np.float64)
            row[k] = float(v.mean())
            row[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(row)
    return out


def format_table(summary: list[dict], markdown: bool = False) -> str:
    metrics = _metrics(summary)
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
    key, name = _metrics(summary)[0]
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
        add_scalars(writer, f"{s['backbone']}/{s['protocol']}", s, s["n_train"], [k for k, _ in _metrics([s])])
    writer.close()


def _floats(s):
    return [float(v) for v in s.split(",") if v]


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    from urfm_fast.cli_checks import DefaultsHelpFormatter, OneLineParser

    p = OneLineParser(prog="python -m urfm_fast.evaluate", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backbone", nargs="+", required=True,
                   help="[label=]checkpoint|mae:FILE|random|timm:MODEL=FILE|teacher:SPEC|timm:NAME (below)")
    p.add_argument("--data", required=True, help="ImageFolder root, shard folder (with --labels), UltraBench "
                   "folder, images/ + masks/ folders, 'synthetic' or 'synthetic-seg'")
    p.add_argument("--task", default="auto", choices=["auto", "classification", "segmentation"],
                   help="auto: segmentation when --data holds masks (or --mask-key), else classification")
    p.add_argument("--label-key", metavar="KEY", help="UltraBench: the class field of the records (e.g. pathology)")
    p.add_argument("--mask-key", metavar="KEY", help="UltraBench: the mask field of the records (e.g. tumor_mask)")
    p.add_argument("--scan-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="UltraBench: set the pixels outside each record's scan_mask to 0")
    p.add_argument("--num-classes", type=int, default=None, help="segmentation: classes incl. background "
                   "(default: the largest class id in the masks + 1; a larger id is an error)")
    p.add_argument("--probe-layers", type=int, default=1, choices=[1, 4], help="segmentation linear probe: "
                   "patch tokens of the last block, or of the last four concatenated (DINOv2)")
    p.add_argument("--labels", metavar="CSV", help="labels of a shard folder: CSV path,label,split[,frame] or "
                   "index,label,split (format below)")
    p.add_argument("--key", metavar="FILE", default=None, help="the key of the shard folder, for --labels that "
                   "name files by path (default: DATA.key beside the folder, as prepare writes it)")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOLS, help="comma list of linear, knn, finetune "
                   "(segmentation: linear and finetune only)")
    p.add_argument("--label-fractions", type=_floats, default="0.01,0.1,1.0", metavar="F,F,...",
                   help="fractions of the labelled training images, each in (0, 1]")
    p.add_argument("--seeds", type=_ints, default="0,1,2", metavar="S,S,...",
                   help="seeds of the label subsets and the trained heads")
    p.add_argument("--out", default="runs/evaluate", help="folder for results.json, label_efficiency.png and, "
                   "with tensorboard installed, its event files")
    p.add_argument("--force", action="store_true", help="overwrite results already in --out")
    p.add_argument("--weights", default="auto", choices=["auto", "ema", "live"],
                   help="checkpoint weights: auto = the EMA once it has had >= 1/(1-decay) updates, else live")
    p.add_argument("--arch", default="vit_base", help="architecture of --backbone random")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--global-pool", default="token", choices=["token", "avg"], help="pooled feature: CLS token "
                   "or mean of the patch tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("--lp-epochs", type=int, default=100, help="linear-probe epochs")
    p.add_argument("--lp-lr", type=float, default=0.1, help="linear-probe learning rate (SGD)")
    p.add_argument("--lp-min-steps", type=int, default=300, help="linear-probe steps at least (tiny fractions)")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN vote")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of the k-NN vote weights")
    p.add_argument("--ft-epochs", type=int, default=30, help="fine-tuning epochs")
    p.add_argument("--ft-min-steps", type=int, default=100, help="fine-tuning steps at least (tiny fractions)")
    p.add_argument("--ft-batch-size", type=int, default=64, help="fine-tuning batch")
    p.add_argument("--ft-blr", type=float, default=1e-3, help="fine-tuning base lr: lr = blr * batch / 256 (MAE)")
    p.add_argument("--synthetic-train", type=int, default=2000, help="training images of --data synthetic")
    p.add_argument("--synthetic-val", type=int, default=1000, help="evaluation images of --data synthetic")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    return p


_ABSENT = "undefined: a class neither in the evaluation split's masks nor predicted"
NULL_REASONS = {"macro_auc": "undefined: no class of the evaluation split has both positives and negatives "
                             "(a single-class split)",
                "dice": "undefined: no foreground class in the evaluation split's masks or predictions",
                "iou": "undefined: no foreground class in the evaluation split's masks or predictions",
                "dice_per_class": _ABSENT, "iou_per_class": _ABSENT}


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


def check_args(a) -> None:
    """Every flag in range before any work (cli_checks.FlagError: one line, exit 2)."""
    from urfm_fast.cli_checks import FlagError, check_writable_now, existing, float_in, int_in, writable_dir

    if not a.label_fractions or not a.seeds:
        raise FlagError("--label-fractions and --seeds need at least one value each")
    for f in a.label_fractions:
        float_in("label_fractions", f, 0.0, 1.0, lo_open=True)
    for seed in a.seeds:
        int_in("seeds", seed, 0, 2**32 - 1)
    if a.img_size is not None:
        int_in("img_size", a.img_size, 16, 2048)
    for name, lo, hi in (("batch_size", 1, 65536), ("lp_epochs", 1, 10**5), ("lp_min_steps", 0, 10**7),
                         ("knn_k", 1, 10**6), ("ft_epochs", 1, 10**4), ("ft_min_steps", 0, 10**7),
                         ("ft_batch_size", 1, 65536),
                         ("synthetic_train", 8, 10**6), ("synthetic_val", 4, 10**6)):
        int_in(name, getattr(a, name), lo, hi)
    if a.threads is not None:
        int_in("threads", a.threads, 1, 1024)
    for name, hi in (("lp_lr", 100.0), ("knn_t", 100.0), ("ft_blr", 10.0)):
        float_in(name, getattr(a, name), 0.0, hi, lo_open=True)
    if a.data not in ("synthetic", "synthetic-seg"):
        existing("data", a.data, "dir")
    if a.num_classes is not None:
        int_in("num_classes", a.num_classes, 2, 256)
    if a.labels is not None:
        existing("labels", a.labels, "file")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", a.device):
        raise FlagError(f"--device {a.device}: must be auto, cpu, cuda, cuda:N or mps")
    check_writable_now(writable_dir("out", a.out))  # a read-only disk now, not after all the work


def check_task(task: str, protocols: list[str], backbones: list[Backbone] = (), probe_layers: int = 1) -> None:
    """What a task cannot run, as one line (ValueError), before any work."""
    frozen = [b for b in backbones if b.meta.get("trainable") is False]
    if frozen and "finetune" in protocols:
        raise ValueError(f"--protocol finetune: backbone {frozen[0].label!r} ({frozen[0].spec}) is a frozen "
                         "teacher; it can be probed (linear" + (")" if task == "segmentation" else ", knn)")
                         + ", not fine-tuned")
    if task != "segmentation":
        return
    bad = [p for p in protocols if p not in SEG_PROTOCOLS]
    if bad:
        raise ValueError(f"--protocol {bad[0]} is a classification protocol; segmentation runs "
                         f"{', '.join(SEG_PROTOCOLS)}")
    if "finetune" in protocols:
        if importlib.util.find_spec("segmentation_models_pytorch") is None:
            raise ValueError("--protocol finetune --task segmentation needs segmentation-models-pytorch: "
                             "pip install 'urfm_fast[seg]'")
    if probe_layers > 1 and "linear" in protocols:
        from urfm_fast.eval.segmentation import check_probe_layers

        for b in backbones:
            check_probe_layers(b.make(), probe_layers, b.label)


def task_protocols(a, task: str, protocols: list[str]) -> list[str]:
    """The protocols to run: the default list less those a segmentation task has no use for (knn)."""
    if task == "segmentation" and a.protocol == DEFAULT_PROTOCOLS:
        return [p for p in protocols if p in SEG_PROTOCOLS]
    return protocols


def load_inputs(a) -> tuple[list[Backbone], str, dict, list[str], int]:
    """The backbones and the data: (backbones, task, splits, classes, input size)."""
    from urfm_fast.eval.seg_data import load_task

    backbones = [resolve_backbone(s, a.arch, a.global_pool, a.img_size, a.weights) for s in a.backbone]
    size = a.img_size or backbones[0].img_size
    if any(b.img_size != size for b in backbones):
        # Native sizes differ (e.g. a 64-px checkpoint beside a 224-px one): every backbone gets the
        # first one's input size (position embeddings resampled), as the data is read once at that size.
        print(f"backbones differ in input size; all run at {size}px (the first backbone's; set --img-size)")
        backbones = [resolve_backbone(s, a.arch, a.global_pool, size, a.weights) for s in a.backbone]
    found = load_task(a.data, size, a.task, a.labels, a.synthetic_train, a.synthetic_val, a.label_key, a.mask_key,
                      a.scan_mask, a.num_classes)
    if found is None:
        if a.task == "segmentation":
            raise ValueError(f"{a.data}: --task segmentation needs masks: an UltraBench folder with a *_mask field, "
                             "images/ + masks/ folders, or synthetic-seg")
        found = ("classification", *load_data(a.data, size, a.labels, a.synthetic_train, a.synthetic_val, key=a.key))
    task, splits, classes = found
    if a.task != "auto" and task != a.task:
        raise ValueError(f"{a.data}: holds a {task} task, not {a.task} (--task)")
    return backbones, task, splits, classes, size


def _hyper_parameters(a) -> dict:
    return dict(batch_size=a.batch_size, lp_epochs=a.lp_epochs, lp_min_steps=a.lp_min_steps, lp_lr=a.lp_lr,
                knn_k=a.knn_k, knn_t=a.knn_t,
                ft_epochs=a.ft_epochs, ft_blr=a.ft_blr, ft_batch_size=a.ft_batch_size, ft_min_steps=a.ft_min_steps,
                probe_layers=a.probe_layers, show_progress=not a.quiet and sys.stderr.isatty())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(argv)
    protocols = [p.strip() for p in a.protocol.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS] or ([] if protocols else ["(none)"])
    if bad:
        print(f"error: unknown protocol {bad[0]!r}; choose from {', '.join(PROTOCOLS)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if (out / "results.json").exists() and not a.force:
        print(f"error: {out / 'results.json'} exists; pass --force or another --out", file=sys.stderr)
        return 2
    try:
        check_args(a)
        early = "segmentation" if a.data == "synthetic-seg" or a.mask_key else a.task
        check_task(early, task_protocols(a, early, protocols))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    _bind_lazy()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    from urfm_fast.checkpoints.formats import CheckpointError

    try:
        backbones, task, splits, classes, size = load_inputs(a)
        protocols = task_protocols(a, task, protocols)
        check_task(task, protocols, backbones, a.probe_layers)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"data {a.data}: {task}, {len(classes)} classes, "
          + ", ".join(f"{k} {len(v.images)}" for k, v in splits.items()) + f", {size}px; device {device}")
    if task == "segmentation":
        from urfm_fast.eval.segmentation import run_segmentation as runner
    else:
        runner = run
    records = runner(backbones, splits, classes, protocols, a.label_fractions, a.seeds, device, _hyper_parameters(a))
    summary = summarize(records)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(args=vars(a), task=task, classes=classes, backbones={b.label: b.meta for b in backbones},
                  summary=summary, runs=records)
    (out / "results.json").write_text(json.dumps(json_safe(result), indent=1, default=str, allow_nan=False) + "\n")
    print(format_table(summary))
    write_events(summary, out)
    png = plot(summary, out / "label_efficiency.png")
    print(f"wrote {out / 'results.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation data: every split becomes uint8 [N, 3, S, S] in memory, read and resized once.

Sources: an ImageFolder root (train/, val/, optional test/), a shard folder from python -m urfm_fast.prepare
plus a labels CSV (format: urfm_fast.evaluate's docstring), or the built-in synthetic lesion task; and the
class-stratified, nested label fractions, grouped by patient where known. UltraBench folders, image/mask
pairs and synthetic masks: seg_data.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The evaluate CLI's logger: its warnings keep the logger name users filter on.
log = logging.getLogger("urfm_fast.evaluate")


# ---------------------------------------------------------------------------------------------
# Label fractions


def stratified_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified ``fraction`` of ``labels`` (>= 1 per class), nested across fractions."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]  # one order per (seed, class): smaller fractions nest
        out.append(idx[: max(1, math.ceil(fraction * len(idx) - 1e-9))])
    return np.sort(np.concatenate(out))


def label_subset(strata, fraction: float, seed: int, groups=None) -> np.ndarray:
    """``stratified_subset`` of images, or, with ``groups`` (a patient id per image), of whole groups: each
    group takes its most common stratum and a stratified fraction of the groups brings all its images, so no
    patient is split between the labelled and the unlabelled images. Nested across fractions as well."""
    if groups is None:
        return stratified_subset(strata, fraction, seed)
    strata, groups = np.asarray(strata), np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    group_stratum = np.array([np.bincount(strata[inverse == k]).argmax() for k in range(len(ids))])
    chosen = stratified_subset(group_stratum, fraction, seed)
    return np.flatnonzero(np.isin(inverse, chosen))


def label_runs(protocols, fractions, seeds, strata, groups=None):
    """(protocol, fraction, seed, int64 indices of the labelled subset) of every run of a sweep."""
    for protocol in protocols:
        for frac in fractions:
            for seed in seeds:
                yield protocol, frac, seed, torch.from_numpy(label_subset(strata, frac, seed, groups))


def sweep(backbones, train, strata, eval_name: str, n_eval: int, protocols, fractions, seeds, prepare, score,
          done=(), on_record=print) -> list[dict]:
    """Every backbone x protocol x fraction x seed whose key (label, protocol, fraction, seed) is not in ``done``
    (a run continued): ``prepare(bb, protocols)`` once per backbone (e.g. frozen features; None when no row
    of it is left), ``score(bb, protocol, seed, idx, prepared)`` -> the metrics of one row. One record per row,
    each handed to ``on_record`` as it finishes."""
    records = []
    for bb in backbones:
        rows = [(p, f, s, idx) for p, f, s, idx in label_runs(protocols, fractions, seeds, strata, train.groups)
                if (bb.label, p, float(f), int(s)) not in done]
        if not rows:
            continue
        prepared = prepare(bb, {r[0] for r in rows})
        for protocol, frac, seed, idx in rows:
            t0 = time.perf_counter()
            m = score(bb, protocol, seed, idx, prepared)
            rec = dict(backbone=bb.label, protocol=protocol, fraction=frac, seed=seed, n_train=len(idx),
                       eval_split=eval_name, n_eval=n_eval, seconds=round(time.perf_counter() - t0, 2), **m)
            records.append(rec)
            on_record(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Data: every split becomes uint8 [N, 3, S, S] in memory (read and resized once)


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    groups: np.ndarray | None = None  # int [N] patient of each image (UltraBench), else None


def resize_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C,H,W] -> uint8 [3,S,S]: short side to S (antialiased bilinear), centre crop, grey -> 3ch."""
    c, h, w = img.shape
    if c == 1:
        img = img.expand(3, h, w)
    elif c == 4:
        img = img[:3]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        img = x[0, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return img.contiguous()


def _stack(items, size: int) -> Split:
    imgs, labs = zip(*items) if items else ((), ())
    return Split(torch.stack([resize_crop(i, size) for i in imgs]), torch.tensor(labs, dtype=torch.int64))


def load_imagefolder(root: Path, size: int) -> tuple[dict[str, Split], list[str]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    splits, classes = {}, None
    for name in ("train", "val", "test"):
        if not (root / name).is_dir():
            continue
        ds = ImageFolder(str(root / name), loader=lambda p: Image.open(p).convert("RGB"))
        if classes is not None and ds.classes != classes:
            raise ValueError(f"{root / name}: classes {ds.classes} differ from train's {classes}")
        classes = ds.classes
        splits[name] = _stack([(pil_to_tensor(img), lab) for img, lab in ds], size)
    return splits, classes


SPLITS = ("train", "val", "test")
def class_order(names):
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_labels_csv(labels_file: Path) -> tuple[list[str], list[dict]]:
    """-> (the stripped header, the rows) of a labels CSV whose header names what each row holds."""
    if not Path(labels_file).is_file():
        raise ValueError(f"labels file {labels_file} does not exist")
    with open(labels_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    if not {"label", "split"} <= set(header) or not ({"index", "path"} & set(header)):
        raise ValueError(f"{labels_file}: header {','.join(header) or '(none)'}; expected index,label,split or "
                         "path,label,split[,frame] (see --help)")
    return header, rows


def _row_items(r: dict, header: list[str], where: str, root: Path, records: list, find) -> list[int]:
    """The shard item indices one CSV row names: by index, or by path (and frame)."""
    from urfm_fast.data.source_ids import record_source

    if "index" in header:
        v = (r.get("index") or "").strip()
        if not v.isdigit():
            raise ValueError(f"{where}: index {v!r} is not a non-negative integer")
        if int(v) >= len(records):
            raise ValueError(f"{where}: index {v} is not in {root} (it holds images 0..{len(records) - 1})")
        return [int(v)]
    path = (r.get("path") or "").strip().replace("\\", "/")
    items = find(path)
    if not items:
        raise ValueError(f"{where}: path {path!r} is not in {root} (as prepare read it)")
    if len({record_source(records[k]) for k in items}) > 1:
        raise ValueError(f"{where}: path {path!r} is in several sources; write it as src/path")
    frame = (r.get("frame") or "").strip()
    if frame:
        items = [k for k in items if str(records[k]["frame"]) == frame]
        if not items:
            raise ValueError(f"{where}: {path!r} has no frame {frame} in {root}")
    return items


def read_shard_labels(root: Path, labels_file: Path, key=None) -> tuple[list[tuple[int, str, str]], int]:
    """Labels CSV -> ([(shard item index, label, split)], number of images in the shard folder).
    Rows naming files by path need the folder's key (`key`, default the file DIR.key beside it).

    Raises ValueError with a one-line message naming the file and line of the first problem."""
    from urfm_fast.data import shards
    from urfm_fast.data.source_ids import path_lookup

    if not shards.is_shard_dir(root):
        raise ValueError(f"{root} is not a shard folder (no {shards.MARKER}); --labels needs the --out of "
                         "python -m urfm_fast.prepare")
    records = shards.read_index(root)
    header, rows = _read_labels_csv(labels_file)
    # "path" or "src/path" -> item indices (hashed with the folder's key; index rows need no key)
    find = path_lookup(root, records, key) if "index" not in header else None
    out, seen = [], {}
    for line, r in enumerate(rows, start=2):
        where = f"{labels_file} line {line}"
        label, split = (r.get("label") or "").strip(), (r.get("split") or "").strip().lower()
        if not label:
            raise ValueError(f"{where}: empty label")
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of train, val, test")
        for k in _row_items(r, header, where, root, records, find):
            if k in seen and seen[k] != (label, split):
                raise ValueError(f"{where}: image {k} is labelled twice ({seen[k][0]}/{seen[k][1]} and "
                                 f"{label}/{split})")
            if k not in seen:
                seen[k] = (label, split)
                out.append((k, label, split))
    found = {sp for _, _, sp in out}
    if "train" not in found or not {"val", "test"} & found:
        raise ValueError(f"{labels_file}: splits {', '.join(sorted(found)) or '(none)'}; need train and val "
                         "(or test) rows")
    return out, len(records)


def load_shards(root: Path, labels_file: Path, size: int, key=None) -> tuple[dict[str, Split], list[str]]:
    """A shard folder from python -m urfm_fast.prepare plus a labels CSV (format: the module docstring)."""
    from urfm_fast.data.stream import ShardDataset

    rows, _ = read_shard_labels(root, labels_file, key)
    ds = ShardDataset(root)
    names = class_order(sorted({lab for _, lab, _ in rows}))
    cls = {n: i for i, n in enumerate(names)}
    splits = {}
    for name in SPLITS:
        items = [(ds[k], cls[lab]) for k, lab, sp in rows if sp == name]
        if items:
            splits[name] = _stack(items, size)
    return splits, names


def load_synthetic(size: int, n_train: int, n_val: int) -> tuple[dict[str, Split], list[str]]:
    from urfm_fast.data import synthetic

    # Seeds 1000/2000: never the images a synthetic pretraining run (seed 0 by default) has seen.
    splits = {}
    for name, n, seed in (("train", n_train, 1000), ("val", n_val, 2000)):
        x, y = synthetic.generate(n, size=size, seed=seed)
        splits[name] = Split(x.expand(-1, 3, -1, -1).contiguous(), y)
    return splits, list(synthetic.CLASSES)


def train_and_eval(splits: dict) -> tuple:
    """(train split, name of the reported split, that split): ``test`` when there is one, else ``val``."""
    name = "test" if "test" in splits else "val"
    return splits["train"], name, splits[name]


def load_data(spec: str, size: int, labels_file=None, n_train=2000, n_val=1000, key=None):
    from urfm_fast.data.shards import MARKER

    if spec == "synthetic":
        splits, classes = load_synthetic(size, n_train, n_val)
    else:
        root = Path(spec).expanduser()
        if labels_file:
            splits, classes = load_shards(root, Path(labels_file), size, key)
        elif (root / "train").is_dir():
            splits, classes = load_imagefolder(root, size)
        elif (root / MARKER).is_file():
            raise ValueError(f"{root} is a shard folder: pass --labels CSV (index,label,split or "
                             "path,label,split; see --help)")
        else:
            raise ValueError(f"{root}: expected train/ and val/ class folders, or a shard folder with --labels")
    if "train" not in splits or not ({"val", "test"} & set(splits)):
        raise ValueError(f"{spec}: need a train split and a val (or test) split, found {sorted(splits)}")
    check_classes(spec, splits, classes)
    return splits, classes


def check_classes(spec: str, splits: dict, classes: list[str]) -> None:
    """A classifier needs two classes to learn from; an evaluation split of one class has no AUC (said
    so in results.json, where macro_auc is null with a reason)."""
    n_train = len(torch.unique(splits["train"].labels)) if len(splits["train"].labels) else 0
    if n_train < 2:
        raise ValueError(f"{spec}: the train split holds {n_train} class(es) ({', '.join(classes) or 'none'}); "
                         "a classifier needs at least two")
    ev = splits.get("test", splits.get("val"))
    if len(ev.labels) == 0:
        raise ValueError(f"{spec}: the evaluation split is empty")
    if len(torch.unique(ev.labels)) < 2:
        log.warning("warning: the evaluation split holds one class: macro-AUC is undefined (null in results.json)")

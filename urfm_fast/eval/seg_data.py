"""Labelled data beyond ImageFolders: UltraBench folders (classification or segmentation), image/mask folder
pairs and the synthetic lesion masks. Every split is read once into memory: images uint8 [N, 3, S, S],
masks uint8 [N, S, S] of class ids.

UltraBench folder (made by ``ultrabench <dataset> RAW OUT``): ``train.json``, ``validation.json``, ``test.json``,
each a JSON array of records such as
    {"image": "images/0001.png", "scan_mask": "scan_masks/0001.png", "patient": "17",
     "pathology": "benign", "tumor_mask_binary": "masks/0001.png"}
with paths relative to the folder (earlier releases: ``train_val.json`` and ``test.json``). The task is a
class field (``--label-key``) or a mask field (``--mask-key``: a name holding ``_mask`` such as
``tumor_mask_binary``); ``patient`` groups the label fractions; ``scan_mask`` blanks the pixels outside the
scan. Masks of 0 and 255 only (binary masks saved for viewing) are read as classes 0 and 1.

Every problem with the input raises ValueError with one line naming the file or record.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from urfm_fast.eval.data import Split, class_order, resize_crop

log = logging.getLogger("urfm_fast.evaluate")
UB_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}
OLD_TRAIN = "train_val.json"  # earlier UltraBench releases: training and validation in one file
NOT_TASKS = {"image", "scan_mask", "patient"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class SegSplit:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    masks: torch.Tensor  # uint8 [N, S, S] class ids
    groups: np.ndarray | None = None  # int [N] patient of each image, else None

    @property
    def strata(self) -> torch.Tensor:
        """Each image's largest class id present (0: background only): label fractions stratify on it."""
        return self.masks.flatten(1).amax(1).long()

    def subset(self, idx) -> SegSplit:
        return SegSplit(self.images[idx], self.masks[idx], None if self.groups is None else self.groups[idx])


# ---------------------------------------------------------------------------------------------
# Files


def read_image(path: Path, where: str) -> torch.Tensor:
    """uint8 [C, H, W] (C = 1 or 3) of an image file; a missing or unreadable file is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{where}: file {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("L", "I", "I;16", "F", "1", "P", "LA") else im.convert("RGB")
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read {path} ({type(e).__name__})") from None
    return torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)


def read_mask(path: Path, where: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """int64 [H, W] class ids of a mask file (single-channel; a grey RGB copy is accepted); one line naming
    the file for a colour or fractional mask or one whose size differs from its image's ``size_hw``."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{where}: mask {path} does not exist")
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read mask {path} ({type(e).__name__})") from None
    if a.ndim == 3:
        if not (a[..., :3] == a[..., :1]).all():
            raise ValueError(f"{where}: mask {path} is a colour image; a mask holds one class id per pixel")
        a = a[..., 0]
    if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise ValueError(f"{where}: mask {path} holds values that are not integers; a mask holds class ids")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{where}: mask {path} has pixels of type {a.dtype}, not class ids")
    if a.min(initial=0) < 0:
        raise ValueError(f"{where}: mask {path} holds negative values; class ids start at 0")
    if size_hw is not None and tuple(a.shape) != tuple(size_hw):
        raise ValueError(f"{where}: mask {path} is {a.shape[1]}x{a.shape[0]} pixels, its image "
                         f"{size_hw[1]}x{size_hw[0]}")
    return a.astype(np.int64)


def _square(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C, H, W] -> [C, S, S]: the whole image resized (no crop, so no part of a mask is lost)."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    x = img[None].float()
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")[0].to(img.dtype)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def _seg_item(img: torch.Tensor, mask: np.ndarray, size: int, where: str):
    """-> (uint8 [3, S, S], int64 [S, S], where, the class ids of the full-size mask): resized at once, so
    only the small copies stay in memory; the ids are checked over all masks later."""
    img = _square(img, size, "bilinear")
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    m = _square(torch.from_numpy(mask)[None], size, "nearest")[0]
    return img.contiguous(), m, where, set(np.unique(mask).tolist())


# ---------------------------------------------------------------------------------------------
# UltraBench folders


def is_ultrabench(root: Path) -> bool:
    return (root / UB_FILES["train"]).is_file() or (root / OLD_TRAIN).is_file()


def _ub_file(root: Path, split: str) -> Path:
    if split == "train" and not (root / UB_FILES["train"]).is_file():
        return root / OLD_TRAIN
    return root / UB_FILES[split]


def read_records(root: Path) -> dict[str, list[dict]]:
    """{split: records} of the JSON files present; train and validation or test required, none empty."""
    out = {}
    for split in UB_FILES:
        path = _ub_file(root, split)
        if not path.is_file():
            continue
        try:
            recs = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(recs, list):
            raise ValueError(f"{path}: expected a JSON array of records, got {type(recs).__name__}")
        if not recs:
            raise ValueError(f"{path}: empty split (no records)")
        for i, r in enumerate(recs):
            if not isinstance(r, dict) or not isinstance(r.get("image"), str):
                raise ValueError(f"{path} record {i}: expected an object with an 'image' path")
        out[split] = recs
    if "train" not in out or not {"val", "test"} & set(out):
        raise ValueError(f"{root}: an UltraBench folder needs train.json and validation.json or test.json")
    return out


def task_candidates(records: list[dict]) -> tuple[list[str], list[str]]:
    """(label keys, mask keys) that could be the task: path fields named ``*_mask*``, and class fields (a
    string or integer in every record, taking at least two values and not one per record, i.e. not an id). Of
    two class fields that name the same classes (UltraBench's ``class`` and its integer ``label``) the one
    with names is kept."""
    keys = sorted(set().union(*(r.keys() for r in records)) - NOT_TASKS)
    masks = [k for k in keys if "_mask" in k and all(isinstance(r.get(k, ""), str) for r in records)]
    labels = []
    for k in keys:
        if k in masks:
            continue
        vals = [r.get(k) for r in records]
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in vals):
            continue
        if any(isinstance(v, str) and v.lower().endswith(IMAGE_EXTS) for v in vals):
            continue  # another path field
        n = len(set(vals))
        if 2 <= n < max(3, len(vals)):
            labels.append(k)
    kept = []  # fields with names first, so an integer twin is the one dropped
    for k in sorted(labels, key=lambda k: (not any(isinstance(r[k], str) for r in records), k)):
        if not any(_one_to_one(records, k, o) for o in kept):
            kept.append(k)
    return sorted(kept), masks


def _one_to_one(records: list[dict], a: str, b: str) -> bool:
    n = len({(r[a], r[b]) for r in records})
    return n == len({r[a] for r in records}) == len({r[b] for r in records})


def choose_task(root: Path, records: list[dict], task: str, label_key: str | None, mask_key: str | None):
    """-> ("classification", key) or ("segmentation", key); one line listing the candidates when ambiguous."""
    if label_key and mask_key:
        raise ValueError("pass --label-key or --mask-key, not both")
    if label_key:
        return "classification", label_key
    if mask_key:
        return "segmentation", mask_key
    labels, masks = task_candidates(records)
    pool = {"classification": labels, "segmentation": masks}.get(task, labels + masks)
    if len(pool) == 1:
        return ("segmentation" if pool[0] in masks else "classification"), pool[0]
    what = f"label keys {', '.join(labels) or '(none)'}; mask keys {', '.join(masks) or '(none)'}"
    if not pool:
        kind = "" if task == "auto" else f"{task} "
        raise ValueError(f"{root}: no {kind}task field in train.json ({what}); name one with --label-key or --mask-key")
    raise ValueError(f"{root}: several tasks ({what}); pick one with --label-key KEY or --mask-key KEY")


def _field(rec: dict, key: str, where: str):
    if key not in rec or rec[key] is None:
        raise ValueError(f"{where}: no {key!r} field")
    return rec[key]


def _image(root: Path, rec: dict, where: str, scan_mask: bool) -> torch.Tensor:
    """The record's image, pixels outside its scan mask set to 0 when asked (and the record has one)."""
    img = read_image(root / rec["image"], where)
    if scan_mask and rec.get("scan_mask"):
        scan = read_mask(root / rec["scan_mask"], where, tuple(img.shape[-2:]))
        img = img * torch.from_numpy(scan > 0)[None]
    return img


def _groups(recs: list[dict], ids: dict) -> np.ndarray | None:
    """Patients as small integers (the identifiers themselves go nowhere else), or None without the field."""
    if not all("patient" in r for r in recs):
        return None
    return np.array([ids.setdefault(str(r["patient"]), len(ids)) for r in recs], dtype=np.int64)


def load_ultrabench(root: Path, size: int, task="auto", label_key=None, mask_key=None, scan_mask=True,
                    num_classes=None):
    """-> (task, splits, classes): Split for a class field, SegSplit for a mask field."""
    recs = read_records(root)
    task, key = choose_task(root, recs["train"], task, label_key, mask_key)
    ids: dict = {}
    if task == "classification":
        for split, rs in recs.items():
            for i, r in enumerate(rs):
                _field(r, key, f"{_ub_file(root, split)} record {i}")
        names = class_order(sorted({str(r[key]) for rs in recs.values() for r in rs}))
        cls = {n: i for i, n in enumerate(names)}
        splits = {}
        for split, rs in recs.items():
            imgs = [resize_crop(_image(root, r, f"{_ub_file(root, split)} record {i}", scan_mask), size)
                    for i, r in enumerate(rs)]
            splits[split] = Split(torch.stack(imgs), torch.tensor([cls[str(r[key])] for r in rs]), _groups(rs, ids))
        return task, splits, names
    items = {}
    for split, rs in recs.items():
        pairs = []
        for i, r in enumerate(rs):
            where = f"{_ub_file(root, split)} record {i}"
            img = _image(root, r, where, scan_mask)
            mask = read_mask(root / str(_field(r, key, where)), where, tuple(img.shape[-2:]))
            pairs.append(_seg_item(img, mask, size, where))
        items[split] = (pairs, _groups(rs, ids))
    splits, classes = _seg_splits({k: v[0] for k, v in items.items()}, num_classes)
    for split, (_, groups) in items.items():
        splits[split].groups = groups
    return task, splits, classes


def _seg_splits(items: dict[str, list], num_classes: int | None):
    """{split: [_seg_item]} -> ({split: SegSplit}, class names); class ids checked against C."""
    values = set().union(*(ids for pairs in items.values() for *_, ids in pairs))
    binary = 255 in values and values <= {0, 255}
    if binary:  # a binary mask saved for viewing: 255 is the foreground
        log.info("masks hold 0 and 255 only: read as background (0) and foreground (1)")
        values = {0, 1}
    top = max(values)
    C = num_classes or max(2, top + 1)
    if top >= C:
        where, ids = next((w, ids) for pairs in items.values() for *_, w, ids in pairs if max(ids) >= C)
        raise ValueError(f"{where}: mask holds class id {max(ids)}, but --num-classes is {C} (ids 0..{C - 1})")
    if top >= 256:
        raise ValueError(f"masks hold class ids up to {top}; at most 256 classes are supported")
    splits = {}
    for split, pairs in items.items():
        masks = torch.stack([m for _, m, *_ in pairs])
        splits[split] = SegSplit(torch.stack([img for img, *_ in pairs]),
                                 ((masks > 0) if binary else masks).to(torch.uint8))
    return splits, ["background"] + [f"class_{c}" for c in range(1, C)]


# ---------------------------------------------------------------------------------------------
# Image/mask folder pairs: [train/ val/ test/] images/ + masks/ with the same file stems


def _split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in (("train", ("train",)), ("val", ("val", "validation")), ("test", ("test",))):
        d = next((root / n for n in names if (root / n / "images").is_dir()), None)
        if d is not None:
            found[split] = d
    return found


def is_mask_folder(root: Path) -> bool:
    return (root / "images").is_dir() or bool(_split_dirs(root))


def _pairs(d: Path) -> list[tuple[Path, Path]]:
    def files(sub):
        out = {}
        for p in sorted((d / sub).iterdir()) if (d / sub).is_dir() else []:
            if p.suffix.lower() in IMAGE_EXTS:
                if p.stem in out:
                    raise ValueError(f"{d / sub}: two files with the stem {p.stem!r}")
                out[p.stem] = p
        return out

    imgs, masks = files("images"), files("masks")
    if not imgs:
        raise ValueError(f"{d / 'images'}: empty split (no images)")
    for stem, p in imgs.items():
        if stem not in masks:
            raise ValueError(f"{p}: no mask {d / 'masks' / stem}.* with the same stem")
    for stem, p in masks.items():
        if stem not in imgs:
            raise ValueError(f"{p}: no image with the same stem in {d / 'images'}")
    return [(imgs[s], masks[s]) for s in imgs]


def load_mask_folder(root: Path, size: int, num_classes=None, seed: int = 0):
    """Without train/ val/ test/ folders the pairs are split 80/20 into train/val by a seeded permutation
    (logged: images of one patient may then land on both sides)."""
    dirs = _split_dirs(root)
    if dirs:
        if "train" not in dirs or not {"val", "test"} & set(dirs):
            raise ValueError(f"{root}: image/mask split folders {sorted(dirs)}; need train/ and val/ or test/")
        lists = {split: _pairs(d) for split, d in dirs.items()}
    else:
        pairs = _pairs(root)
        if len(pairs) < 2:
            raise ValueError(f"{root}: {len(pairs)} image/mask pair; need at least 2 to split into train and val")
        order = np.random.default_rng(seed).permutation(len(pairs))
        cut = max(1, math.floor(0.8 * len(pairs)))
        lists = {"train": [pairs[i] for i in order[:cut]], "val": [pairs[i] for i in order[cut:]]}
        log.warning(f"warning: {root} has no train/ val/ folders; split {cut}/{len(pairs) - cut} at random "
                    "(images of one patient may land in both)")
    items = {}
    for split, pairs in lists.items():
        items[split] = []
        for ip, mp in pairs:
            img = read_image(ip, str(ip))
            items[split].append(_seg_item(img, read_mask(mp, str(mp), tuple(img.shape[-2:])), size, str(mp)))
    return _seg_splits(items, num_classes)


# ---------------------------------------------------------------------------------------------
# Synthetic lesion masks


def load_synthetic_seg(size: int, n_train: int, n_val: int):
    """The synthetic lesions with exact per-pixel masks; train and val from seeds 1000 and 2000 (never the
    images of a synthetic pretraining run, seed 0)."""
    from urfm_fast.data import synthetic

    splits = {}
    for name, n, seed in (("train", n_train, 1000), ("val", n_val, 2000)):
        x, _, m = synthetic.generate(n, size=size, seed=seed, masks=True)
        splits[name] = SegSplit(x.expand(-1, 3, -1, -1).contiguous(), m)
    return splits, list(synthetic.SEG_CLASSES)


# ---------------------------------------------------------------------------------------------
# Every --data spec of urfm_fast.evaluate


def load_task(spec: str, size: int, task: str = "auto", labels_file=None, n_train=2000, n_val=1000,
              label_key=None, mask_key=None, scan_mask=True, num_classes=None):
    """-> (task, splits, classes) for an UltraBench folder, image/mask folders or synthetic-seg; None for the
    other ``--data`` specs (ImageFolder, shards + CSV, synthetic: eval.data.load_data). Classification splits
    are ``Split``, segmentation splits ``SegSplit``."""
    from urfm_fast.eval.data import check_classes

    root = Path(spec).expanduser()
    if spec == "synthetic-seg":
        return ("segmentation", *load_synthetic_seg(size, n_train, n_val))
    if spec == "synthetic" or labels_file:
        return None
    if is_ultrabench(root):
        found, splits, classes = load_ultrabench(root, size, task, label_key, mask_key, scan_mask, num_classes)
        if found == "classification":
            check_classes(spec, splits, classes)
        return found, splits, classes
    if is_mask_folder(root):
        return ("segmentation", *load_mask_folder(root, size, num_classes))
    return None

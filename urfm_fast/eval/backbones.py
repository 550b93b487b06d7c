"""The backbones evaluate compares: what each spec names, built once per protocol run.

``--backbone [LABEL=]SPEC``, every SPEC read offline from local files except ``timm:NAME``:

- a checkpoint path, or ``mae:FILE``: anything ``load_checkpoint`` reads, MAE-layout files included (the
  facebookresearch/mae layout, USF-MAE, the released URFM files); the architecture comes from the shapes,
  decoder keys are dropped, every encoder key must be there with its shape;
- ``random``: ``--arch`` at a fixed random init;
- ``timm:MODEL=FILE``: timm's ``MODEL`` with the weights of a local safetensors or torch file, strictly
  (the file's classifier, if any, is dropped: evaluation trains its own head);
- ``timm:NAME``: timm's own pretrained weights (these need a network or timm's cache);
- ``teacher:SPEC``: any ``pretrain --teacher`` spec (BiomedCLIP file or folder, ``efficientnet_lite0``,
  ``timm:MODEL=FILE``, ``open_clip:MODEL=FILE``) as a frozen backbone at its own input size and mean/std.
  It is probed only (``meta["trainable"]`` is False; fine-tuning refuses it).

Every ``Backbone.make(num_classes=0)`` gives a model with one interface, which the classification and the
dense probes read:

- ``m(x)``: pooled features [B, D];
- ``m.forward_features(x)``: tokens [B, P + h*w, D], P = ``getattr(m, "num_prefix_tokens", 0)``;
- the patch grid (h, w): ``m.patch_embed.grid_size`` when m has ``patch_embed``, else ``m.feature_grid``.

timm ViTs are that already; a model whose features are a map (a CNN, a teacher) is wrapped in a
``MapBackbone``. ``make(num_classes=K)`` (fine-tuning) gives the plain timm model with a new K-way head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD

KINDS = ("teacher:", "mae:", "timm:", "open_clip:")  # spec prefixes whose own syntax may hold '='
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")


@dataclass
class Backbone:
    label: str
    spec: str
    make: object  # (num_classes, drop_path_rate) -> model (see the module docstring)
    mean: tuple
    std: tuple
    img_size: int
    meta: dict  # format, weights, ...; "trainable": False for a backbone that can only be probed


# ---------------------------------------------------------------------------------------------
# Specs


def _default_label(target: str) -> str:
    kind, _, rest = target.partition(":")
    if kind == "teacher":
        inner_kind, _, inner = rest.partition(":")
        name = inner.partition("=")[0] if inner_kind in ("timm", "open_clip") and inner else Path(rest).stem or rest
        return f"teacher:{name}"
    if kind == "timm":
        return rest.partition("=")[0]
    return Path(rest if kind == "mae" else target).stem or target


def split_spec(spec: str) -> tuple[str, str]:
    """``[LABEL=]SPEC`` -> (label, SPEC). The '=' of ``timm:MODEL=FILE`` (and of the teacher specs) is not a
    label's: a label is the text before the first '=' only when that text is not a spec kind."""
    head, sep, rest = spec.partition("=")
    if sep and rest and not head.startswith(KINDS):
        return head or _default_label(rest), rest
    return _default_label(spec), spec


def named_file(target: str) -> str | None:
    """The local path a spec names, if any: mae:FILE, timm:MODEL=FILE, open_clip:MODEL=FILE, teacher:<one of
    those or a path>, or a bare path (a '/', a leading '.' or '~', or a weights suffix; a timm model name has
    none of these, an hf-hub: id is not local)."""
    kind, _, rest = target.partition(":")
    if kind == "teacher":
        return named_file(rest)
    if kind == "mae":
        return rest
    if kind in ("timm", "open_clip"):
        return rest.partition("=")[2] or None
    if kind == "hf-hub" or target in ("random", "efficientnet_lite0"):
        return None
    looks = "/" in target or target.startswith((".", "~")) or target.lower().endswith(WEIGHT_SUFFIXES)
    return target if looks else None


def check_exists(target: str) -> None:
    """A mistyped path says so (rather than being taken for a timm or hub name further on)."""
    path = named_file(target)
    if path is not None and not Path(path).expanduser().exists():
        raise ValueError(f"--backbone {target}: {path} does not exist")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _teacher(label: str, target: str, global_pool: str, img_size: int | None) -> Backbone:
    from urfm_fast.eval.tokens import TeacherBackbone
    from urfm_fast.model.teacher import load_teacher

    spec = target.removeprefix("teacher:")
    try:
        teacher = load_teacher(spec, input_size=img_size)
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # one line naming the spec
        raise ValueError(f"--backbone {target}: {_one_line(e).removeprefix(f'--teacher {spec}: ')}") from None
    size = img_size or getattr(teacher, "input_size", None) or 224

    def make(num_classes=0, drop_path_rate=0.0):
        if num_classes:
            raise ValueError(f"backbone {label!r} ({target}) is a frozen teacher: it can be probed (linear, knn), "
                             "not fine-tuned")
        return TeacherBackbone(teacher, size, global_pool)
    meta = {"format": "teacher", "source": teacher.source, "trainable": False}
    mean, std = (tuple(round(v, 8) for v in t.flatten().tolist()) for t in (teacher.mean, teacher.std))  # fp32 buffers
    return Backbone(label, target, make, mean, std, size, meta)


def _checkpoint(label: str, target: str, global_pool: str, img_size: int | None, weights: str):
    import torch

    from urfm_fast.checkpoints.backbone import load_backbone
    from urfm_fast.checkpoints.formats import load_checkpoint

    ckpt = load_checkpoint(Path(target.removeprefix("mae:")).expanduser(), weights=weights)
    print(f"[{label}] {ckpt.meta['weights']} weights ({ckpt.meta['weights_reason']})")
    if ckpt.meta["ignored_keys"]:  # neither encoder nor MAE decoder: say so, they are not loaded
        keys = ckpt.meta["ignored_keys"]
        print(f"[{label}] {len(keys)} keys outside the encoder and decoder not loaded, e.g. {keys[:3]}")

    def make(num_classes=0, drop_path_rate=0.0):
        torch.manual_seed(0)
        return load_backbone(ckpt, num_classes=num_classes, global_pool=global_pool, img_size=img_size,
                             drop_path_rate=drop_path_rate)
    meta = {k: ckpt.meta[k] for k in ("format", "weights", "weights_reason", "epoch", "step", "path")}
    meta["model"] = ckpt.config.model
    return make, meta


def _timm_file(target: str, img_size: int | None, weights: str):
    """``timm:MODEL=FILE``: every key of the model (classifier aside) in the file with its shape, no other."""
    import timm
    import torch

    from urfm_fast.checkpoints.formats import read_state_dict
    from urfm_fast.eval.tokens import as_backbone
    from urfm_fast.model.teacher.base import load_mapped

    name, _, file = target.removeprefix("timm:").partition("=")
    if not timm.is_model(name):
        raise ValueError(f"--backbone {target}: timm has no model {name!r}")
    sd = read_state_dict(file, weights=weights)
    ref = timm.create_model(name, pretrained=False)
    classifier = ref.pretrained_cfg.get("classifier") or ()
    drop = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)} if drop else sd
    ref.reset_classifier(0)
    load_mapped(ref, sd, str, f"--backbone {target}")  # checked once here, before any work

    def make(num_classes=0, drop_path_rate=0.0):
        torch.manual_seed(0)  # the new head's init, as for every other backbone
        kw = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}  # not every timm model takes it
        model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
        model.load_state_dict(sd, strict=True)
        if num_classes:
            model.reset_classifier(num_classes)
        return as_backbone(model, num_classes, img_size)
    return make, {"format": "timm_file", "name": name, "path": file}


def _timm_hub(target: str, img_size: int | None):
    import timm
    import torch

    from urfm_fast.eval.tokens import as_backbone

    name = target.removeprefix("timm:")

    def make(num_classes=0, drop_path_rate=0.0):
        torch.manual_seed(0)
        kw = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kw)
        return as_backbone(model, num_classes, img_size)
    return make, {"format": "timm", "name": name}


def resolve_backbone(spec: str, arch: str, global_pool: str, img_size: int | None, weights: str = "auto",
                     depth: int | None = None) -> Backbone:
    """``spec``: see the module docstring. ``weights`` (auto | ema | live): which weights of a checkpoint;
    ``depth``: blocks of ``random`` (None: the arch's)."""
    import torch

    from urfm_fast.checkpoints.backbone import load_backbone

    label, target = split_spec(spec)
    check_exists(target)
    if target.startswith("teacher:"):
        return _teacher(label, target, global_pool, img_size)
    if target == "random":
        def make(num_classes=0, drop_path_rate=0.0):
            torch.manual_seed(0)  # the same random init for every seed/fraction
            return load_backbone(None, arch=arch, num_classes=num_classes, global_pool=global_pool,
                                 img_size=img_size or 224, drop_path_rate=drop_path_rate, **shape)
        shape = {"depth": depth} if depth else {}
        meta = {"format": "random", "arch": arch, **shape}
    elif target.startswith("mae:") or Path(target).expanduser().exists():
        make, meta = _checkpoint(label, target, global_pool, img_size, weights)
    elif target.startswith("timm:") and "=" in target:
        make, meta = _timm_file(target, img_size, weights)
    else:
        make, meta = _timm_hub(target, img_size)
    meta["trainable"] = True
    probe = make()
    cfg = getattr(probe, "inner", probe).pretrained_cfg
    size = img_size or int(cfg["input_size"][-1])
    return Backbone(label, target, make, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                    size, meta)

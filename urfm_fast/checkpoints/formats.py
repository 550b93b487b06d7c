"""Read URFM checkpoints of every kind into one layout: MAE key names, config inferred from shapes.

Formats understood by ``load_checkpoint(path)``:

- the released URFM files (``mae_vit_{base,large,huge}_patch16_dec768d8b_all_biomedclip_1199.pth``):
  MAE-style pickles with ``model``, ``ema_state_dict``, ``optimizer``, ``epoch`` and ``args`` (an
  ``argparse.Namespace``);
- our own ``.pth`` (``python -m urfm_fast.pretrain``): the same keys plus ``step``;
- DCP folders (torch.distributed.checkpoint), read in one process without a process group;
- exports (``python -m urfm_fast.export``): a folder with ``model.safetensors`` + ``config.json``, or a
  bare ``.safetensors`` file (encoder only);
- a bare state dict (MAE/timm ViT keys) saved with ``torch.save``.

Pickles are read with ``weights_only=True`` and ``argparse.Namespace`` as the one extra allowed
class, so a checkpoint cannot run code. A DCP folder's ``.metadata`` file is a plain pickle by torch's
design: it is read with an allow-list of DCP's own metadata classes (urfm_fast.checkpoints.safe_load), and a file
that names anything else is refused as not a trusted checkpoint.

Every failure is a ``CheckpointError`` (a ``ValueError``) with a one-line message naming the file and
the problem, never a traceback from deep inside torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from urfm_fast.config import VIT_PRESETS, URFMConfig

# Prefixes/infixes added by wrappers: DDP/EMA (`module.`), torch.compile (`_orig_mod.`), activation
# checkpointing and FSDP1. They never occur in a real parameter name of ours.
_WRAPPER_SEGMENTS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
EMA_KEYS = ("ema_state_dict", "model_ema", "ema")
MODEL_KEYS = ("model", "state_dict", "model_state_dict")
ENCODER_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
# Standard ViT widths -> heads (timm's vit_{tiny,small,base,large,huge}); head dim 64 everywhere.
WIDTH_TO_HEADS = {dim: heads for dim, _, heads in VIT_PRESETS.values()}


class CheckpointError(ValueError):
    """A checkpoint, run folder or output folder that cannot be used (this module's readers and
    checkpoints/runs.py's run folders raise the same class). The message is one line that says why; every
    CLI prints it and exits with code 2."""


@dataclass
class LoadedCheckpoint:
    """``state_dict``: MAE-layout keys (encoder = timm ViT keys, plus ``decoder_*``/``mask_token`` when the
    file has a decoder). ``config``: the URFMConfig the tensors fit. ``meta``: epoch, step, format, which
    weights were taken (``ema`` or ``model``), the path, the training args as a dict."""

    state_dict: dict[str, torch.Tensor]
    config: URFMConfig
    meta: dict = field(default_factory=dict)

    @property
    def has_decoder(self) -> bool:
        return "decoder_pred.weight" in self.state_dict

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """timm ViT keys only (what ``export`` writes and ``load_backbone`` loads)."""
        from urfm_fast.model.urfm import DECODER_PREFIXES

        return {k: v for k, v in self.state_dict.items() if not k.startswith(DECODER_PREFIXES)}


# ---------------------------------------------------------------------------------------------
# Reading files


_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError,
                TypeError, ImportError, KeyError, IndexError, UnicodeDecodeError)


def torch_load(path: Path):
    """torch.load with weights_only=True and argparse.Namespace allowed; errors become one line."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        msg = str(e).strip().splitlines()
        first = next((m for m in msg if m.strip()), type(e).__name__)
        if "WeightsUnpickler error" in str(e):
            after = str(e).split("WeightsUnpickler error:", 1)[1].strip().splitlines()
            first = after[0].strip() if after else first
        if "Unsupported global" in str(e):
            g = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"an object of type {g.group(1)}" if g else "a Python object"
            raise CheckpointError(
                f"{path}: holds {what}, which weights_only loading does not allow (only tensors, "
                "containers and argparse.Namespace are); if you trust the file, re-save its state dicts "
                "with torch.save"
            ) from None
        if zipfile.is_zipfile(path) or "zip archive" in str(e) or "central directory" in str(e):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {first})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None


def _load_dcp(path: Path) -> dict:
    """A whole DCP folder as a nested dict (as ``dcp_to_torch_save`` would write it), in this process.
    The ``.metadata`` pickle and the byte entries are read by urfm_fast.checkpoints.safe_load: no code runs."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from urfm_fast.checkpoints.safe_load import (
        UntrustedCheckpoint,
        checkpoint_errors,
        dcp_cause,
        one_line,
        safe_load_planner,
        safe_reader,
    )

    try:
        reader = safe_reader(path)
        sd: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _load_state_dict(sd, storage_reader=reader, planner=safe_load_planner(whole=True), no_dist=True)
        return sd
    except CheckpointError:
        raise
    except checkpoint_errors() as e:  # CheckpointException (a BaseException), RuntimeError, OSError alike
        cause = dcp_cause(e)
        if isinstance(cause, UntrustedCheckpoint):
            msg = str(cause)
            raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
        if isinstance(cause, ValueError) and str(cause).startswith(str(path)):
            raise CheckpointError(str(cause)) from None
        raise CheckpointError(f"{path}: unreadable DCP checkpoint folder ({one_line(e)})") from None


def _read(path: Path) -> tuple[object, str]:
    """(raw object, container kind) for any supported path."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / ".metadata").is_file():
            return _load_dcp(path), "dcp"
        if (path / "model.safetensors").is_file():
            return _load_safetensors(path / "model.safetensors"), "export"
        for name in ("pytorch_model.bin", "checkpoint.pth"):
            if (path / name).is_file():
                return torch_load(path / name), "pth"
        raise CheckpointError(
            f"{path}: folder is neither a DCP checkpoint (.metadata) nor an export (model.safetensors)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), "safetensors"
    return torch_load(path), "pth"


# ---------------------------------------------------------------------------------------------
# Normalising the state dict


def clean_name(name: str) -> str:
    """A parameter name without the path segments wrappers add (``module.``, ``_orig_mod.``, ...)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrapper path segments wherever they occur in the keys."""
    return {clean_name(k): v for k, v in sd.items()}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items() if k != "n_averaged"
    )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not _is_state_dict(v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


WEIGHTS = ("auto", "ema", "live")


def trustworthy(updates: int | None, decay: float | None) -> bool:
    """An EMA worth preferring to the live weights: at least 1 / (1 - decay) updates (its time constant).
    Unknown count (a file from elsewhere, e.g. the released URFM checkpoints): trusted."""
    return updates is None or updates >= time_constant(decay)


def time_constant(decay: float | None) -> int:
    """1 / (1 - decay) updates, rounded (0.9999 -> 10000, not 10000.000000001)."""
    return math.ceil(1.0 / (1.0 - (decay if decay is not None else 0.9999)) - 1e-6)


def _ema_count(raw: dict) -> tuple[int | None, float | None]:
    """(EMA updates, EMA decay) recorded in one of our checkpoints; None where the file does not say."""
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
    updates = raw.get("ema_updates", trainer.get("ema_updates"))
    decay = raw.get("ema_decay", args.get("ema_decay"))
    return (None if updates is None else int(updates)), (None if decay is None else float(decay))


def resolve_weights(raw, weights: str) -> tuple[bool, str]:
    """``weights`` (auto | ema | live) -> (take the EMA?, why). auto: the EMA once it has had at least
    1 / (1 - decay) updates (or when the file does not record a count), else the live weights."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights != "auto":
        return weights == "ema", f"weights={weights}"
    updates, decay = _ema_count(raw) if isinstance(raw, dict) else (None, None)
    if updates is None:
        return True, "auto: EMA (no update count recorded)"
    if trustworthy(updates, decay):
        return True, f"auto: EMA ({updates} updates >= {time_constant(decay)})"
    return False, f"auto: live weights (the EMA had {updates} updates < {time_constant(decay)})"


def _pick_weights(raw, take_ema: bool, path: Path) -> tuple[dict, str, dict]:
    """(state dict, 'ema'|'model'|'state_dict', rest of the container)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a checkpoint dict or state dict")
    if _is_state_dict(raw):
        return raw, "state_dict", {}
    ema = next((raw[k] for k in EMA_KEYS if isinstance(raw.get(k), dict) and raw[k]), None)
    live = next((raw[k] for k in MODEL_KEYS if isinstance(raw.get(k), dict) and raw[k]), None)
    if ema is not None and not _is_state_dict(ema):  # e.g. a nested {'module': ...} or DCP nesting
        ema = {k: v for k, v in _flatten(ema).items() if isinstance(v, torch.Tensor)}
    if live is not None and not _is_state_dict(live):
        live = {k: v for k, v in _flatten(live).items() if isinstance(v, torch.Tensor)}
    if take_ema and ema:
        if live:  # an EMA of trainable parameters only: fixed buffers/embeddings come from the live model
            ema = {**{k: v for k, v in live.items() if k not in ema}, **ema}
        return ema, "ema", raw
    if live:
        return live, "model", raw
    if ema:
        return ema, "ema", raw
    keys = ", ".join(list(raw)[:8])
    raise CheckpointError(f"{path}: no model weights found (expected 'model' or 'ema_state_dict'; keys: {keys})")


def _args_dict(raw: dict) -> dict:
    """Training args (MAE: a Namespace) overlaid with our resolved model config when the file has one."""
    out = {}
    for key in ("args", "config", "cfg"):  # later wins: `config` is URFMConfig.to_dict() in our files
        a = raw.get(key)
        if isinstance(a, argparse.Namespace):
            out.update(vars(a))
        elif isinstance(a, dict):
            out.update(a)
    return out


def _dcp_sidecars(path: Path, rest: dict) -> None:
    """Our DCP folders keep the model config in config.json and step/epoch in trainer_rank0.pt."""
    cfg_file, trainer = path / "config.json", path / "trainer_rank0.pt"
    if cfg_file.is_file():
        try:
            run_cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable ({e})") from None
        if isinstance(run_cfg.get("model"), dict):
            rest.setdefault("config", run_cfg["model"])
        if isinstance(run_cfg.get("train"), dict) and "ema_decay" in run_cfg["train"]:
            rest.setdefault("ema_decay", run_cfg["train"]["ema_decay"])
    if trainer.is_file():
        t = torch_load(trainer)
        if isinstance(t, dict):
            for k in ("step", "epoch", "ema_updates"):
                if t.get(k) is not None:
                    rest.setdefault(k, t.get(k))


def read_state_dict(path: str | os.PathLike, weights: str = "auto") -> dict[str, torch.Tensor]:
    """The weights of any file or folder this module reads as one flat state dict, whatever its model:
    a bare state dict, or the ``weights`` (auto | ema | live) of a checkpoint dict (``model``/``state_dict``,
    ``ema_state_dict``, ...); wrapper segments (``module.``, ``_orig_mod.``) dropped. Errors: one line."""
    path = Path(path).expanduser()
    raw, _ = _read(path)
    take_ema, _ = resolve_weights(raw, weights)
    sd, _, _ = _pick_weights(raw, take_ema, path)
    return strip_wrappers({k: v for k, v in sd.items() if k != "n_averaged"})


# ---------------------------------------------------------------------------------------------
# Config from shapes


def _count(sd: dict, prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if ids and ids != set(range(len(ids))):
        raise CheckpointError(f"{prefix}* indices are not contiguous: {sorted(ids)[:8]}...")
    return len(ids)


def size_from_name(name: str) -> str | None:
    m = re.search(r"vit_(tiny|small|base|large|huge)", str(name))
    return f"vit_{m.group(1)}" if m else None


def infer_config(sd: dict[str, torch.Tensor], args: dict | None = None, origin: str = "checkpoint") -> URFMConfig:
    """URFMConfig from tensor shapes; heads from the training args' model name when present."""
    args = args or {}
    missing = [k for k in ENCODER_REQUIRED if k not in sd]
    if missing:
        sample = ", ".join(list(sd)[:4])
        raise CheckpointError(
            f"{origin}: not a ViT/URFM checkpoint (missing {', '.join(missing)}; found keys like {sample})"
        )
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"{origin}: patch_embed.proj.weight has shape {tuple(w.shape)}, expected [D, C, p, p]")
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = _count(sd, "blocks.")
    if depth == 0:
        raise CheckpointError(f"{origin}: no transformer blocks (blocks.0.*) found")
    n_tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(n_tokens - 1)
    if grid * grid != n_tokens - 1:
        raise CheckpointError(f"{origin}: pos_embed has {n_tokens} rows, not 1 + a square grid")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None else 4.0

    # Heads are invisible in the shapes (qkv is [3D, D] whatever the split): explicit args first, then
    # the size named in args.model (MAE: 'mae_vit_base_patch16_dec768d8b'), then the standard table.
    size = size_from_name(args.get("model", ""))
    if isinstance(args.get("num_heads"), int):
        num_heads = args["num_heads"]
    elif size and VIT_PRESETS[size][0] == embed_dim:
        num_heads = VIT_PRESETS[size][2]
    else:
        num_heads = WIDTH_TO_HEADS.get(embed_dim, max(1, embed_dim // 64))
    preset = next((n for n, (d, L, _) in VIT_PRESETS.items() if d == embed_dim and L == depth), None)

    fields = dict(
        model=preset or f"vit_custom_d{embed_dim}_l{depth}",
        img_size=grid * patch, patch_size=patch, in_chans=in_chans,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
    )
    if "decoder_embed.weight" in sd:
        dec_dim = int(sd["decoder_embed.weight"].shape[0])
        default_dec_heads = args.get("decoder_num_heads", 16)
        fields.update(
            decoder_embed_dim=dec_dim,
            decoder_depth=_count(sd, "decoder_blocks."),
            decoder_num_heads=default_dec_heads if dec_dim % default_dec_heads == 0 else max(1, dec_dim // 64),
            target_dim=int(sd["decoder_pred.weight"].shape[0]) if "decoder_pred.weight" in sd else 768,
        )
    for name in ("mask_ratio", "mask_type", "decoder", "loss_on", "loss", "target_norm"):
        if name in args:
            fields[name] = args[name]
    try:
        return URFMConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{origin}: inferred an invalid config ({e})") from None


def _check_against_model(sd: dict, cfg: URFMConfig, origin: str) -> dict:
    """Keys and shapes must be those of URFM(cfg) (decoder optional as a whole); returns unknown keys."""
    from urfm_fast.model.urfm import DECODER_PREFIXES, URFM

    with torch.device("meta"):
        ref = URFM(cfg).state_dict()
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in sd)
    expected = {k: v.shape for k, v in ref.items() if has_decoder or not k.startswith(DECODER_PREFIXES)}
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{origin}: missing {len(missing)} keys for {cfg.model}, e.g. {missing[:3]}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items() if sd[k].shape != s]
    if bad:
        raise CheckpointError(f"{origin}: shape mismatch for {cfg.model}: {bad[0]}")
    return {k: v for k, v in sd.items() if k not in expected}


# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, weights: str = "ema") -> LoadedCheckpoint:
    """Read any supported checkpoint (see module docstring) into MAE-layout keys + inferred config.

    ``weights``: ``ema`` takes ``ema_state_dict`` when the file has one (the released URFM files do), else
    ``model``; ``live`` takes the live ``model`` weights; ``auto`` takes the EMA only once it has had at
    least 1 / (1 - decay) updates (the count our checkpoints record; files without one: the EMA).
    ``meta['weights']`` says which were taken and ``meta['weights_reason']`` why.
    """
    path = Path(path).expanduser()
    raw, container = _read(path)
    if container == "dcp" and isinstance(raw, dict):
        _dcp_sidecars(path, raw)  # the EMA count and decay live in the sidecar files
    take_ema, reason = resolve_weights(raw, weights)
    sd, which, rest = _pick_weights(raw, take_ema, path)
    if which == "state_dict":
        reason = "the file holds one set of weights"
    elif take_ema and which == "model":
        reason = "the file has no EMA: live weights"
    elif not take_ema and which == "ema":
        reason = "the file has only EMA weights"
    sd = strip_wrappers({k: v for k, v in sd.items() if k != "n_averaged"})  # AveragedModel's counter
    if container == "dcp":
        _dcp_sidecars(path, rest)
    args = _args_dict(rest) if isinstance(rest, dict) else {}
    export_cfg = {}
    if container == "export" and (path / "config.json").is_file():
        try:
            export_cfg = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: unreadable ({e})") from None
        args = dict(export_cfg.get("model_args", {}), **export_cfg.get("urfm", {}).get("config", {}))
    cfg = infer_config(sd, args, origin=str(path))
    extra = _check_against_model(sd, cfg, str(path))
    sd = {k: v for k, v in sd.items() if k not in extra}

    if container in ("export", "safetensors"):
        fmt = "export"
    elif container == "dcp":
        fmt = "dcp"
    elif which == "state_dict":
        fmt = "state_dict"
    elif "step" in rest or isinstance(rest.get("config"), dict):
        fmt = "urfm_fast"
    else:
        fmt = "urfm_official"  # MAE/URFM layout: model/ema_state_dict/optimizer/epoch/args
    meta = dict(
        path=str(path), format=fmt, weights=which, weights_reason=reason,
        epoch=rest.get("epoch") if isinstance(rest, dict) else None,
        step=rest.get("step") if isinstance(rest, dict) else None,
        has_ema=any(isinstance(rest.get(k), dict) and rest.get(k) for k in EMA_KEYS) if rest else False,
        ignored_keys=sorted(extra),
        args={k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))},
    )
    for k in ("epoch", "step"):
        if isinstance(meta[k], torch.Tensor):
            meta[k] = int(meta[k])
    if export_cfg:
        meta["pretrained_cfg"] = export_cfg.get("pretrained_cfg", {})
    return LoadedCheckpoint(state_dict=sd, config=cfg, meta=meta)

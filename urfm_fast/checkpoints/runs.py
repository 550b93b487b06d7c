"""Run folders and checkpoints of ``python -m urfm_fast.pretrain``.

Two kinds, as in torchtitan:

- **Resumable** (periodic, on preemption, at the end): a DCP folder ``<out>/checkpoints/step_XXXXXXXX``
  with the sharded model, optimizer and EMA (DCP reshards them, so a run resumes on any number of
  ranks), one ``trainer_rank{r}.pt`` per rank (step, epoch, counters, RNG states, data position), the
  resolved ``config.json`` and a ``manifest.json`` listing every file and its size. Everything is
  written under ``.tmp-step_XXXXXXXX`` and renamed only when complete, so a crash mid-save never
  leaves a folder that looks finished; a folder whose files do not match its manifest is reported
  as corrupt and the previous one is used. The newest ``keep`` folders are kept.
  Saves are two-phase so that they can run in the background (``torch.distributed.checkpoint.
  async_save``: the state is copied to CPU memory, then a thread writes it while training goes on):
  ``start_save`` writes the per-rank files and launches the DCP write; ``finish_save`` waits for it
  on every rank, then writes the manifest, renames and prunes. Only a finished save is ever renamed.
- **Export** (end of run and on request): ``checkpoint-XXXXXXXX.pth`` in URFM's own format
  (``model``, ``ema_state_dict``, ``optimizer``, ``epoch``, ``step``, ``args``), written to a temporary
  name and renamed. ``args`` is a plain dict so ``torch.load(weights_only=True)`` reads the file with no
  allow-list; ``optimizer`` is ``torch.optim.AdamW.state_dict()``'s integer-id layout, as in URFM's files.

The run folder is recognised by ``config.json`` holding ``"kind": "urfm_fast.pretrain"``; nothing in a
folder that is not ours is ever written to.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from urfm_fast.checkpoints.formats import CheckpointError
from urfm_fast.checkpoints.safe_load import checkpoint_errors, one_line

# A single-process run saves and loads DCP checkpoints without a process group on purpose; DCP
# warns about that on every call (from the background writer too), which would only be noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

RUN_KIND = "urfm_fast.pretrain"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")
# a full disk, a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored), a full quota: one case for the user
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- run folders --------------------------------------------------------------------------------


def is_our_run(out: Path) -> bool:
    try:
        return json.loads((out / CONFIG_FILE).read_text()).get("kind") == RUN_KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to write into a folder we did not create, or over a run without ``--resume``."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_our_run(out):
        raise CheckpointError(
            f"--out {out} is not empty and is not a urfm_fast run folder (no {CONFIG_FILE} of ours); "
            "nothing there is overwritten: choose a new or empty --out"
        )
    if not resume:
        raise CheckpointError(
            f"--out {out} already holds a run; pass --resume to continue it, or choose another --out"
        )


@contextlib.contextmanager
def run_lock(out: Path):
    """Held by rank 0 for the whole run, taken before ``check_out_dir``: a second pretrain started into
    the same ``--out`` at the same time (or while an earlier one still saves) would pass that check too,
    before either has written config.json, and mix its checkpoints and metrics with the first's. An
    exclusive ``flock`` on the folder itself writes nothing into it, and the kernel drops it when the
    process ends, however it ends: a killed run leaves no stale lock. A folder it had to make is removed
    again when the run ends with nothing written in it (bad data refused before the first write)."""
    import fcntl

    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not a folder, or not creatable: check_out_dir and the first write say so in one line
        yield
        return
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"--out {out} is in use by another pretrain (started at the same time, or "
                                  "still saving); wait for it to end or choose another --out") from None
        except OSError:  # a file system without flock (some NFS and Lustre mounts): one run per folder is on you
            pass
        held = True
        yield
    finally:
        if made and held:  # still holding the lock: never a folder another run has taken
            with contextlib.suppress(OSError):  # not empty: the run wrote into it, and it stays
                out.rmdir()
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def truncate_metrics(out: Path, step: int) -> None:
    """On resume, drop metric records logged after the checkpoint so the file is one clean curve."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a torn last line from a killed run
            continue
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# -- resumable DCP checkpoints ------------------------------------------------------------------


def step_dir(out: Path, step: int) -> Path:
    return out / CKPT_DIR / f"step_{step:08d}"


def validate(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint folder, else the reason it is not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (the save did not finish)"
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Finished (renamed) checkpoint folders of a run, oldest first; not validated."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def candidates(resume: str, out: Path) -> list[Path]:
    """Checkpoints to try for ``--resume`` (newest first): a checkpoint folder, a run folder, or a .pth."""
    if resume == "latest":
        return [p for _, p in reversed(list_checkpoints(out))]
    path = Path(resume).expanduser()
    if path.is_file() and path.suffix == ".pth":
        return [path]
    if (path / MANIFEST).exists() or _STEP_RE.match(path.name):
        return [path]
    if path.is_dir():
        return [p for _, p in reversed(list_checkpoints(path))]
    raise CheckpointError(f"--resume {resume}: no such checkpoint folder, run folder or .pth file")


def async_available() -> bool:
    import torch.distributed.checkpoint as dcp

    return hasattr(dcp, "async_save")


@dataclass
class PendingSave:
    """A checkpoint whose DCP files may still be being written; ``finish_save`` completes it."""

    out: Path
    step: int
    tmp: Path
    final: Path
    future: Future
    config: dict
    keep: int

    def done(self) -> bool:
        return self.future.done()


def remove_partial(out: Path) -> None:
    """Delete what writes that never finished left behind (a killed run, a full disk): the temporary
    folders of checkpoints and the temporary files of the .pth, config.json and metrics.jsonl; rank 0 only."""
    root = out / CKPT_DIR
    if root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
    for name in (".tmp-checkpoint-*.pth", f".tmp-{CONFIG_FILE}", f".tmp-{METRICS_FILE}"):
        for p in out.glob(name):
            p.unlink(missing_ok=True)


def start_save(
    out: Path,
    step: int,
    state: dict,
    trainer_state: dict,
    config: dict,
    keep: int,
    *,
    asynchronous: bool = False,
    process_group=None,
    planner=None,
) -> PendingSave:
    """Begin a resumable checkpoint (a collective: every rank calls it) under ``.tmp-step_XXXXXXXX``.

    ``asynchronous``: ``dcp.async_save`` copies ``state`` to CPU memory now and writes it from a
    thread, so the caller may keep training; its collectives (plan exchange, metadata) then need a
    process group of their own (``process_group``, gloo), or they would interleave with training's.
    """
    import torch.distributed.checkpoint as dcp

    final = step_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise CheckpointError(f"cannot create {tmp} ({e.strerror or e}); check the disk (space, "
                                  "permissions) of --out") from None
    _barrier()
    kw = dict(checkpoint_id=str(tmp), planner=planner, no_dist=not dist.is_initialized())
    future = Future()
    try:
        torch.save(trainer_state, tmp / f"trainer_rank{rank}.pt")
        if asynchronous:
            future = dcp.async_save(state, process_group=process_group, **kw)
        else:
            future.set_result(dcp.save(state, **kw))
    except checkpoint_errors() as e:  # a full disk, DCP's CheckpointException: reported by finish_save
        future.set_exception(e if isinstance(e, Exception) else RuntimeError(one_line(e)))
    return PendingSave(out, step, tmp, final, future, config, keep)


def finish_save(p: PendingSave) -> Path:
    """Wait for the write on every rank, then manifest, rename and prune (a collective). Returns the
    final folder; raises CheckpointError on every rank if any rank failed to write its files."""
    try:
        p.future.result()
        error = None
    except checkpoint_errors() as e:  # CheckpointException is a BaseException
        error = f"rank {_rank()}: {one_line(e, 300)}"
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    errors = [e for e in errors if e]
    rank = _rank()
    if errors:
        if rank == 0:
            shutil.rmtree(p.tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {p.final} failed ({'; '.join(errors)}); check the disk "
                              "(space, permissions) of --out")
    error = None
    if rank == 0:
        try:
            _finalise(p)
        except OSError as e:  # a full or read-only disk: no temporary folder is left behind
            shutil.rmtree(p.tmp, ignore_errors=True)
            error = (f"writing checkpoint {p.final} failed ({e.strerror or e}); check the disk (space, permissions) "
                     "of --out")
    if dist.is_initialized():  # every rank raises the same error, none waits for rank 0 at a barrier
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)
    return p.final


def _finalise(p: PendingSave) -> None:
    """Rank 0: config, manifest, rename into place, prune."""
    tmp, final = p.tmp, p.final
    (tmp / CONFIG_FILE).write_text(json.dumps(p.config, indent=2, sort_keys=True, default=str) + "\n")
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
    manifest = {"step": p.step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "time": time.time(), "files": files}
    write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():  # re-saving the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(p.out, p.keep)


def save_dcp(out: Path, step: int, state: dict, trainer_state: dict, config: dict, keep: int) -> Path:
    """Write a resumable checkpoint synchronously (a collective). Returns the final folder."""
    return finish_save(start_save(out, step, state, trainer_state, config, keep))


def prune(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_dcp(path: Path, state: dict) -> dict:
    """Load ``state`` in place from a DCP folder; returns this rank's trainer state.

    With another world size than the saving run, rank r reads rank 0's trainer state (step, data
    position) and gets ``"resharded": True``; per-rank RNG states cannot be carried over then.
    """
    import torch.distributed.checkpoint as dcp

    from urfm_fast.checkpoints.safe_load import safe_load_planner, safe_reader

    # .metadata and the byte entries are read with allow-lists: a checkpoint folder runs no code
    dcp.load(state, storage_reader=safe_reader(path), planner=safe_load_planner(),
             no_dist=not dist.is_initialized())
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = json.loads((path / MANIFEST).read_text()).get("world_size", 1)
    same = saved_world == world
    trainer = torch.load(path / f"trainer_rank{rank if same else 0}.pt", map_location="cpu", weights_only=True)
    trainer["resharded"] = not same
    return trainer


# -- URFM-format .pth ---------------------------------------------------------------------------


def optim_to_ids(osd: dict) -> dict:
    """FQN-keyed optimizer state (torch.distributed.checkpoint.state_dict) -> torch's integer ids."""
    ids, groups = {}, []
    for g in osd["param_groups"]:
        g = dict(g)
        names = g["params"]
        g["params"] = list(range(len(ids), len(ids) + len(names)))
        ids.update({n: i for n, i in zip(names, g["params"])})
        groups.append(g)
    state = {ids[n]: s for n, s in osd["state"].items()}
    return {"state": state, "param_groups": groups, "param_names": list(ids)}


def optim_from_ids(osd: dict, names: list[str]) -> dict:
    """Inverse of ``optim_to_ids``; ``names`` are the FQNs in optimizer order."""
    names = osd.get("param_names", names)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]]
    return {"state": {names[i]: s for i, s in osd["state"].items()}, "param_groups": groups}


def save_pth(path: Path, model: dict, ema: dict, optimizer: dict, epoch: int, step: int, args: dict,
             extra: dict | None = None) -> Path:
    """URFM-format export, written to a temporary name and renamed (call on rank 0 only)."""
    obj = {"model": model, "ema_state_dict": ema, "optimizer": optimizer, "epoch": epoch, "step": step,
           "args": args}
    obj.update(extra or {})
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing {path} failed ({one_line(e)}); check the disk (space, permissions) "
                              "of --out") from None
    return path

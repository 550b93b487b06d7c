"""The trainer's checkpointing: what a checkpoint holds, saving (in the background), resuming, --init.

The file formats and their safety live in ``checkpoints/runs.py`` (run folders, DCP folders, the .pth) and
``checkpoints/formats.py`` (reading any URFM/ViT checkpoint); this module decides what goes in them and when
a background save is renamed into place.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from urfm_fast.checkpoints import runs as ckpt
from urfm_fast.checkpoints.formats import CheckpointError, clean_name, load_checkpoint, torch_load
from urfm_fast.checkpoints.safe_load import UntrustedCheckpoint, checkpoint_errors, dcp_cause, one_line
from urfm_fast.model.urfm import URFM
from urfm_fast.train.config import UsageError
from urfm_fast.train.distributed import Dist, broadcast_obj, gloo_group
from urfm_fast.train.plan import RunPlan

_DAMAGED = (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError)


@dataclass
class TrainState:
    """The loop's counters: saved in every checkpoint, restored by --resume."""

    step: int = 0
    skipped: int = 0  # steps whose update was skipped (NaN/Inf loss or gradients)
    bad_in_a_row: int = 0
    elapsed: float = 0.0  # seconds spent in steps, over all the run's sessions
    last_good: Path | None = None  # the newest complete resumable checkpoint
    pending: ckpt.PendingSave | None = None  # a save still being written in the background
    pending_since: int = 0  # the step that save was started at


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def ema_names(optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
    """(clean name, param) in optimizer order: how optim_to_ids numbered the parameters."""
    by_id = {id(p): clean_name(n) for n, p in model.named_parameters()}
    return [(by_id[id(p)], p) for g in optimizer.param_groups for p in g["params"]]


def init_from(student: URFM, path: str, say) -> None:
    """--init: weights only (EMA weights when the file has them), from an official or our checkpoint."""
    loaded = load_checkpoint(path, weights="ema")
    own = student.state_dict()
    sd = loaded.state_dict
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise UsageError(f"--init {path}: shapes differ from this model for {bad[:3]} (checkpoint config "
                         f"{loaded.config.model}, img {loaded.config.img_size}); match --model/--img-size/"
                         "decoder flags")
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected:
        raise UsageError(f"--init {path}: unexpected keys {unexpected[:5]}")
    say(f"initialised from {path} ({loaded.meta.get('weights', 'model')} weights"
        f"{', decoder re-initialised' if missing else ''})")


class CheckpointManager:
    """Resumable DCP checkpoints (periodic ones written in the background) and the URFM-format .pth.

    ``sd_model`` is the module whose state dict is saved: the DDP wrapper under DDP, else the student
    (FSDP2 shards it in place)."""

    def __init__(self, plan: RunPlan, d: Dist, sd_model, student, optimizer, ema, stream, mask_gen,
                 run_config: dict, say, faults=None):
        self.plan, self.d, self.say = plan, d, say
        self.out = Path(plan.train.out)
        self.sd_model, self.student, self.optimizer, self.ema = sd_model, student, optimizer, ema
        self.stream, self.mask_gen, self.run_config = stream, mask_gen, run_config
        self.state = TrainState()
        self.faults = faults  # test-only fault injection (train/faults.py): None in production
        self.use_async = plan.train.async_save and ckpt.async_available()
        # The background writer's collectives get a gloo group of their own (DCP requires a CPU backend;
        # sharing the training group would interleave its collectives with FSDP's).
        self.pg = gloo_group(plan.train.timeout) if self.use_async and d.enabled else None

    def app_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.sd_model, self.optimizer)
        return {"model": msd, "optimizer": osd, "ema": self.ema.state_dict()}

    def trainer_state(self) -> dict:
        s = self.state
        return {"step": s.step, "epoch": self.stream.epoch, "skipped": s.skipped, "bad_in_a_row": s.bad_in_a_row,
                "elapsed": s.elapsed, "data": self.stream.state_dict(), "rng": rng_state(self.d.device),
                "mask_gen": self.mask_gen.get_state(), "ema_updates": self.ema.num_updates}

    def save(self, step: int, background: bool = False) -> Path | None:
        """A resumable checkpoint of now. In the background, it is renamed into place by
        finish_pending: when every rank's write is done (checked each step), at the next save, or at
        the end; until then it is only a temporary folder, which a killed run leaves unfinished."""
        self.finish_pending()
        planner = self.faults.save_planner(step) if self.faults else None
        self.state.pending = ckpt.start_save(self.out, step, self.app_state(), self.trainer_state(),
                                             self.run_config, self.plan.train.keep,
                                             asynchronous=background and self.use_async, process_group=self.pg,
                                             planner=planner)
        self.state.pending_since = self.state.step
        return None if background and self.use_async else self.finish_pending()

    def writing(self) -> bool:
        return self.state.pending is not None and not self.state.pending.done()

    def finish_pending(self) -> Path | None:
        s = self.state
        p, s.pending = s.pending, None
        if p is None:
            return None
        waited = not p.done()
        try:
            s.last_good = ckpt.finish_save(p)
        except CheckpointError as e:  # a full disk: say what is still there to resume from
            raise CheckpointError(f"{e}; {self.kept()}") from None
        ran = s.step - s.pending_since
        if ran or waited:
            self.say(f"checkpoint {p.final.name} complete (written in the background while {ran} step(s) trained"
                     f"{'; waited for the rest' if waited else ''})")
        return s.last_good

    def abandon_pending(self) -> None:
        """A save still being written is abandoned: no temporary folder is left behind either."""
        if self.state.pending is not None and self.d.main:
            shutil.rmtree(self.state.pending.tmp, ignore_errors=True)

    def save_pth(self, step: int) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.sd_model, options=opts)
        osd = get_optimizer_state_dict(self.sd_model, self.optimizer, options=opts)
        esd = self.ema.full_state_dict()
        if not self.d.main:
            return None
        model_cfg = self.student.cfg
        extra = {"config": model_cfg.to_dict(), "trainer": self.trainer_state(), "ema_updates": self.ema.num_updates,
                 "ema_decay": self.plan.train.ema_decay}
        try:
            return ckpt.save_pth(self.out / f"checkpoint-{step:08d}.pth", msd, esd, ckpt.optim_to_ids(osd),
                                 self.stream.epoch, step, self.plan.pth_args(model_cfg), extra)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {self.kept()}") from None

    def kept(self) -> str:
        """What a failed write leaves behind (the end of its one-line error)."""
        last = self.state.last_good
        return (f"kept in {self.out}: {ckpt.CONFIG_FILE}, {ckpt.METRICS_FILE} and "
                f"{f'the last complete checkpoint {last}' if last else 'no complete checkpoint yet'}; "
                "make room and continue with --resume")

    def save_final(self) -> tuple[Path | None, Path | None]:
        """At the end or on preemption: wait for the background save, then save now (DCP, then .pth)."""
        self.finish_pending()
        path = self.state.last_good
        if path != ckpt.step_dir(self.out, self.state.step):  # (preempted right after a periodic save)
            path = self.save(self.state.step)
        # The .pth after the resumable checkpoint: a preemption grace period that runs out while the
        # (larger, gathered) .pth is written still leaves a complete DCP checkpoint behind.
        return path, self.save_pth(self.state.step)

    def start_run(self) -> None:
        """Resume when asked; then config.json (once per session) and metrics.jsonl cut to the step."""
        if self.plan.train.resume:
            self.resume()
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                ckpt.write_json_atomic(self.out / ckpt.CONFIG_FILE, self.run_config)
                ckpt.truncate_metrics(self.out, self.state.step)
            except OSError as e:
                self.disk_full(e)
                raise

    def disk_full(self, e: OSError) -> None:
        """A write failed for want of space: one line naming the file and what is kept (else returns)."""
        if e.errno in ckpt.DISK_FULL:
            raise CheckpointError(f"writing {e.filename or self.out} failed ({e.strerror}); {self.kept()}") from None

    # -- resume --------------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore model, EMA, optimizer, step, RNG and data position from the newest good checkpoint."""
        resume, out = self.plan.train.resume, self.out
        found = ckpt.candidates(resume, out)
        if not found:
            if resume == "latest":
                self.say(f"--resume: no checkpoint in {out} yet; starting from step 0")
                return
            raise CheckpointError(f"--resume {resume}: no checkpoint found")
        for path in found:
            trainer = self._load_pth(path) if path.suffix == ".pth" else self._load_dcp(path)
            if trainer is not None:
                break
        else:
            looked = out if resume == "latest" else Path(resume).expanduser()
            raise CheckpointError(f"--resume: none of the {len(found)} checkpoint(s) in {looked} is usable "
                                  "(see the lines above); a run of another model cannot be resumed (--init takes "
                                  "its weights)")
        self._restore_trainer(path, trainer)

    def _load_dcp(self, path: Path) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # rank 0's verdict for all: ranks that judged a folder on a shared file system apart could diverge
        reason = broadcast_obj(ckpt.validate(path) if self.d.main else None, self.d)
        if reason:
            self.say(f"checkpoint {path} is incomplete or corrupt ({reason}); trying the previous one")
            return None
        s = self.app_state()
        try:
            trainer = ckpt.load_dcp(path, s)
        except checkpoint_errors() as e:  # a damaged file DCP cannot read: every rank sees the failure
            if isinstance(dcp_cause(e), UntrustedCheckpoint):  # tampered: stop, never fall back silently
                raise CheckpointError(str(dcp_cause(e))) from None
            self.say(f"checkpoint {path} could not be read ({one_line(e)}); trying the previous one")
            return None
        set_state_dict(self.sd_model, self.optimizer, model_state_dict=s["model"], optim_state_dict=s["optimizer"],
                       options=StateDictOptions(strict=True))
        self.ema.load_state_dict(s["ema"])
        return trainer

    def _load_pth(self, path: Path) -> dict:
        """Resume from our URFM-format .pth (model, EMA, optimizer, step; trainer state when present)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        obj = torch_load(path)  # weights_only; a refused or corrupt file is one line
        try:
            names = [n for n, _ in ema_names(self.optimizer, self.sd_model)]
            osd = ckpt.optim_from_ids(obj["optimizer"], names)
            set_state_dict(self.sd_model, self.optimizer, model_state_dict=obj["model"], optim_state_dict=osd,
                           options=StateDictOptions(full_state_dict=True, strict=True))
            self.ema.load_state_dict(obj["ema_state_dict"])
            trainer = obj.get("trainer") or {"step": obj["step"], "skipped": 0, "bad_in_a_row": 0, "elapsed": 0.0,
                                             "data": {"epoch": obj.get("epoch", 0), "offset": 0}, "rng": None}
        except _DAMAGED as e:
            raise CheckpointError(
                f"--resume {path}: not a resumable checkpoint of this model ({one_line(e, 120)}); a .pth from "
                "another architecture or a weights-only file cannot resume a run (use --init for weights)") from None
        trainer["resharded"] = trainer.get("rng") is None or dist.is_initialized()
        return trainer

    def _restore_trainer(self, path: Path, trainer: dict) -> None:
        s, d = self.state, self.d
        try:
            s.step, s.skipped = int(trainer["step"]), int(trainer["skipped"])
            self.ema.num_updates = int(trainer.get("ema_updates", s.step))  # older checkpoints: one update a step
            s.bad_in_a_row, s.elapsed = int(trainer["bad_in_a_row"]), float(trainer["elapsed"])
            self.stream.load_state_dict(trainer["data"])
            if not trainer.get("resharded"):
                set_rng_state(trainer["rng"], d.device)
                self.mask_gen.set_state(trainer["mask_gen"])
        except _DAMAGED as e:
            raise CheckpointError(f"--resume {path}: its trainer state is damaged ({one_line(e, 120)})") from None
        s.last_good = path
        if trainer.get("resharded"):
            self.say("resuming on a different number of ranks: per-rank random streams are re-seeded "
                     "(use --deterministic for a curve that does not depend on it)")
            self.mask_gen.manual_seed(self.plan.train.seed * 1000 + d.rank + 7919 * s.step)
        self.say(f"resumed from {path} at step {s.step}")

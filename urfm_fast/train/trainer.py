"""The training loop: a ``Trainer`` built from a run plan, with ``train`` (the loop, the stop and the
final save), ``train_step`` (one optimizer step, read top to bottom) and ``forward_backward`` (one micro-batch).

Everything around the loop lives in its own module: the plan (train/plan.py), process groups
(train/distributed.py), AC / compile / FSDP2 / DDP (train/parallelize.py), checkpoints (train/checkpointing.py),
logging (train/metrics.py), preemption signals (train/preemption.py) and, handed in by tests only, fault
injection (train/faults.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from urfm_fast.checkpoints import runs as ckpt
from urfm_fast.config import HF_HUB_ID, IMAGENET_MEAN, IMAGENET_STD, visible_count
from urfm_fast.data.augment import normalize
from urfm_fast.data.dataset import DataError, ImageFolderDataset
from urfm_fast.data.scan_region import load_image_grey8
from urfm_fast.data.stream import build_train_stream
from urfm_fast.model import ops
from urfm_fast.model.kernel_check import Shapes, verify_or_fall_back
from urfm_fast.model.teacher import TeacherUnavailable, load_teacher
from urfm_fast.model.teacher.pixels import PixelTarget
from urfm_fast.model.urfm import URFM
from urfm_fast.train.checkpointing import CheckpointManager, init_from
from urfm_fast.train.checks import data_folders, data_weights
from urfm_fast.train.config import Stop, TrainConfig
from urfm_fast.train.distributed import (
    Dist,
    barrier,
    default_workers,
    fail_fast,
    gloo_group,
    init_distributed,
    is_collective_failure,
)
from urfm_fast.train.ema import EMA
from urfm_fast.train.faults import Faults
from urfm_fast.train.metrics import MetricsLogger, printer
from urfm_fast.train.parallelize import parallelize
from urfm_fast.train.plan import RunPlan, apply_process_settings, build_plan
from urfm_fast.train.preemption import Preemption
from urfm_fast.train.schedule import lr_at
from urfm_fast.train.target_cache import TargetCache


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_teacher(plan: RunPlan, device: torch.device, say):
    """Frozen, replicated on every rank, bf16 autocast on GPU, no autograd state."""
    cfg = plan.train
    if cfg.target == "pixels":  # MAE's objective: the targets are the student's own patches
        return PixelTarget()
    try:
        # The demo only looks in the local Hugging Face cache: a 784 MB download (or minutes of
        # retries on a machine without network) does not belong in a demo; --teacher downloads.
        offline = plan.demo and cfg.teacher == HF_HUB_ID
        with _env(HF_HUB_OFFLINE="1") if offline else contextlib.nullcontext():
            teacher = load_teacher(cfg.teacher, target=cfg.target, grid=cfg.img_size // 16,
                                   input_size=cfg.teacher_size or None)
    except TeacherUnavailable as e:  # never another teacher in its place: the targets define the model
        raise Stop(f"{e}\nThe BiomedCLIP teacher is the recipe's: pass --teacher PATH (open_clip_pytorch_model.bin "
                   "or its folder), --teacher efficientnet_lite0 (ImageNet, installed), or --teacher random for a "
                   "smoke test whose features mean nothing.", code=2) from None
    if cfg.teacher == "random":
        say("Teacher: random (BiomedCLIP's architecture at random init, as asked): its targets carry no meaning.")
    teacher.to(device)
    if device.type == "cuda" and plan.bf16:
        # Autocast runs the teacher's matmuls and convolutions in bf16: store their weights in bf16 rather
        # than cast them every step (the same numbers). Norms, class token and position embedding stay
        # fp32, as do the residual stream and LayerNorm (fp32 under autocast).
        for m in teacher.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.to(torch.bfloat16)
    return teacher


def check_kernels(model_cfg, plan: RunPlan, device: torch.device, say) -> None:
    """Triton kernels checked once at this run's shapes on this GPU, before anything is compiled."""
    if ops.use_triton(torch.empty(0, device=device)):
        shapes = Shapes.of_run(model_cfg, micro_batch=plan.micro_batch)  # attention speed is compared at this batch
        failed = verify_or_fall_back(shapes, device, torch.bfloat16 if plan.bf16 else torch.float32)
        say("Triton kernels: " + (f"{', '.join(failed)} failed the start-up check and run on torch"
                                   if failed else "all passed the start-up check against torch"))


def check_readable(source, probe: int = 32) -> None:
    """A folder of images must yield one readable image among its first files: refused now, in one line,
    rather than by the data loader's workers once the run has begun."""
    if not isinstance(source, ImageFolderDataset):
        return
    files, reason = source.files[:probe], ""
    for rel in files:
        try:
            load_image_grey8(os.path.join(source.root, rel))
            return
        except Exception as e:  # any decoder failure, as the loader sees it
            reason = reason or f"{rel}: {type(e).__name__}: {e}"[:160]
    first = "its" if len(files) == len(source.files) else f"the first {len(files)} of its"
    raise DataError(f"--data {source.root}: none of {first} {len(source.files)} image files could be read "
                    f"({reason}); is this an image folder?")


def checkpoint_disk(plan: RunPlan, n_params: int, n_trainable: int) -> tuple[float, str]:
    """Bytes the run's checkpoints will take at the end, and how that follows from the flags. Each holds
    the fp32 model, the EMA and AdamW's two moments; --keep resumable ones are kept, every .pth stays."""
    cfg, total = plan.train, plan.total_steps
    each = 4 * n_params + 12 * n_trainable
    saves = 1 + ((total - 1) // cfg.save_every if cfg.save_every else 0)
    kept = saves if cfg.keep == 0 else min(cfg.keep, saves)
    pths = 1 + ((total - 1) // cfg.pth_every if cfg.pth_every else 0)
    why = (f"{kept} resumable (--keep {cfg.keep}, --save-every {cfg.save_every}) and {pths} .pth (--pth-every "
           f"{cfg.pth_every}) of {each / 1e9:.1f} GB each")
    return (kept + pths) * each, why


def oom_message(d: Dist, micro: int, accum: int) -> str:
    free, total = torch.cuda.mem_get_info(d.device)
    return (
        f"CUDA out of memory on rank {d.rank} with a per-rank micro-batch of {micro} (x{accum} accumulation): "
        f"peak allocated {torch.cuda.max_memory_allocated(d.device) / 2**30:.1f} GiB, reserved "
        f"{torch.cuda.memory_reserved(d.device) / 2**30:.1f} GiB, free {free / 2**30:.1f} of {total / 2**30:.1f} GiB. "
        "Try --ac (activation checkpointing), a smaller --micro-batch (same global --batch-size through "
        "gradient accumulation), or --shard full. No checkpoint was written for the failed step."
    )


class Trainer:
    def __init__(self, plan: RunPlan, d: Dist, faults: Faults | None = None, data=None):
        cfg = plan.train
        self.d, self.say, self.faults = d, printer(d), faults
        # The loop's own flags (preemption notice, background save still writing) are agreed on over a
        # gloo group of their own: CPU ints, no GPU sync, and never interleaved with the background
        # checkpoint writer's collectives (both threads issuing collectives on one group could pair them wrongly).
        self.flags_pg = gloo_group(cfg.timeout) if d.enabled and d.world > 1 else None
        self.out = Path(cfg.out)
        if d.main:  # ours, or new; never someone else's files
            ckpt.check_out_dir(self.out, resume=bool(cfg.resume))
            ckpt.remove_partial(self.out)  # temporary folders of saves a killed run never finished
        barrier(d)
        source = data if data is not None else data_folders(cfg) or "synthetic"
        for folder in data_folders(cfg) if data is None else []:
            if not Path(folder).exists():
                raise DataError(f"--data {folder} does not exist")
        self.stream = build_train_stream(
            source, img_size=cfg.img_size, batch_size=plan.micro_batch, seed=cfg.seed, rank=d.rank,
            world_size=d.world, num_workers=default_workers() if cfg.num_workers is None else cfg.num_workers,
            deterministic=cfg.deterministic, device=d.device, synthetic_length=cfg.synthetic_images,
            weights=data_weights(cfg), augment=cfg.augment == "crop")
        check_readable(self.stream.source)  # before the run folder is made
        self.plan = plan = plan.with_data(self.stream.steps_per_epoch, self.stream.num_images)
        if plan.warmup_note and d.main:
            print(plan.warmup_note, file=sys.stderr, flush=True)
        torch.manual_seed(cfg.seed)  # the same random teacher / student init on every rank
        self.teacher = build_teacher(plan, d.device, self.say)
        self.cache = TargetCache(self.stream.num_images, d.device) if cfg.cache_targets else None
        self.model_cfg = plan.model_config(self.teacher.out_dim)
        torch.manual_seed(cfg.seed)
        self.student = URFM(self.model_cfg)
        if cfg.init:
            init_from(self.student, cfg.init, self.say)
        self.student.to(d.device)
        n_params = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        n_state = sum(t.numel() for t in self.student.state_dict().values())
        check_kernels(self.model_cfg, plan, d.device, self.say)
        self.model, self.autocast = parallelize(self.student, self.teacher, plan, d.device)
        # Where a step with a NaN/Inf gradient norm is skipped: on the device on CUDA (no host sync per step),
        # on the host on CPU (a sync costs nothing there); a test runs the device path on CPU.
        self.device_skip = plan.cuda or bool(faults and faults.device_skip)
        self.optimizer = torch.optim.AdamW(self.student.param_groups(cfg.weight_decay), lr=plan.lr, betas=(0.9, 0.95),
                                           fused=self.device_skip or None, foreach=None if self.device_skip else True)
        self.ema = EMA(self.student, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.mask_gen = torch.Generator(d.device).manual_seed(cfg.seed * 1000 + d.rank)
        self.ckpt = CheckpointManager(plan, d, self.model if plan.mode == "ddp" else self.student, self.student,
                                      self.optimizer, self.ema, self.stream, self.mask_gen,
                                      {**plan.run_config(self.model_cfg, self.teacher.source),
                                       "data_sources": self.stream.describe_sources(),
                                       "data_in_memory": None if data is None else len(data)}, self.say, faults)
        self.state = self.ckpt.state
        self.ckpt.start_run()
        barrier(d)
        self._announce(n_params, n_state)
        self.params = list(self.student.parameters())  # the sharded parameters under FSDP2: the same every step
        self.norms = NormReader(plan.cuda, deferred=self.device_skip)
        self.last_norm = float("nan")
        self.preemption = Preemption(lambda: self.state.last_good)
        if faults:
            faults.attach(self)

    def _announce(self, n_params: int, n_state: int) -> None:
        plan, cfg, m, d = self.plan, self.plan.train, self.model_cfg, self.d
        mask = (f"{cfg.mask_ratio}" if cfg.mask_schedule == "constant" else f"{cfg.mask_schedule} {cfg.mask_start} -> "
                f"{cfg.mask_ratio} over {cfg.mask_ramp:.0%} of the run in {cfg.mask_levels} levels")
        self.say(f"model {cfg.model} (depth {m.depth}, decoder {m.decoder_embed_dim}d{m.decoder_depth}b) "
                 f"{n_params / 1e6:.1f}M trainable params | img {cfg.img_size} | mask {mask} | "
                 f"{'target' if cfg.target == 'pixels' else 'teacher'} {self.teacher.source}")
        self.say(f"{d.world} rank(s) on {d.device.type} | {plan.mode}{'/' + plan.shard if plan.mode == 'fsdp' else ''}"
                 f" | {'bf16' if plan.bf16 else 'fp32'} | compile {plan.compile} | ac {cfg.ac} | global batch "
                 f"{cfg.batch_size} = {d.world} x {plan.micro_batch} x {plan.accumulation} accumulation | lr "
                 f"{plan.lr:.3g} | {plan.total_steps} steps ({plan.steps_per_epoch} per epoch, warm-up "
                 f"{plan.warmup_steps}) | data: {self.stream.summary()}")
        if self.cache:
            t = self.model_cfg.target_dim * self.model_cfg.num_patches * 4
            self.say(f"teacher targets: computed once per image and cached (--cache-targets), about "
                     f"{self.stream.num_images * t / 1e9:.2f} GB on {d.device.type}")
        self.say(f"output: {self.out}")
        disk, why = checkpoint_disk(plan, n_state, n_params)
        if disk > 1e9:
            self.say(f"disk: the checkpoints will take about {disk / 1e9:.1f} GB in {self.out} ({why})")

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> int:
        plan, d, state, faults = self.plan, self.d, self.state, self.faults
        self.batches = iter(self.stream)
        self.metrics = MetricsLogger(plan, d, self.model_cfg, self.out, state.step, self.say,
                                     self.stream.source_counts)
        stop_reason = None
        with self.preemption:
            try:
                while state.step < plan.total_steps and stop_reason is None:
                    if faults:
                        faults.before_step(state.step, d)
                    try:
                        log_now = self.train_step()
                    except torch.OutOfMemoryError:
                        raise Stop(oom_message(d, plan.micro_batch, plan.accumulation)) from None
                    if faults:
                        faults.after_step(state.step - 1, d)
                    stop_reason = self._agree_on_flags(log_now)
                    if stop_reason is None:
                        self._save_if_due()
            except KeyboardInterrupt:  # Ctrl-C: no final checkpoint (a preemption notice is SIGTERM)
                self.ckpt.abandon_pending()
                last = f"the last complete checkpoint is {state.last_good}" if state.last_good else "no checkpoint yet"
                raise Stop(f"interrupted at step {state.step} ({last}); continue with: python -m urfm_fast.pretrain "
                           f"--out {self.out} --resume", code=130) from None
            except Exception as e:
                self.ckpt.abandon_pending()
                if isinstance(e, OSError):  # metrics.jsonl on a full disk: the file and what is kept
                    self.ckpt.disk_full(e)
                # Here, with the preemption handler still installed: torchrun's SIGTERM to the survivors
                # cannot cut the message short.
                if d.world > 1 and is_collective_failure(e):
                    where = (f"the last complete checkpoint is {state.last_good}" if state.last_good
                             else "no checkpoint was completed yet")
                    fail_fast(d.rank, e, f"at step {state.step + 1}", f"Nothing is saved for this step; {where}; "
                                         f"continue with the same command plus --out {self.out} --resume.")
                raise
            finally:
                self.metrics.close()
        path, pth = self.ckpt.save_final()
        self._summary(stop_reason, path, pth)
        barrier(d)  # every rank is past its last collective before main() tears the process group down
        return 0

    def train_step(self) -> bool:
        """One optimizer step: forward and backward over the accumulated micro-batches, the global grad norm
        (identical on every rank: it doubles as the NaN/Inf check), the update unless it is not finite, then
        the step's bookkeeping and log record; -> whether this step logged (flags are agreed on then)."""
        plan, cfg, state, accum = self.plan, self.plan.train, self.state, self.plan.accumulation
        step, t_step = state.step, time.time()
        lr = lr_at(step, plan.lr, cfg.min_lr, plan.warmup_steps, plan.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.d.device)
        for k in range(accum):
            loss_sum += self.forward_backward(*next(self.batches), last=k == accum - 1)  # (B, 3, S, S), (B,)
        norm = self._grad_norm()
        bad = ~torch.isfinite(norm)
        if self.device_skip:  # fused AdamW skips through found_inf (step count kept), the EMA blends with 0
            self.optimizer.found_inf = bad.to(torch.float32)
            self.optimizer.step()
            self.ema.update(self.student, skip=bad)
        elif not bad:  # the host check: one sync, free on CPU
            self.optimizer.step()
            self.ema.update(self.student)
        self.optimizer.zero_grad(set_to_none=True)
        self.metrics.loss += torch.where(bad, 0.0, loss_sum / accum)
        self.metrics.step_finished(t_step)
        state.step += 1
        self.preemption.step_done()
        state.elapsed += time.time() - t_step
        self.norms.push(step, norm)
        log_now = state.step % cfg.log_every == 0 or state.step == plan.total_steps
        for s, value in self.norms.read(keep=0 if log_now or any(self._save_due()) else 1):  # verdicts before counts
            self._account(s, value)
        if log_now:
            self.metrics.log(state.step, self.stream.epoch, lr, self.last_norm, state.skipped,
                             self.stream.source_counts, mask_ratio=plan.mask_ratio(step))
        return log_now

    def forward_backward(self, images01: torch.Tensor, index: torch.Tensor, last: bool) -> torch.Tensor:
        """One micro-batch: the teacher's targets, masks, the student's loss and its backward; -> the loss."""
        plan, student, device = self.plan, self.student, self.d.device
        target, cls_target, keep_prob = self._targets(images01, index)  # (B, N, T) fp32, normal tensors
        k = visible_count(self.model_cfg.num_patches, plan.mask_ratio(self.state.step))
        imgs = normalize(images01, IMAGENET_MEAN, IMAGENET_STD)  # (B, 3, S, S)
        if plan.mode == "fsdp" and plan.bf16:
            imgs = imgs.to(torch.bfloat16)
        if plan.train.deterministic:
            noise = self.stream.mask_noise(index, self.model_cfg.num_patches, device=device)
            ids = student.sample_ids(imgs.shape[0], device, noise=noise, keep_prob=keep_prob, num_visible=k)
        else:
            ids = student.sample_ids(imgs.shape[0], device, generator=self.mask_gen, keep_prob=keep_prob,
                                     num_visible=k)
        if plan.mode == "fsdp":
            student.set_requires_gradient_sync(last)
        sync = self.model.no_sync() if plan.mode == "ddp" and not last else contextlib.nullcontext()
        with sync, self.autocast:
            loss, _, _ = self.model(imgs, target, ids, cls_target, num_visible=k)
        (loss / plan.accumulation).backward()
        return loss.detach()

    def _save_due(self) -> tuple[bool, bool]:
        """(resumable checkpoint, .pth) due after the step just finished; none after the last step."""
        cfg, step = self.plan.train, self.state.step
        if step >= self.plan.total_steps:
            return False, False
        return bool(cfg.save_every and step % cfg.save_every == 0), bool(cfg.pth_every and step % cfg.pth_every == 0)

    def _save_if_due(self) -> None:
        save_now, pth_now = self._save_due()
        if save_now and self.state.bad_in_a_row == 0:  # not during a NaN streak: the last checkpoint is a good one
            self.ckpt.save(self.state.step, background=True)
        if pth_now:
            self.ckpt.save_pth(self.state.step)

    def _agree_on_flags(self, log_now: bool) -> str | None:
        """Preemption, and a background save finished: every rank must agree. One rank reads its flags
        every step; several reduce them (CPU ints on flags_pg, no GPU sync, but a host round trip) at
        log steps and the last step, so a preemption notice is acted on within --log-every steps.
        Finishes a background save all ranks have written; -> the name of the signal received, or None."""
        sig, writing = 0, 1
        if self.flags_pg is None or log_now:
            sig, writing = self.preemption.signum, int(self.ckpt.writing())
            if self.flags_pg is not None:
                flags = torch.tensor([sig, writing], dtype=torch.int64)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.flags_pg)
                sig, writing = (int(v) for v in flags.tolist())
        if self.state.pending is not None and not writing:
            self.ckpt.finish_pending()
        if not sig:
            return None
        self.preemption.noticed()
        for s, value in self.norms.read():  # the final checkpoint carries the counts of every step trained
            self._account(s, value)
        return signal.Signals(sig).name

    def _targets(self, images01: torch.Tensor, index: torch.Tensor):
        """The teacher's patch targets, plus its CLS (loss_on all_cls) and keep-probabilities (mask_type
        attention) from the same forward, only where the recipe uses them; from the cache where there is one."""
        cls, saliency = self.model_cfg.loss_on == "all_cls", self.model_cfg.mask_type == "attention"

        def compute(x):
            if not (cls or saliency):
                return self.teacher(x), None, None
            return tuple(self.teacher(x, cls=cls, saliency=saliency))

        return self.cache(compute, images01, index) if self.cache else compute(images01)

    def _grad_norm(self) -> torch.Tensor:
        clip = self.plan.train.clip_grad
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        else:  # the norm only (logged, NaN check): no multiplication of every gradient by 1
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _account(self, step: int, norm_value: float) -> None:
        """The host's bookkeeping of step ``step`` (0-based) from its global grad norm."""
        state = self.state
        self.last_norm = norm_value
        if math.isfinite(norm_value):
            state.bad_in_a_row = 0
            self.metrics.good += 1
            return
        state.skipped += 1
        state.bad_in_a_row += 1
        self.say(f"step {step}: non-finite loss or gradients (grad norm {norm_value}); update skipped "
                 f"({state.bad_in_a_row} in a row, {state.skipped} in all)")
        if state.bad_in_a_row >= self.plan.train.max_bad_steps:
            self.ckpt.finish_pending()  # every rank stops here: complete the save started before the streak
            where = (f"the last good checkpoint is {state.last_good}" if state.last_good
                     else "no checkpoint was written yet")
            raise Stop(f"stopping: {state.bad_in_a_row} consecutive steps with NaN/Inf loss or gradients "
                       f"(step {step + 1}); {where}. Lower --lr, check the data, or use --precision fp32.")

    def _summary(self, stop_reason: str | None, path: Path | None, pth: Path | None) -> None:
        state = self.state
        lines = [f"{'stopped by ' + stop_reason if stop_reason else 'done'}: step {state.step}/"
                 f"{self.plan.total_steps} in {state.elapsed:.0f}s (first step incl. compile "
                 f"{self.metrics.first_step_time or 0:.1f}s)", f"skipped NaN/Inf steps: {state.skipped}"]
        if isinstance(self.stream.source, ImageFolderDataset):
            lines.append(f"unreadable images skipped: {self.stream.source.skipped}")
        lines.append(f"resumable checkpoint: {path}")
        if pth:
            lines.append(f"URFM-format checkpoint: {pth}")
        if stop_reason:
            lines.append(f"resume with: python -m urfm_fast.pretrain --out {self.out} --resume")
        elif self.plan.demo and pth:
            q = lambda p: shlex.quote(str(p))  # noqa: E731
            lines += ["next: export the encoder for timm, evaluate it against random init, plot the loss curve:",
                      f"  python -m urfm_fast.export {q(pth)} --out {q(self.out / 'export')}",
                      f"  python -m urfm_fast.evaluate --backbone {q(f'urfm={pth}')} random --data synthetic "
                      f"--out {q(self.out / 'eval')}",
                      f"  python -m urfm_fast.plot {q(self.out)} --out {q(self.out / 'loss.png')}"]
        for line in lines:
            self.say(line)


class NormReader:
    """Global grad norms on their way to the host. Deferred (the device-side skip): each is copied to pinned
    memory without waiting and read a step later, or at the next log, save or stop, so nothing waits for
    the GPU; else each is read at once (a sync that costs nothing on CPU)."""

    def __init__(self, cuda: bool, deferred: bool):
        self.cuda, self.deferred = cuda, deferred
        self.bufs = [torch.zeros((), dtype=torch.float32, pin_memory=cuda) for _ in range(2 if deferred else 0)]
        self.unread: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []  # (step, norm, copy done)

    def push(self, step: int, norm: torch.Tensor) -> None:
        event = None
        if self.deferred:
            buf = self.bufs[step % 2]  # its previous user (step - 2) was read
            norm = buf.copy_(norm.detach(), non_blocking=self.cuda)
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record()
        self.unread.append((step, norm, event))

    def read(self, keep: int = 0):
        """-> (step, norm) of the norms pushed, oldest first, all but the newest ``keep`` (when deferred)."""
        while len(self.unread) > (keep if self.deferred else 0):
            step, norm, event = self.unread.pop(0)
            if event is not None:
                event.synchronize()  # recorded a step ago: normally long complete
            yield step, float(norm)


def pretrain(cfg: TrainConfig, demo: bool, faults: Faults | None = None, data=None) -> int:
    """Build the run from ``cfg`` and train it to the end (or a preemption); -> exit code. ``faults``: test-only
    fault injection, by default from ``URFM_FAULTS`` (none in production). ``data`` (from Python): a Dataset
    of uint8 [1,H,W] images in place of ``--data``, e.g. a study's fixed image set rendered once for many
    runs; config.json records its size (``data_in_memory``), and a resume needs it passed again."""
    d = init_distributed(cfg)
    plan = build_plan(cfg, demo, d)
    apply_process_settings(plan)
    with ckpt.run_lock(Path(plan.train.out)) if d.main else contextlib.nullcontext():  # one run per --out
        return Trainer(plan, d, faults or Faults.from_env(), data).train()

"""The training loop: a ``Trainer`` built from a run plan, with ``train`` (the loop, the stop and the
final save) and ``train_step`` (one optimizer step over the accumulated micro-batches).

Everything around the loop lives in its own module: the plan (train/plan.py), process groups
(train/distributed.py), AC / compile / FSDP2 / DDP (train/parallelize.py), checkpoints (train/checkpointing.py),
logging (train/metrics.py) and the test-only fault hooks and preemption signals (train/faults.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from urfm_fast.checkpoints import runs as ckpt
from urfm_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from urfm_fast.data.stream import DataError, ImageFolderDataset, build_train_stream
from urfm_fast.model import ops
from urfm_fast.model.kernel_check import Shapes, verify_or_fall_back
from urfm_fast.model.teacher import HF_HUB_ID, TeacherUnavailable, load_teacher
from urfm_fast.model.urfm import URFM
from urfm_fast.train import faults
from urfm_fast.train.checkpointing import CheckpointManager, init_from
from urfm_fast.train.checks import data_folders, data_weights
from urfm_fast.train.config import Stop
from urfm_fast.train.distributed import Dist, barrier, default_workers, fail_fast, gloo_group, is_collective_failure
from urfm_fast.train.ema import EMA
from urfm_fast.train.metrics import MetricsLogger, printer
from urfm_fast.train.parallelize import parallelize
from urfm_fast.train.plan import RunPlan
from urfm_fast.train.schedule import lr_at


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
    def __init__(self, plan: RunPlan, d: Dist):
        cfg = plan.train
        self.d, self.say, self.faults = d, printer(d), faults.faults_from_env()
        # The loop's own flags (preemption notice, background save still writing) are agreed on over a
        # gloo group of their own: CPU ints, no GPU sync, and never interleaved with the background
        # checkpoint writer's collectives (both threads issuing collectives on one group could pair them wrongly).
        self.flags_pg = gloo_group(cfg.timeout) if d.enabled and d.world > 1 else None
        self.out = Path(cfg.out)
        if d.main:  # ours, or new; never someone else's files
            ckpt.check_out_dir(self.out, resume=bool(cfg.resume))
            ckpt.remove_partial(self.out)  # temporary folders of saves a killed run never finished
        barrier(d)
        source = data_folders(cfg) or "synthetic"
        for folder in source if source != "synthetic" else []:
            if not Path(folder).exists():
                raise DataError(f"--data {folder} does not exist")
        self.stream = build_train_stream(
            source, img_size=cfg.img_size, batch_size=plan.micro_batch, seed=cfg.seed, rank=d.rank,
            world_size=d.world, num_workers=default_workers() if cfg.num_workers is None else cfg.num_workers,
            deterministic=cfg.deterministic, device=d.device, synthetic_length=cfg.synthetic_images,
            weights=data_weights(cfg))
        self.plan = plan = plan.with_data(self.stream.steps_per_epoch, self.stream.num_images)
        torch.manual_seed(cfg.seed)  # the same random teacher / student init on every rank
        self.teacher = build_teacher(plan, d.device, self.say)
        self.model_cfg = plan.model_config(self.teacher.out_dim)
        torch.manual_seed(cfg.seed)
        self.student = URFM(self.model_cfg)
        if cfg.init:
            init_from(self.student, cfg.init, self.say)
        self.student.to(d.device)
        n_params = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        check_kernels(self.model_cfg, plan, d.device, self.say)
        self.model, self.autocast = parallelize(self.student, self.teacher, plan, d.device)
        self.device_skip = plan.cuda if faults.DEVICE_SIDE_SKIP is None else faults.DEVICE_SIDE_SKIP
        fused = plan.cuda or self.device_skip  # found_inf is an input of the fused kernel only
        self.optimizer = torch.optim.AdamW(self.student.param_groups(cfg.weight_decay), lr=plan.lr,
                                           betas=(0.9, 0.95), fused=fused or None, foreach=None if fused else True)
        self.ema = EMA(self.student, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.mask_gen = torch.Generator(d.device).manual_seed(cfg.seed * 1000 + d.rank)
        self.ckpt = CheckpointManager(plan, d, self.model if plan.mode == "ddp" else self.student, self.student,
                                      self.optimizer, self.ema, self.stream, self.mask_gen,
                                      {**plan.run_config(self.model_cfg, self.teacher.source),
                                       "data_sources": self.stream.describe_sources()}, self.say)
        self.state = self.ckpt.state
        self.ckpt.start_run()
        barrier(d)
        self._announce(n_params)
        self.params = list(self.student.parameters())  # the sharded parameters under FSDP2: the same every step
        # device-side skip: grad norms copied to pinned host memory, not read yet: (step, host copy, event)
        self.unread: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self.norm_bufs = [torch.zeros((), dtype=torch.float32, pin_memory=plan.cuda) for _ in range(2)]
        self.last_norm = float("nan")

    def _announce(self, n_params: int) -> None:
        plan, cfg, m, d = self.plan, self.plan.train, self.model_cfg, self.d
        self.say(f"model {cfg.model} (depth {m.depth}, decoder {m.decoder_embed_dim}d{m.decoder_depth}b) "
                 f"{n_params / 1e6:.1f}M trainable params | img {cfg.img_size} | mask {cfg.mask_ratio} | "
                 f"teacher {self.teacher.source}")
        self.say(f"{d.world} rank(s) on {d.device.type} | {plan.mode}{'/' + plan.shard if plan.mode == 'fsdp' else ''}"
                 f" | {'bf16' if plan.bf16 else 'fp32'} | compile {plan.compile} | ac {cfg.ac} | global batch "
                 f"{cfg.batch_size} = {d.world} x {plan.micro_batch} x {plan.accumulation} accumulation | lr "
                 f"{plan.lr:.3g} | {plan.total_steps} steps ({plan.steps_per_epoch} per epoch, warm-up "
                 f"{plan.warmup_steps}) | data: {self.stream.summary()}")
        self.say(f"output: {self.out}")

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> int:
        plan, d, state = self.plan, self.d, self.state
        handlers = faults.install_stop_handlers()
        self.batches = iter(self.stream)
        self.metrics = MetricsLogger(plan, d, self.model_cfg, self.out, state.step, self.say,
                                     self.stream.source_counts)
        stop_reason = None
        try:
            while state.step < plan.total_steps and stop_reason is None:
                stop_reason = self._iteration()
        except Exception as e:
            self.ckpt.abandon_pending()
            # Here, with the preemption handler still installed: torchrun's SIGTERM to the survivors
            # cannot cut the message short.
            if d.world > 1 and is_collective_failure(e):
                where = (f"the last complete checkpoint is {state.last_good}" if state.last_good
                         else "no checkpoint was completed yet")
                fail_fast(d.rank, e, f"at step {state.step + 1}", f"Nothing is saved for this step; {where}; "
                                     f"continue with the same command plus --out {self.out} --resume.")
            raise
        finally:
            faults.restore_handlers(handlers)
            self.metrics.close()
        path, pth = self.ckpt.save_final()
        self._summary(stop_reason, path, pth)
        barrier(d)  # every rank is past its last collective before main() tears the process group down
        return 0

    def _iteration(self) -> str | None:
        """One step and what follows it (bookkeeping, logging, flags, saves); -> a stop reason or None."""
        plan, cfg, state = self.plan, self.plan.train, self.state
        step, t_step = state.step, time.time()
        lr = lr_at(step, plan.lr, cfg.min_lr, plan.warmup_steps, plan.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        faults.before_step(self.faults, step, self.d)
        try:
            norm = self.train_step(step)
        except torch.OutOfMemoryError:
            raise Stop(oom_message(self.d, plan.micro_batch, plan.accumulation)) from None
        self.metrics.step_finished(t_step)
        state.step += 1
        faults.step_done()
        state.elapsed += time.time() - t_step
        log_now = state.step % cfg.log_every == 0 or state.step == plan.total_steps
        save_now = cfg.save_every and state.step % cfg.save_every == 0 and state.step < plan.total_steps
        pth_now = cfg.pth_every and state.step % cfg.pth_every == 0 and state.step < plan.total_steps
        if not self.device_skip:
            self._account(step, float(norm))
        else:  # all of them before counts are logged or saved; else the previous step's verdict
            self._read_norms(keep=0 if log_now or save_now or pth_now else 1)
        if log_now:
            self.metrics.log(state.step, self.stream.epoch, lr, self.last_norm, state.skipped,
                             self.stream.source_counts)
        faults.after_step(self.faults, step, self.d)
        sig = self._agree_on_flags(log_now)
        if sig:
            faults.stop_noticed()
            self._read_norms()  # the final checkpoint carries the counts of every step trained
            return signal.Signals(sig).name
        if save_now and state.bad_in_a_row == 0:  # not during a NaN streak: the last checkpoint is a good one
            self.ckpt.save(state.step, background=True)
        if pth_now:
            self.ckpt.save_pth(state.step)
        return None

    def _agree_on_flags(self, log_now: bool) -> int:
        """Preemption, and a background save finished: every rank must agree. One rank reads its flags
        every step; several reduce them (CPU ints on flags_pg, no GPU sync, but a host round trip) at
        log steps and the last step, so a preemption notice is acted on within --log-every steps.
        Finishes a background save all ranks have written; -> the signal received (0: none)."""
        sig, writing = 0, 1
        if self.flags_pg is None or log_now:
            sig, writing = faults.signal_received(), int(self.ckpt.writing())
            if self.flags_pg is not None:
                flags = torch.tensor([sig, writing], dtype=torch.int64)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.flags_pg)
                sig, writing = (int(v) for v in flags.tolist())
        if self.state.pending is not None and not writing:
            self.ckpt.finish_pending()
        return sig

    def train_step(self, step: int) -> torch.Tensor:
        """Forward and backward over the accumulated micro-batches, then the update unless the global
        grad norm (identical on every rank: it doubles as the NaN/Inf check) is not finite."""
        plan, accum, student = self.plan, self.plan.accumulation, self.student
        loss_sum = torch.zeros((), device=self.d.device)
        for k in range(accum):
            images01, index = next(self.batches)  # (B, 3, S, S) in [0, 1], (B,)
            target, cls_target, keep_prob = self._targets(images01)  # (B, N, T) fp32, normal tensors
            imgs = normalize(images01, IMAGENET_MEAN, IMAGENET_STD)
            if plan.mode == "fsdp" and plan.bf16:
                imgs = imgs.to(torch.bfloat16)
            if plan.train.deterministic:
                noise = self.stream.mask_noise(index, self.model_cfg.num_patches, device=self.d.device)
                ids = student.sample_ids(imgs.shape[0], self.d.device, noise=noise, keep_prob=keep_prob)
            else:
                ids = student.sample_ids(imgs.shape[0], self.d.device, generator=self.mask_gen, keep_prob=keep_prob)
            last = k == accum - 1
            if plan.mode == "fsdp":
                student.set_requires_gradient_sync(last)
            sync = self.model.no_sync() if plan.mode == "ddp" and not last else contextlib.nullcontext()
            with sync, self.autocast:
                loss, _, _ = self.model(imgs, target, ids, cls_target)
            if step in self.faults.get("nan", ()):
                loss = loss * float("nan")
            (loss / accum).backward()
            loss_sum += loss.detach()
        norm = self._grad_norm()
        self._update(step, norm, loss_sum / accum)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _targets(self, images01: torch.Tensor):
        """The teacher's patch targets, plus its CLS (loss_on all_cls) and keep-probabilities (mask_type
        attention) from the same forward, only where the recipe uses them."""
        cls, saliency = self.model_cfg.loss_on == "all_cls", self.model_cfg.mask_type == "attention"
        if not (cls or saliency):
            return self.teacher(images01), None, None
        return tuple(self.teacher(images01, cls=cls, saliency=saliency))

    def _grad_norm(self) -> torch.Tensor:
        clip = self.plan.train.clip_grad
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        else:  # the norm only (logged, NaN check): no multiplication of every gradient by 1
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _update(self, step: int, norm: torch.Tensor, loss: torch.Tensor) -> None:
        """Optimizer and EMA step. Device-side skip (default on CUDA): fused AdamW skips the update through
        its ``found_inf`` input (undoing its step count) and the EMA blends with weight 0, so nothing
        waits for the GPU; the host reads the norm from a non-blocking copy one step later, or at the
        next log, save or stop, and keeps the counts exactly as the host-side check does."""
        cuda = self.plan.cuda
        if not self.device_skip:
            if bool(torch.isfinite(norm)):
                self.optimizer.step()
                self.ema.update(self.student)
                self.metrics.loss += loss
            return
        buf = self.norm_bufs[step % 2]  # the previous user of this buffer (step - 2) was read
        buf.copy_(norm.detach(), non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self.unread.append((step, buf, event))
        bad = ~torch.isfinite(norm)
        self.optimizer.found_inf = bad.to(torch.float32)  # fused AdamW: no update, step count kept
        self.optimizer.step()
        self.ema.update(self.student, skip=bad)
        self.metrics.loss += torch.where(bad, 0.0, loss)

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

    def _read_norms(self, keep: int = 0) -> None:
        """Account the steps whose norms were copied to the host, all but the newest ``keep``."""
        while len(self.unread) > keep:
            step, buf, event = self.unread.pop(0)
            if event is not None:
                event.synchronize()  # recorded a step ago: normally long complete
            self._account(step, float(buf))

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
        for line in lines:
            self.say(line)

"""One urfm_fast training iteration without data loading, importable without pytest.

Used by the benchmark suite (bench/bench_step.py) and by the GPU check (bench/gpu_check.py), which
must run where pytest is not installed.
"""

from __future__ import annotations

import contextlib

import torch

from urfm_fast import URFM
from urfm_fast.config import IMAGENET_MEAN, IMAGENET_STD
from urfm_fast.data.augment import normalize
from urfm_fast.model.teacher import BiomedCLIPTeacher
from urfm_fast.train.ema import EMA


class OurStep:
    """One urfm_fast training iteration as Trainer.train_step (urfm_fast.train.trainer) runs it, without data loading:
    teacher targets, student forward/backward under bf16 autocast, fused AdamW on CUDA, foreach EMA.
    """

    def __init__(self, cfg, device, amp_dtype, compile_mode: str | None = None, lr=1.5e-4, ema_decay=0.9999,
                 compile_backend: str = "inductor"):  # fmt: skip
        self.device = device
        self.amp_dtype = amp_dtype
        self.model = URFM(cfg).to(device)
        self.teacher = BiomedCLIPTeacher.load("random").to(device)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.param_groups(0.05), lr=lr, betas=(0.9, 0.95), fused=fused)
        self.ema = EMA(self.model, ema_decay)
        self.forward = self.model
        self.teacher_forward = self.teacher
        self.compile_mode = compile_mode
        if compile_mode == "blocks":
            # dynamic=False: the three block kinds share Block.forward at different token counts,
            # and automatic dynamic shapes would otherwise replace them by one symbolic graph.
            for blk in [*self.model.blocks, *self.model.decoder_blocks, *self.teacher.trunk.blocks]:
                blk.compile(dynamic=False, backend=compile_backend)
        elif compile_mode == "model":
            self.forward = torch.compile(self.model, backend=compile_backend)
            self.teacher_forward = torch.compile(self.teacher, backend=compile_backend)
        elif compile_mode is not None:
            raise ValueError(f"compile_mode {compile_mode!r}")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        target = self.teacher_forward(images01)  # (B, N, 768) fp32, computed under inference_mode
        if self.compile_mode == "model":
            # A compiled graph saves its inputs for backward, and inference tensors cannot be saved:
            # hand it a normal tensor (eager mode gathers the masked rows first, which makes one).
            target = target.clone()
        imgs = normalize(images01, IMAGENET_MEAN, IMAGENET_STD)
        with self.autocast():
            loss, _, _ = self.forward(imgs, target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return loss.detach()

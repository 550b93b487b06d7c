"""Test-only fault injection: one ``Faults`` object handed to the Trainer from outside (None in production).

The tests drive the real failure paths (a NaN step, a preemption, a dead or hung rank, a slow checkpoint
write) through the production code; only the moment is chosen here. ``pretrain`` builds the object from
``URFM_FAULTS`` (so torchrun's ranks get it too); without that variable there is none.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from urfm_fast.train.distributed import Dist


def parse_faults(spec: str) -> dict[str, set[int]]:
    """``URFM_FAULTS="nan@3-9,sigterm@5,die@7,slowsave@4,device-skip"``: a NaN loss at steps 3..9, a SIGTERM
    to rank 0 after step 5, the last rank exiting abruptly (``os._exit(1)``, as a segfault or the OOM killer
    would) at the start of step 7, a checkpoint of step 4 whose background write takes 2 s
    (``URFM_SLOWSAVE_S``) longer (a slow file system). ``hang@N``: at step N the process SIGTERMs itself and
    then never finishes the step (a stuck loader or collective): the stop watchdog must end it within
    ``URFM_STOP_GRACE_S``. A bare word is a switch: ``device-skip`` runs the device-side NaN skip on CPU."""
    faults: dict[str, set[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, at, rng = item.partition("@")
        lo, _, hi = rng.partition("-")
        faults.setdefault(kind, set()).update(range(int(lo), int(hi or lo) + 1) if at else ())
    return faults


def slow_planner(seconds: float):
    """DCP's own save planner, delayed: it runs in the writer thread of an async save."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class SlowPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            time.sleep(seconds)
            return super().create_local_plan()

    return SlowPlanner()


@dataclass
class Faults:
    at: dict[str, set[int]] = field(default_factory=dict)  # kind -> the steps (0-based) it strikes at

    @classmethod
    def from_env(cls) -> Faults | None:
        spec = os.environ.get("URFM_FAULTS", "")
        return cls(parse_faults(spec)) if spec.strip() else None

    @property
    def device_skip(self) -> bool:
        """Run the device-side NaN skip (the CUDA default) on CPU."""
        return "device-skip" in self.at

    def attach(self, trainer) -> None:
        """A NaN loss at the ``nan`` steps: a forward hook on the student, so the step itself has no test code."""
        steps = self.at.get("nan", set())

        def poison(module, args, output):
            if trainer.state.step in steps:  # the step being trained
                return (output[0] * float("nan"), *output[1:])
            return None

        if steps:
            trainer.student.register_forward_hook(poison)

    def before_step(self, step: int, d: Dist) -> None:
        """A rank that dies; a process stuck while preempted."""
        if step in self.at.get("die", ()) and d.rank == d.world - 1:
            os._exit(1)  # a rank dies without a word (segfault, OOM killer, lost node)
        if step in self.at.get("hang", ()):  # preempted while stuck (a hung loader or peer)
            os.kill(os.getpid(), signal.SIGTERM)
            while True:
                time.sleep(0.1)

    def after_step(self, step: int, d: Dist) -> None:
        if step in self.at.get("sigterm", ()) and d.main:
            os.kill(os.getpid(), signal.SIGTERM)

    def save_planner(self, step: int):
        """A slow checkpoint write at the ``slowsave`` steps: 2 s, or ``URFM_SLOWSAVE_S`` for a test that must
        die before the write ends however slow the machine is."""
        if step in self.at.get("slowsave", ()):
            return slow_planner(float(os.environ.get("URFM_SLOWSAVE_S", "2")))
        return None

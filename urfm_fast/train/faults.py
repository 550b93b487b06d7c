"""Test-only fault injection (``URFM_FAULTS``) and the preemption signals with their stop watchdog.

The fault hooks let the tests drive the real failure paths (a NaN step, a preemption, a dead or hung
rank, a slow checkpoint write) through the production code; nothing here runs unless asked.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import typing

from urfm_fast.train.distributed import Dist, report


def parse_faults(spec: str) -> dict[str, set[int]]:
    """Test hook ``URFM_FAULTS="nan@3-9,sigterm@5,die@7,slowsave@4"``: inject a NaN loss at steps 3..9,
    a SIGTERM to rank 0 after step 5, the last rank exiting abruptly (``os._exit(1)``, as a segfault
    or the OOM killer would) at the start of step 7, and a checkpoint of step 4 whose background
    write takes 2 s (``URFM_SLOWSAVE_S``) longer (a slow file system), so the fault paths run exactly as in production.
    ``hang@N``: at step N the process SIGTERMs itself and then never finishes the step (a stuck loader
    or collective): the stop watchdog must end it within ``URFM_STOP_GRACE_S``."""
    faults: dict[str, set[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rng = item.partition("@")
        lo, _, hi = rng.partition("-")
        faults.setdefault(kind, set()).update(range(int(lo), int(hi or lo) + 1))
    return faults


def slow_save_seconds() -> float:
    """How much longer a ``slowsave`` write takes: 2 s, or ``URFM_SLOWSAVE_S`` for a test that must
    die before the write ends however slow the machine is."""
    return float(os.environ.get("URFM_SLOWSAVE_S", "2"))


def slow_planner(seconds: float):
    """DCP's own save planner, delayed: it runs in the writer thread of an async save."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class SlowPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            time.sleep(seconds)
            return super().create_local_plan()

    return SlowPlanner()


_signal_received: int = 0

# Where a step with a NaN/Inf gradient norm is skipped. On the device (default on CUDA): fused AdamW
# skips the update through its ``found_inf`` input (undoing its step count) and the EMA blends with
# weight 0, so nothing waits for the GPU; the host reads the norm from a non-blocking copy one step
# later, or at the next log, save or stop, and keeps the counts (skipped, in a row, stop after
# --max-bad-steps) exactly as the host-side check does. On CPU a sync costs nothing and the check
# stays on the host; tests set this to True to run the device path on CPU.
DEVICE_SIDE_SKIP: bool | None = None


def _on_signal(signum, frame):  # preemption notice: finish the step, save, exit 0
    global _signal_received
    if _signal_received:  # a second notice: the user or the scheduler insists
        _hard_stop(signum, "a second time")
    _signal_received = signum
    _STOP_WATCHDOG.arm(signum)


def _hard_stop(signum: int, why: str) -> typing.NoReturn:
    """Leave now, without a final checkpoint: the loop could not reach a step boundary in time."""
    where = f"; the last complete checkpoint is {_STOP_WATCHDOG.last_good}" if _STOP_WATCHDOG.last_good else ""
    report(f"error: {signal.Signals(signum).name} received {why}; exiting at once without a final "
            f"checkpoint{where}", int(os.environ.get("RANK", 0)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


class _StopWatchdog:
    """Bounds the time from a preemption signal to the end of the run. The loop acts on the signal at
    a step boundary (every step on one rank, at log steps on several: ``noticed``); while it gets
    there, every finished step restarts the clock (``step_done``). When no step finishes within
    ``URFM_STOP_GRACE_S`` seconds (default 120: a stuck data loader, a hung collective), the process
    exits from this thread. A second signal exits at once."""

    def __init__(self):
        self.timer = None
        self.signum = 0
        self.last_good = None

    def arm(self, signum: int) -> None:
        grace = float(os.environ.get("URFM_STOP_GRACE_S", 120))
        self.signum = signum
        self.timer = threading.Timer(grace, _hard_stop, (signum, f"and no step finished within {grace:g}s"))
        self.timer.daemon = True
        self.timer.start()

    def step_done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.arm(self.signum)

    def noticed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


_STOP_WATCHDOG = _StopWatchdog()



def faults_from_env() -> dict[str, set[int]]:
    return parse_faults(os.environ.get("URFM_FAULTS", ""))


def install_stop_handlers() -> dict:
    """SIGTERM / SIGUSR1 (a preemption notice) set a flag the loop reads at a step boundary."""
    global _signal_received
    _signal_received = 0
    return {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}


def restore_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    _STOP_WATCHDOG.noticed()


def signal_received() -> int:
    return _signal_received


def step_done() -> None:
    _STOP_WATCHDOG.step_done()


def stop_noticed() -> None:
    _STOP_WATCHDOG.noticed()


def set_last_good(path) -> None:
    _STOP_WATCHDOG.last_good = path


def before_step(faults: dict, step: int, d: Dist) -> None:
    """Hooks at the start of a step: a rank that dies, a process stuck while preempted."""
    if step in faults.get("die", ()) and d.rank == d.world - 1:
        os._exit(1)  # test hook: a rank dies without a word (segfault, OOM killer, lost node)
    if step in faults.get("hang", ()):  # test hook: preempted while stuck (a hung loader or peer)
        os.kill(os.getpid(), signal.SIGTERM)
        while True:
            time.sleep(0.1)


def after_step(faults: dict, step: int, d: Dist) -> None:
    if step in faults.get("sigterm", ()) and d.main:
        os.kill(os.getpid(), signal.SIGTERM)


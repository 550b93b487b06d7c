"""Preemption: SIGTERM / SIGUSR1 set a flag the loop reads at a step boundary, and a watchdog bounds
the time from the signal to the end of the run.

The loop acts on the signal at a step boundary (every step on one rank, at log steps on several:
``noticed``); while it gets there, every finished step restarts the clock (``step_done``). When no step
finishes within ``URFM_STOP_GRACE_S`` seconds (default 120: a stuck data loader, a hung collective), the
process exits from the watchdog's thread. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import typing

from urfm_fast.train.distributed import report

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """``with Preemption(last_good) as p:`` installs the handlers; ``p.signum`` is the signal received (0:
    none). ``last_good()`` names the newest complete checkpoint for the message of a hard stop."""

    def __init__(self, last_good: typing.Callable[[], object]):
        self.last_good, self.signum, self.timer, self.handlers = last_good, 0, None, {}

    def __enter__(self) -> Preemption:
        self.signum = 0
        self.handlers = {sig: signal.signal(sig, self.on_signal) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        self.noticed()

    def on_signal(self, signum, frame) -> None:  # a preemption notice: finish the step, save, exit 0
        if self.signum:  # a second notice: the user or the scheduler insists
            self.hard_stop(signum, "a second time")
        self.signum = signum
        self.arm()

    def arm(self) -> None:
        grace = float(os.environ.get("URFM_STOP_GRACE_S", 120))
        self.timer = threading.Timer(grace, self.hard_stop, (self.signum, f"and no step finished within {grace:g}s"))
        self.timer.daemon = True
        self.timer.start()

    def step_done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.arm()

    def noticed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def hard_stop(self, signum: int, why: str) -> typing.NoReturn:
        """Leave now, without a final checkpoint: the loop could not reach a step boundary in time."""
        last = self.last_good()
        where = f"; the last complete checkpoint is {last}" if last else ""
        report(f"error: {signal.Signals(signum).name} received {why}; exiting at once without a final "
               f"checkpoint{where}", int(os.environ.get("RANK", 0)))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

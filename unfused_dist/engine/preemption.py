"""SIGTERM and SIGUSR2 (what SLURM sends before a preemption or the time limit) become a request to save
and stop at the next step boundary, never an exit in the middle of a step or a save."""
from __future__ import annotations

import signal
import threading

from ..job_signals import SIGNALS


class Preempted(SystemExit):
    """Raised on every rank after the checkpoint is written: the process exits with code 0, the stage is
    not marked done, and the same command resumes it."""

    def __init__(self, step: int, signal: str | None = None):
        super().__init__(0)
        self.step, self.signal = step, signal  # signal: the one this rank received (None: another rank's)


class PreemptionSignals:
    """Within `with`: remembers the first SIGTERM/SIGUSR2 in `received` (its name) instead of dying."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

"""The signals a batch scheduler sends a job before it stops it: SIGTERM (preemption, requeue, scancel) and
SIGUSR2 (SLURM's warning before the time limit). The engine turns them into save-and-stop
(engine/preemption.py); DataLoader workers ignore them (data/workers.py), so they never die before the
process that owns them has saved."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def ignore() -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)

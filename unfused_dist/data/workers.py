"""DataLoader worker processes: started from a fork server, frozen out of the garbage collector, deaf to the
scheduler's stop signals, and gone when the process that owns them is."""
from __future__ import annotations

import atexit
import gc
import multiprocessing as mp
import os
import sys
import threading
import time
from dataclasses import dataclass

from .. import job_signals

# DataLoader workers start from a fork server, never by forking the training process itself: that process
# has threads (the metrics HTTP server, tqdm's monitor, the last epoch's queue feeders), and CPython 3.11
# can deadlock a child forked while one of them starts or ends (seen: a fine-tuning rank hung forever in
# os.fork() at the start of an epoch while the other waited in all_reduce). The server preloads what
# every worker needs, so starting one stays cheap (evaluation loaders start theirs each time they run).
WORKER_CONTEXT = mp.get_context("forkserver")
# A program run as `python -m NAME` (torchrun ranks, submitit jobs) is re-run as __mp_main__ in every worker:
# preloading NAME in the server makes that re-run find its imports done.
_MAIN_MODULE = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
WORKER_CONTEXT.set_forkserver_preload(["__main__", *([_MAIN_MODULE] if _MAIN_MODULE else []),
                                       "unfused_dist.data.stream", "unfused_dist.data.transforms"])


@atexit.register  # after multiprocessing's own exit handler, so it runs before it
def _kill_workers_left_open() -> None:
    """At exit multiprocessing SIGTERMs its daemonic children and joins them. Workers ignore SIGTERM
    (job_signals.ignore), so a loader still open then (an iterator kept alive by a
    traceback, say) would hang the exit: kill them outright."""
    for child in mp.active_children():
        if child.daemon:
            child.kill()


@dataclass(frozen=True)
class WorkerInit:
    """DataLoader worker_init_fn.

    It freezes the objects the worker inherited (torch, numpy, the fork server's preloads, ~170k of them)
    out of the garbage collector's reach: the first full collection would otherwise walk them all, ~90 ms
    per worker, and write to every page that holds one, turning ~30 MiB per worker from shared to private
    (measured in benchmarks/RESULTS.md, "Frozen inherited objects"). They live as long as the worker anyway.

    A worker's parent is the fork server, which lives as long as any of its children, so torch's own
    watchdog (it watches the parent) never sees the training process die, say of SIGKILL: this watches
    that process instead and ends the worker once it is gone."""
    owner: int  # the training process's pid

    def __call__(self, worker_id: int) -> None:
        gc.freeze()
        job_signals.ignore()  # a batch scheduler signals every process of the job: the owner saves first
        threading.Thread(target=_exit_when_gone, args=(self.owner,), daemon=True, name="owner-watch").start()


def _exit_when_gone(pid: int, every_s: float = 1.0) -> None:
    while _alive(pid):
        time.sleep(every_s)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

"""What the SLURM controller still holds of a run's jobs (squeue), and scancel with a readable outcome.

Only squeue is asked whether a job is live: sacct (when accounting is on) also lists finished jobs, and a job
neither of them knows any more (purged from the controller after MinJobAge, no accounting) is finished too,
not live: it can neither run nor be cancelled.
"""
from __future__ import annotations

import re
import shutil
import subprocess

from unfused_dist.errors import UnfusedError

# squeue's states of a job that has not finished (it also lists finished jobs for MinJobAge seconds).
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"}


def base_id(job_id: str) -> str:
    """12_3 (an array task) and 12_[0-3] (its pending tasks) -> 12."""
    return job_id.split("_")[0]


def queued(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id (as squeue prints it: 12, 12_3, 12_[4-7]) -> (state, reason) for every live job among
    `job_ids` (or their arrays); {} without squeue. A failing squeue (controller unreachable, bad SLURM_CONF)
    is an error, never an empty queue: a launch would then run over live jobs, a cancel miss them."""
    bases = {base_id(j) for j in job_ids}
    if not bases or shutil.which("squeue") is None:
        return {}
    # No -j: squeue refuses the whole list when one id is unknown to the controller.
    p = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r"], capture_output=True, text=True, check=False)
    if p.returncode:
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise UnfusedError(f"squeue failed ({why}): whether jobs of this run are pending or running is unknown; "
                           "check that slurmctld answers (`sinfo`) and SLURM_CONF, then run the command again")
    out = {}
    for line in p.stdout.splitlines():
        jid, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if base_id(jid) in bases and state in LIVE:
            out[jid] = (state, reason)
    return out


def live_ids(job_ids: list[str], completing: bool = True) -> list[str]:
    """The base ids of the jobs (or arrays) among `job_ids` that are pending or running. With
    `completing=False`, jobs that have ended and whose processes slurmd is still cleaning up (COMPLETING:
    a job just cancelled shows so for a few seconds) are left out: there is nothing left to cancel in them,
    though a new launch must still wait for them (they may still write to the run dir)."""
    live = {base_id(j) for j, (state, _) in queued(job_ids).items() if completing or state != "COMPLETING"}
    return sorted(live, key=lambda j: (len(j), j))  # numeric order


def scancel(job_ids: list[str]) -> dict[str, str]:
    """scancel the jobs; returns id -> why, for those scancel could not cancel ({} when all went)."""
    if not job_ids:
        return {}
    # -Q: a job that ended since squeue listed it is no failure (SLURM 22.05 says nothing then; others may)
    p = subprocess.run(["scancel", "-Q", *job_ids], capture_output=True, text=True, check=False)
    if p.returncode == 0:
        return {}
    # "scancel: error: Kill job error on job id 12: Invalid job id specified"
    failed = {m[1]: m[2].strip() for m in re.finditer(r"job id (\S+): ([^\n]*)", p.stderr)}
    return failed or {j: p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
                      for j in job_ids}


def describe_failures(failed: dict[str, str]) -> str:
    """{12: 'Invalid job id specified'} -> '12 (Invalid job id specified)', all on one line."""
    return ", ".join(f"{j} ({why})" for j, why in failed.items())

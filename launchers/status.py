"""`unfused status RUN` and `unfused cancel RUN`: what the scheduler says of a run's jobs, and what the run
directory says of its stages (done, newest checkpoint, step / total, throughput)."""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path

from unfused_dist.artefacts import is_done
from unfused_dist.config import load_config
from unfused_dist.engine.checkpoint import HISTORY, Checkpoints
from unfused_dist.run_layout import RunLayout
from unfused_dist.stage_table import table_of

from .queue import base_id, live_ids, queued, scancel
from .submit import launched_jobs

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state per job id (array tasks as <id>_<n>), from sacct when accounting is on, else squeue
    (which knows only pending and running jobs)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    acct = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)],
                          capture_output=True, text=True)
    lines = acct.stdout.splitlines() if acct.returncode == 0 else []
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(bases)], capture_output=True, text=True)
    lines += queue.stdout.splitlines() if queue.returncode == 0 else []
    for line in lines:
        jid, _, state = line.partition("|")
        state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        states.setdefault(jid, state)
        if "_[" in jid:  # the not-yet-started tasks of an array, as one record: 12_[0-3%4]
            states.setdefault(jid.split("_")[0], state)
    return states


def _summarise(ids: list[str], states: dict[str, str]) -> str:
    """One word for a job or an array: the state, or counts of states for an array."""
    found = [states.get(j) or states.get(j.split("_")[0]) or "?" for j in ids]
    if len(set(found)) == 1:
        return found[0]
    counts: dict[str, int] = {}
    for st in found:
        counts[st] = counts.get(st, 0) + 1
    return ",".join(f"{n} {st}" for st, n in sorted(counts.items()))


def _training(layout: RunLayout, stage: str) -> tuple[str, str, str]:
    """(step/total, newest checkpoint, throughput) from a stage's newest complete checkpoint."""
    ckpt = layout.ckpt(stage)
    found = Checkpoints(ckpt).newest_complete() if ckpt.is_dir() else None
    if not found:
        return "-", "-", "-"
    tag, meta = found
    where = ckpt / tag
    history = json.loads((where / HISTORY).read_text()) if (where / HISTORY).exists() else []
    rate = statistics.median(h["clips_s"] for h in history[-20:]) if history else None
    step = f"{meta['global_step']}/{meta.get('total_steps') or '?'}"
    return step, str(where), f"{rate:.0f} clips/s" if rate else "-"


def _shown_jobs(run: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Job name -> the submission `status` shows: the newest one still pending or running, else the newest
    (an earlier launch's job may still be live); and the SLURM state of every job, with squeue's reason for
    a pending one ('PENDING (Dependency)')."""
    every = launched_jobs(run)
    slurm_ids = [j for job in every if job["cluster"] == "slurm" for j in job["job_ids"]]
    states = job_states(slurm_ids)
    in_queue = queued(slurm_ids)
    for jid, (state, reason) in in_queue.items():
        if state == "PENDING" and reason and reason != "None":
            states[jid] = f"PENDING ({reason})"
            if states.get(base_id(jid)) in (None, "PENDING"):
                states[base_id(jid)] = states[jid]
    live = {base_id(jid) for jid in in_queue}
    shown: dict[str, dict] = {}
    for job in every:  # oldest first: a newer submission replaces an older one unless only the older is live
        old = shown.get(job["name"])
        if old is None or not (base_id(old["job_ids"][0]) in live and base_id(job["job_ids"][0]) not in live):
            shown[job["name"]] = job
    return shown, states


def status_lines(run: Path) -> list[str]:
    cfg = load_config(RunLayout(Path(run)).config)
    layout = RunLayout.of(cfg)
    jobs, states = _shown_jobs(layout.root)
    rows = [("stage", "state", "job", "step/total", "newest checkpoint", "throughput")]
    for stage in table_of(cfg).for_run(cfg):
        d = layout.stage(stage.name)
        for name in [j.name for j in stage.slurm_jobs()]:
            job = jobs.get(name)
            state = _summarise(job["job_ids"], states) if job else "-"
            if d is not None and is_done(d):
                state = "done" if not job else f"done ({state})"
            elif d is not None and d.exists() and not job:
                state = "started"
            step, ckpt, rate = _training(layout, stage.name) if d is not None and name == stage.name else ("-",) * 3
            rows.append((name, state, job["job_ids"][0].split("_")[0] if job else "-", step, ckpt, rate))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def cancel(run: Path) -> tuple[list[str], dict[str, str]]:
    """scancel every pending or running job of every launch of the run; returns (the ids cancelled,
    id -> why for those scancel refused). Jobs SLURM no longer knows have finished: they are left alone."""
    cfg = load_config(RunLayout(Path(run)).config)
    live = live_ids([j for job in launched_jobs(cfg.run.path) if job["cluster"] == "slurm" for j in job["job_ids"]],
                    completing=False)
    failed = scancel(live)
    return [j for j in live if j not in failed], failed

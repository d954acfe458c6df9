"""`unfused launch` against a real single-node SLURM (scripts/slurm_local.sh): the `ci` pipeline (a few
steps a stage) as one job per stage, chained by afterok, with the embedding and assignment as job arrays,
ending with the results table the same run gives here; and a training job requeued mid-run that resumes from its checkpoint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.status import FINAL, job_states
from launchers.submit import latest_jobs
from unfused_dist.engine.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _unfused(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _wait_for_jobs(run: Path, deadline_s: float) -> dict[str, dict]:
    """Poll until every job of the run is in a final state; returns name -> job (with its states)."""
    deadline = time.monotonic() + deadline_s
    while True:
        jobs = latest_jobs(run)
        ids = [j for job in jobs.values() for j in job["job_ids"]]
        states = job_states(ids)
        if ids and all((states.get(j) or states.get(j.split("_")[0])) in FINAL for j in ids):
            return {name: {**job, "states": [states.get(j) or states.get(j.split("_")[0]) for j in job["job_ids"]]}
                    for name, job in jobs.items()}
        assert time.monotonic() < deadline, f"jobs still running after {deadline_s} s: {states}\n{_logs(run)}"
        time.sleep(2)


def _times(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (start, end) as sacct prints them (ISO, sortable)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,Start,End", "-j", ",".join(bases)],
                         capture_output=True, text=True, check=True).stdout
    return {jid: (start, end) for jid, start, end in (line.split("|") for line in out.splitlines())}


# The ci pipeline cut to a few steps per stage and two rows, one on each branch of the stage graph (the
# teacher's probe needs pre-training only, the student's fine-tune the whole chain): what this file checks is
# the orchestration and that a SLURM run computes what the same run computes here; the accuracies of the full
# ci pipeline are checked once, by tests/test_pipeline_ci.py.
TINY = ["pretrain.max_steps=2", "audio.norm_clips=16", "distill.max_steps=2", "finetune.labels_per_class=4",
        "finetune.epochs=1", "finetune.probe_epochs=2", "finetune.rows=[teacher_probe,unfused_finetune]"]
TINY_JOBS = {"pretrain", "pseudolabel-embed", "pseudolabel-fit", "pseudolabel-assign", "pseudolabel-finish", "distill",
             "finetune-teacher_probe", "finetune-unfused_finetune", "evaluate"}


def test_a_pipeline_on_slurm_runs_stage_by_stage_and_computes_what_it_computes_here(slurm_cluster, ci_data,
                                                                                   tmp_path):
    run = tmp_path / "ci_slurm"  # label shards go to labels/<run name>-<hash of its path>/
    r = _unfused("launch", "pipeline", "-c", "configs/ci.yaml", "--cluster", "slurm", "--resources",
                 "configs/slurm/ci.yaml", f"run.dir={run}", "run.name=ci_slurm", *TINY, env=slurm_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pseudolabel-embed: job" in r.stdout and "(array of 2)" in r.stdout
    jobs = _wait_for_jobs(run, 900)  # ~3 min on an idle 2-core machine
    failed = {n: j["states"] for n, j in jobs.items() if set(j["states"]) != {"COMPLETED"}}
    assert not failed, (failed, _logs(run))

    # every stage ran as its own job, after the jobs it depends on had finished
    assert set(jobs) == TINY_JOBS and len({j["job_ids"][0].split("_")[0] for j in jobs.values()}) == len(jobs)
    times = _times([i for j in jobs.values() for i in j["job_ids"]])
    for job in jobs.values():
        for dep in job["after"]:
            started = min(times[i][0] for i in job["job_ids"])
            assert started >= max(times[i][1] for i in jobs[dep]["job_ids"]), (job["name"], dep)
    # the embedding array's two tasks ran side by side (each embedded its own half of the shards)
    embed = [times[i] for i in jobs["pseudolabel-embed"]["job_ids"]]
    assert len(embed) == 2 and max(s for s, _ in embed) < min(e for _, e in embed)
    status = _unfused("status", str(run), env=slurm_cluster.env)
    assert status.returncode == 0 and "pseudolabel-embed" in status.stdout and "COMPLETED" in status.stdout

    # The same run on this machine (2 processes under torchrun, the pseudo-labels as one stage) computes the
    # same pseudo-labels and the same accuracies, to the last digit.
    here = tmp_path / "ci_here"
    local = subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pipeline", "-c", "configs/ci.yaml",
                            f"run.dir={here}", "run.name=ci_slurm", "run.nproc=2", *TINY], cwd=ROOT,
                           env=_fresh(slurm_cluster.env), capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, (local.stdout + local.stderr)[-3000:]
    slurm, local = json.loads((run / "results.json").read_text()), json.loads((here / "results.json").read_text())
    assert [r["row"] for r in slurm["rows"]] == ["teacher_probe", "unfused_finetune"]
    assert slurm["pseudolabels"] == local["pseudolabels"] and slurm["baseline"] == local["baseline"]
    assert slurm["rows"] == local["rows"]


def test_a_requeued_training_job_resumes_from_its_checkpoint(slurm_cluster, ci_data, tmp_path):
    run = tmp_path / "rq"
    r = _unfused("launch", "pretrain", "-c", "configs/ci.yaml", "--cluster", "slurm", "--resources",
                 "configs/slurm/ci.yaml", f"run.dir={run}", "run.name=rq", "pretrain.max_steps=12",
                 "pretrain.batch_size=8", "audio.norm_clips=16",
                 "engine.save_every_steps=2", env=slurm_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = latest_jobs(run)["pretrain"]["job_ids"][0]
    checkpoints = Checkpoints(run / "pretrain" / "ckpt")
    deadline = time.monotonic() + 600
    while not checkpoints.newest_complete():  # a checkpoint exists: the job is mid-run
        assert time.monotonic() < deadline and job_states([job_id]).get(job_id) not in FINAL, _logs(run)
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True, env=slurm_cluster.env)
    jobs = _wait_for_jobs(run, 900)
    assert jobs["pretrain"]["states"] == ["COMPLETED"], _logs(run)
    log = _logs(run)
    assert "resumed from" in log, log[-3000:]
    assert json.loads((run / "pretrain" / "done.json").read_text())["steps"] == 12


def _fresh(env: dict) -> dict:
    """A new process's environment: a stage run earlier in this pytest process leaves its rendezvous variables."""
    return {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}


def _logs(run: Path) -> str:
    """The tail of every job's stdout and stderr (progress bars cut to their last update)."""
    files = sorted(run.glob("slurm/*/*/*.out")) + sorted(run.glob("slurm/*/*/*.err"))
    return "\n".join(re.sub(r"[^\n]*\r", "", p.read_text(errors="replace"))[-2000:] for p in files)


def test_cancel_stops_every_unfinished_job_of_a_run(slurm_cluster, ci_data, tmp_path):
    run = tmp_path / "cx"
    r = _unfused("launch", "pipeline", "-c", "configs/ci.yaml", "--cluster", "slurm", "--resources",
                 "configs/slurm/ci.yaml", f"run.dir={run}", "run.name=cx", env=slurm_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    first = latest_jobs(run)["pretrain"]["job_ids"][0]
    slurm_cluster.wait_state(first, {"RUNNING"}, timeout=120, source="squeue")
    r = _unfused("cancel", str(run), env=slurm_cluster.env)
    assert r.returncode == 0 and first in r.stdout, r.stderr
    jobs = _wait_for_jobs(run, 120)
    assert {s for job in jobs.values() for s in job["states"]} == {"CANCELLED"}, jobs
    assert "no unfinished jobs" in _unfused("cancel", str(run), env=slurm_cluster.env).stdout

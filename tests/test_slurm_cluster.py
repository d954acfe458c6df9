"""Smoke tests of submitit against the real single-node SLURM cluster of tests/slurm_cluster.py.

Synchronisation is by polling conditions (files, sacct) against deadlines, never by fixed sleeps.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import submitit

# The jobs run in fresh interpreters that cannot import this test module: ship its code by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 60


def _executor(folder, **params):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**{"timeout_min": 10, "cpus_per_task": 1, "nodes": 1, "tasks_per_node": 1, **params})
    return ex


def _wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _result(job, timeout=JOB_TIMEOUT_S):
    """job.result() with a deadline (submitit's own wait has none)."""
    _wait_for(lambda: job.done(), timeout, f"job {job.job_id} (logs: {job.paths.stdout}, {job.paths.stderr})")
    return job.result()


def add(a, b):
    return {"sum": a + b, "job_id": os.environ.get("SLURM_JOB_ID")}


def square(x):
    return x * x, os.environ.get("SLURM_ARRAY_TASK_ID")


def rank_report():
    env = submitit.JobEnvironment()
    return {"global_rank": env.global_rank, "local_rank": env.local_rank, "num_tasks": env.num_tasks,
            "pid": os.getpid()}


class Counter(submitit.helpers.Checkpointable):
    """Counts until a release file appears; its state (count, starts) travels in submitit's checkpoint."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.count = 0
        self.starts = []  # SLURM_RESTART_COUNT of every start of this callable

    def _progress(self):
        p = Path(self.folder) / "progress"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(f"{len(self.starts)} {self.count}")
        os.replace(tmp, p)

    def __call__(self):
        self.starts.append(int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        release = Path(self.folder) / "release"
        while not release.exists():
            self.count += 1
            self._progress()
            time.sleep(0.05)
        return {"starts": self.starts, "count": self.count, "job_id": os.environ.get("SLURM_JOB_ID")}


def self_checkpointing(folder):
    """Saves its own state to disk on SIGTERM and exits (as the training engine does), so a requeue by
    `scontrol requeue` from outside (SIGTERM to the job, then a restart) resumes from that state."""
    folder = Path(folder)
    ckpt = folder / "state.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"count": 0, "starts": []}
    state["starts"].append(int(os.environ.get("SLURM_RESTART_COUNT", "0")))

    def save_and_exit(signum, frame):
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, ckpt)
        os._exit(0)  # not sys.exit: submitit would record a result for a run that is being requeued

    signal.signal(signal.SIGTERM, save_and_exit)  # replaces submitit's "bypass" handler
    while not (folder / "release").exists():
        state["count"] += 1
        tmp = folder / "progress.tmp"
        tmp.write_text(f"{len(state['starts'])} {state['count']}")
        os.replace(tmp, folder / "progress")
        time.sleep(0.05)
    return {**state, "job_id": os.environ.get("SLURM_JOB_ID")}


def _read_progress(path):
    try:
        starts, count = map(int, path.read_text().split())
    except (OSError, ValueError):
        return None
    return starts, count


def test_cluster_is_up(slurm_cluster):
    assert slurm_cluster.run("sinfo", "-h", "-N", "-o", "%T").strip() == "idle"
    assert "unfused" in slurm_cluster.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster")


def test_submitit_job_completes(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(add, 2, 3)
    assert _result(job) == {"sum": 5, "job_id": job.job_id}
    # the result file appears before the job leaves SLURM: poll accounting (sacct) until it is final
    assert slurm_cluster.wait_state(job.job_id, ("COMPLETED",)) == "COMPLETED"
    _wait_for(lambda: job.get_info(mode="force").get("State") == "COMPLETED", 30, "submitit's job.state")
    assert job.state == "COMPLETED"


def test_submitit_job_array(slurm_cluster, tmp_path):
    jobs = _executor(tmp_path).map_array(square, [1, 2, 3])
    assert len(jobs) == 3
    results = [_result(j) for j in jobs]
    assert [r[0] for r in results] == [1, 4, 9]
    assert sorted(r[1] for r in results) == ["0", "1", "2"]
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array job
    for j in jobs:
        assert slurm_cluster.wait_state(j.job_id, ("COMPLETED",)) == "COMPLETED"


def test_submitit_two_tasks(slurm_cluster, tmp_path):
    job = _executor(tmp_path, tasks_per_node=2).submit(rank_report)
    _wait_for(lambda: job.done(), JOB_TIMEOUT_S, f"2-task job {job.job_id}")
    results = job.results()  # one per task
    assert sorted(r["global_rank"] for r in results) == [0, 1]
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert all(r["num_tasks"] == 2 for r in results)
    assert len({r["pid"] for r in results}) == 2
    assert slurm_cluster.wait_state(job.job_id, ("COMPLETED",)) == "COMPLETED"


def test_failed_job_state(slurm_cluster, tmp_path):
    """A job whose batch script fails reads FAILED in accounting (what `unfused status` reports)."""
    out = slurm_cluster.run("sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), "--wrap", "exit 3")
    job_id = out.strip().split(";")[0]
    assert slurm_cluster.wait_state(job_id, ("FAILED",)) == "FAILED"
    assert slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "ExitCode", "-j", job_id).strip() == "3:0"


def test_checkpointable_preempted_requeue_resumes(slurm_cluster, tmp_path):
    """Preemption / time limit as SLURM signals it: USR2 to the job's step (submitit's --signal=USR2@90);
    submitit calls the Checkpointable's checkpoint() and runs `scontrol requeue <jobid>`; the requeued job
    (same job id) starts again from that checkpoint."""
    work = tmp_path / "work"
    work.mkdir()
    job = _executor(tmp_path / "submitit").submit(Counter(work))
    progress = work / "progress"
    _wait_for(lambda: (p := _read_progress(progress)) and p[0] == 1 and p[1] >= 5, JOB_TIMEOUT_S,
              "first run's progress")
    assert slurm_cluster.job_state(job.job_id, source="squeue") == "RUNNING"
    # accounting follows the controller within seconds
    assert slurm_cluster.wait_state(job.job_id, ("RUNNING",), timeout=30) == "RUNNING"
    slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
    # requeued by submitit, then started again: the second start goes on counting from the checkpoint
    second = _wait_for(lambda: (p := _read_progress(progress)) and p[0] == 2 and p, 90, "the requeued run")
    show = slurm_cluster.run("scontrol", "show", "job", job.job_id)
    assert "Restarts=1" in show, show
    (work / "release").touch()
    result = _result(job)
    assert result["job_id"] == job.job_id
    assert result["starts"] == [0, 1]  # started twice: SLURM_RESTART_COUNT 0, then 1
    assert result["count"] >= second[1] > 5  # resumed from the checkpoint, not from 0
    assert slurm_cluster.wait_state(job.job_id, ("COMPLETED",)) == "COMPLETED"
    # accounting keeps the interrupted run as a REQUEUED record of the same job id
    states = slurm_cluster.run("sacct", "-n", "-X", "-P", "-D", "-o", "State", "-j", job.job_id).split()
    assert states == ["REQUEUED", "COMPLETED"], states


def test_scontrol_requeue_resumes(slurm_cluster, tmp_path):
    """`scontrol requeue <jobid>` from outside, mid-run: SLURM sends SIGTERM (which submitit itself
    ignores), the job saves its own checkpoint and exits, and the requeued run resumes from it."""
    work = tmp_path / "work"
    work.mkdir()
    job = _executor(tmp_path / "submitit").submit(self_checkpointing, work)
    progress = work / "progress"
    _wait_for(lambda: (p := _read_progress(progress)) and p[0] == 1 and p[1] >= 5, JOB_TIMEOUT_S,
              "first run's progress")
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    second = _wait_for(lambda: (p := _read_progress(progress)) and p[0] == 2 and p, 90, "the requeued run")
    (work / "release").touch()
    result = _result(job)
    assert result["job_id"] == job.job_id
    assert result["starts"] == [0, 1]
    assert result["count"] >= second[1] > 5
    assert slurm_cluster.wait_state(job.job_id, ("COMPLETED",)) == "COMPLETED"
    assert "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", job.job_id)

"""`unfused launch / status / cancel` on the real single-node SLURM (tests/slurm_cluster.py) when a launch
meets the queue: sbatch refuses a job, an earlier launch is still queued, a job's dependency fails, SLURM no
longer knows a job of the run.

No job of these tests runs: the jobs without a dependency (pretrain, finetune-*) are submitted held
(`extra: {hold: true}`) and every other job waits for one of them, so each test costs seconds of controller
time, and a job's state changes only when the test (or the launcher under test) acts on it."""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.submit import latest_jobs
from unfused_dist.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
HELD = """
default: {cpus_per_task: 1, mem_gb: 1, time_min: 10}
pretrain: {extra: {hold: true}}
finetune: {extra: {hold: true}}
array_parts: 2
"""


def _unfused(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def launch(slurm_cluster, tone_dataset, tmp_path):
    """`unfused launch TARGET` of one run (tmp_path/run) on the test cluster, with resources `text`."""
    def run(target: str = "pipeline", text: str = HELD, env: dict | None = None) -> subprocess.CompletedProcess:
        resources = tmp_path / "resources.yaml"
        resources.write_text(text)
        return _unfused("launch", target, "--cluster", "slurm", "--resources", str(resources),
                        f"run.dir={tmp_path / 'run'}", f"data.pool={tone_dataset / 'train'}",
                        f"data.target={tone_dataset}", env=env or slurm_cluster.env)
    return run


def _id(run: Path, name: str) -> str:
    return latest_jobs(run)[name]["job_ids"][0].split("_")[0]


def _squeue_state(cluster, job_id: str) -> str:
    return cluster.job_state(job_id, source="squeue")


def test_a_refused_job_cancels_what_its_launch_queued_and_a_live_launch_blocks_the_next(slurm_cluster, launch,
                                                                                       tmp_path):
    run = tmp_path / "run"
    r = launch(text=HELD + "distill: {partition: nosuch}\n")
    assert r.returncode == 2, r.stdout + r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("unfused: error: sbatch refused job distill (resources: section 'distill' of "
                            f"{tmp_path / 'resources.yaml'}): ") and "invalid partition" in error.lower(), r.stderr
    queued = [_id(run, n) for n in ("pretrain", "pseudolabel-embed", "pseudolabel-finish")]
    assert "Traceback" not in r.stderr and f"cancelled the jobs this launch had queued ({queued[0]}, " in error
    for job_id in queued:  # nothing of the refused launch is left to run beside the relaunch
        assert _squeue_state(slurm_cluster, job_id) == "CANCELLED"

    r = launch()  # resources fixed: the whole pipeline is queued once
    assert r.returncode == 0, r.stderr
    pretrain, distill = _id(run, "pretrain"), _id(run, "distill")
    assert pretrain not in queued

    for target in ("pipeline", "distill"):  # a second launch would not wait for the queued jobs
        r = launch(target)
        assert r.returncode == 2 and "[launch]" not in r.stdout, r.stdout + r.stderr
        assert r.stderr.startswith(f"unfused: error: {run}: jobs {pretrain}, ") and "`unfused cancel" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert len(json.loads(RunLayout(run).launch_file.read_text())) == 2  # the refused launches submitted nothing

    status = _unfused("status", str(run), env=slurm_cluster.env)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert "PENDING (JobHeldUser)" in rows["pretrain"] and "PENDING (Dependency)" in rows["distill"], status.stdout

    r = _unfused("cancel", str(run), env=slurm_cluster.env)
    assert r.returncode == 0 and pretrain in r.stdout and distill in r.stdout, r.stdout + r.stderr
    assert _squeue_state(slurm_cluster, distill) == "CANCELLED"
    assert launch("pretrain").returncode == 0  # nothing live now: launching works again


def test_a_failed_job_cancels_the_jobs_waiting_for_it(slurm_cluster, launch, tmp_path):
    run = tmp_path / "run"
    assert launch().returncode == 0
    pretrain, scratch = _id(run, "pretrain"), _id(run, "finetune-scratch")
    slurm_cluster.run("scancel", pretrain)  # pretrain ends without success: afterok can never be satisfied
    for name in ("pseudolabel-embed", "distill", "finetune-teacher_probe", "evaluate"):  # directly or not
        slurm_cluster.wait_state(_id(run, name), {"CANCELLED"}, timeout=60, source="squeue")
    assert _squeue_state(slurm_cluster, scratch) == "PENDING"  # waits for nothing that failed


def test_cancel_covers_every_launch_and_skips_jobs_slurm_has_forgotten(slurm_cluster, launch, tmp_path):
    run = tmp_path / "run"
    assert launch().returncode == 0
    launches = json.loads(RunLayout(run).launch_file.read_text())
    live = sorted({j["job_ids"][0].split("_")[0] for j in launches[0]["jobs"]}, key=int)
    # A later launch of pretrain whose job SLURM no longer knows (purged after MinJobAge, accounting off):
    # an id the controller never handed out looks the same to squeue, sacct and scancel.
    forgotten = str(int(live[-1]) + 10_000)
    launches.append({"id": "later", "cluster": "slurm", "jobs": [
        {"name": "pretrain", "job_ids": [forgotten], "after": [], "array": 0, "folder": "", "submitted": 0}]})
    RunLayout(run).launch_file.write_text(json.dumps(launches))

    r = _unfused("cancel", str(run), env=slurm_cluster.env)
    assert r.returncode == 0 and r.stdout.strip() == f"cancelled {', '.join(live)}", r.stdout + r.stderr
    for job_id in live:
        assert _squeue_state(slurm_cluster, job_id) == "CANCELLED"
    assert _unfused("cancel", str(run), env=slurm_cluster.env).stdout.strip() == "no unfinished jobs"


def test_a_failing_squeue_refuses_launch_status_and_cancel_and_touches_no_job(slurm_cluster, launch, tmp_path):
    run = tmp_path / "run"
    assert launch().returncode == 0
    launches = RunLayout(run).launch_file.read_text()
    held = _id(run, "pretrain")
    broken = tmp_path / "empty-slurm.conf"  # a real squeue that fails at once, as with a bad SLURM_CONF
    broken.write_text("")
    env = {**slurm_cluster.env, "SLURM_CONF": str(broken)}
    for r in (_unfused("cancel", str(run), env=env), _unfused("status", str(run), env=env), launch(env=env)):
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "squeue failed" in r.stderr and "SLURM_CONF" in r.stderr, r.stderr
    assert RunLayout(run).launch_file.read_text() == launches  # no second launch recorded
    assert _squeue_state(slurm_cluster, held) == "PENDING"  # nothing cancelled


def test_a_second_launch_while_one_is_submitting_is_refused(slurm_cluster, launch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(RunLayout(run).launch_lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a launch still checking the queue and submitting holds
        r = launch()
        assert r.returncode != 0 and "another `unfused launch` of this run" in r.stderr, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and not RunLayout(run).launch_file.exists()
    assert launch().returncode == 0  # the first launch returned: the next one goes ahead


"""The engine's crash-proof exact resume, with 2 real processes (torchrun, gloo) and real shards: a job
SIGKILLed at a random step and re-run ends with the weights, losses, learning rates and sample keys of an
uninterrupted run, at ZeRO 1, 2 and 3; SIGTERM saves and exits 0; a truncated newest checkpoint falls back
to the previous one; a changed world size is refused unless --reshard."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_noise_dataset

from unfused_dist.engine.checkpoint import META, Checkpoints

JOB = Path(__file__).with_name("engine_job.py")
STEPS = 24  # 64 clips, 2 ranks x 2 workers, batch 4 -> 8 steps per epoch, 3 epochs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_noise_dataset(tmp_path_factory.mktemp("engine"), 64, shard_samples=4)


def _job(data: Path, out: Path, nproc: int = 2, **flags) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(JOB),
           "--data", str(data), "--out", str(out), *args]
    # a session of its own: --kill-at kills the job's process group, not pytest
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, start_new_session=True)


def _keys(out: Path, log: str, rank: int) -> list[dict]:
    path = out / f"keys-{log}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _history(out: Path) -> list[tuple]:
    return [(h["step"], h["epoch"], h["loss"], h["lr"]) for h in json.loads((out / "history.json").read_text())]


def _assert_same_run(got: Path, want: Path, logs: list[str]) -> None:
    """Weights bit for bit, every step's loss and learning rate, and per rank the keys trained on: the
    interrupted invocations' keys up to each resume point, then the last one's, equal the reference's."""
    a, b = torch.load(got / "final.pt", weights_only=True), torch.load(want / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(got) == _history(want) and len(_history(want)) == STEPS
    for rank in range(2):
        merged: list[dict] = []
        for log in logs:
            entries = _keys(got, log, rank)
            if entries:
                merged = [e for e in merged if e["step"] < entries[0]["step"]] + entries
        assert merged == _keys(want, "run", rank)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, Path]:
    """One uninterrupted run per ZeRO stage, made on first use."""
    runs: dict[int, Path] = {}

    def get(zero: int) -> Path:
        if zero not in runs:
            out = tmp_path_factory.mktemp(f"ref{zero}")
            r = _job(data, out, zero=zero)
            assert r.returncode == 0, r.stderr[-3000:]
            runs[zero] = out
        return runs[zero]
    return get


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(data, reference, tmp_path, zero):
    kill_at = random.Random(zero).randrange(4, STEPS - 2)
    r = _job(data, tmp_path, zero=zero, kill_at=kill_at, name="killed")
    assert r.returncode != 0 and not (tmp_path / "final.pt").exists()
    assert _keys(tmp_path, "killed", 0)[-1]["step"] == kill_at - 1
    r = _job(data, tmp_path, zero=zero, name="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert _keys(tmp_path, "resumed", 0)[0]["step"] <= kill_at  # it went back to a checkpoint
    _assert_same_run(tmp_path, reference(zero), ["killed", "resumed"])
    assert len(Checkpoints(tmp_path / "ckpt").tags()) == 2  # keep_checkpoints=2


def test_sigterm_saves_exits_0_and_a_truncated_newest_checkpoint_falls_back(data, reference, tmp_path):
    r = _job(data, tmp_path, zero=2, sigterm_at=10, name="stopped")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopping on" in r.stdout + r.stderr and not (tmp_path / "final.pt").exists()
    ckpts = Checkpoints(tmp_path / "ckpt")
    newest = ckpts.tags()[0]
    meta = json.loads((tmp_path / "ckpt" / newest / META).read_text())
    assert meta["global_step"] == 11 and meta["world_size"] == 2  # saved right after the step in flight

    # truncate the newest checkpoint's largest file: the rerun must say so and use the one before
    victim = max((tmp_path / "ckpt" / newest).glob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = _job(data, tmp_path, zero=2, name="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping {tmp_path / 'ckpt' / newest}: {victim.name} is" in r.stderr
    assert _keys(tmp_path, "resumed", 0)[0]["step"] == 9  # the previous checkpoint, step 9
    _assert_same_run(tmp_path, reference(2), ["stopped", "resumed"])


def test_a_changed_world_size_is_refused_unless_resharded(data, tmp_path):
    r = _job(data, tmp_path, zero=3, kill_at=14, name="killed")
    assert r.returncode != 0
    r = _job(data, tmp_path, nproc=1, zero=3, name="one")
    assert r.returncode != 0
    assert "saved by 2 processes, now 1" in r.stderr and "--reshard" in r.stderr
    r = _job(data, tmp_path, nproc=1, zero=3, name="one", reshard=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resharded" in r.stdout + r.stderr
    # the newest checkpoint (step 12) is 4 steps into epoch 1: with 1 process an epoch is 16 steps, and
    # epoch 1 restarts from its beginning, the schedule at the optimizer step where that epoch began (8)
    assert _keys(tmp_path, "one", 0)[0]["step"] == 16
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history][:9] == list(range(1, 10)) and history[-1]["step"] == 8 + 2 * 16

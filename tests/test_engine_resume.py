"""The engine's crash-proof exact resume, with 2 real processes (torchrun, gloo) and real shards: a job
SIGKILLed at a random step and re-run ends with the weights, losses, learning rates and sample keys of an
uninterrupted run, at ZeRO 1, 2 and 3 and with gradient accumulation; SIGTERM saves and exits 0; a truncated
newest checkpoint falls back to the previous one; no step is saved twice and a crash mid-save keeps the
previous checkpoint; a NaN loss stops the run before any save; an edited config is refused; a changed world
size is refused unless --reshard, which trains the remaining epochs in the new layout (fewer or more
processes, ZeRO 0 or 3)."""
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


def _saves(out: Path, log: str) -> list[int]:
    path = out / f"saves-{log}.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


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
    """One uninterrupted run per ZeRO stage (and gradient accumulation), made on first use."""
    runs: dict[tuple, Path] = {}

    def get(zero: int, grad_accum: int = 1, module: str = "net") -> Path:
        if (zero, grad_accum, module) not in runs:
            out = tmp_path_factory.mktemp(f"ref{zero}-{grad_accum}-{module}")
            r = _job(data, out, zero=zero, grad_accum=grad_accum, module=module)
            assert r.returncode == 0, r.stderr[-3000:]
            assert len(set(_saves(out, "run"))) == len(_saves(out, "run"))  # no step saved twice
            runs[(zero, grad_accum, module)] = out
        return runs[(zero, grad_accum, module)]
    return get


def test_distillation_sigkilled_at_a_random_step_resumes_exactly(data, reference, tmp_path):
    """The real DistillModule: its augmentation generator and mixup memory bank are per-rank state, so
    weights, losses and keys match an uninterrupted run only when the checkpoint carries them."""
    kill_at = random.Random("distill").randrange(4, STEPS - 2)
    r = _job(data, tmp_path, zero=2, module="distill", kill_at=kill_at, name="killed")
    assert r.returncode != 0 and not (tmp_path / "final.pt").exists()
    r = _job(data, tmp_path, zero=2, module="distill", name="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert _keys(tmp_path, "resumed", 0)[0]["step"] <= kill_at  # it went back to a checkpoint
    _assert_same_run(tmp_path, reference(2, module="distill"), ["killed", "resumed"])


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


def test_with_grad_accum_saves_wait_for_the_accumulation_boundary_and_resume_exactly(data, reference, tmp_path):
    # DeepSpeed saves no accumulated gradients: the step saves (every 3) and the SIGTERM one (step 13) must
    # each wait for the end of their 2-step window
    r = _job(data, tmp_path, zero=1, grad_accum=2, sigterm_at=12, name="stopped")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _saves(tmp_path, "stopped") == [4, 6, 10, 12, 14]
    r = _job(data, tmp_path, zero=1, grad_accum=2, name="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _keys(tmp_path, "resumed", 0)[0]["step"] == 14
    _assert_same_run(tmp_path, reference(1, 2), ["stopped", "resumed"])


def test_no_step_is_saved_twice_and_a_crash_mid_save_keeps_the_previous_checkpoint(data, reference, tmp_path):
    # keep_checkpoints=1: a save that replaced its predecessor before being complete would leave none.
    # Saving every 4 steps, the epochs' last steps (8, 16, 24) are due too: each is saved once, after its epoch.
    r = _job(data, tmp_path, zero=2, keep=1, save_every=4, kill_in_save=3, name="killed")
    assert r.returncode != 0
    assert _saves(tmp_path, "killed") == [4, 8, 12]
    assert Checkpoints(tmp_path / "ckpt").tags() == ["step00000008"]
    r = _job(data, tmp_path, zero=2, keep=1, save_every=4, name="resumed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _keys(tmp_path, "resumed", 0)[0]["step"] == 8
    assert _saves(tmp_path, "resumed") == [12, 16, 20, 24]
    _assert_same_run(tmp_path, reference(2), ["killed", "resumed"])


def test_a_nan_loss_stops_every_rank_before_any_save(data, tmp_path):
    r = _job(data, tmp_path, zero=1, nan_at=13, name="nan")  # the last rank's step 14 (epoch 1)
    assert r.returncode != 0
    assert "the loss is not finite (NaN/inf) at epoch 1, step 14" in r.stderr
    assert _saves(tmp_path, "nan") == [3, 6, 9, 12] and not (tmp_path / "final.pt").exists()
    ckpts = Checkpoints(tmp_path / "ckpt")
    for tag in ckpts.tags():
        module = torch.load(tmp_path / "ckpt" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in module.values())
        json.loads((tmp_path / "ckpt" / tag / "history.json").read_text(), parse_constant=_no_bare_nan)


def _no_bare_nan(word: str):
    raise AssertionError(f"{word} in history.json is not JSON")


def test_an_edited_config_is_refused_on_resume(data, tmp_path):
    r = _job(data, tmp_path, zero=1, kill_at=5, config_hash="before", name="killed")
    assert r.returncode != 0
    r = _job(data, tmp_path, zero=1, config_hash="after", name="edited")
    assert r.returncode != 0
    assert "saved under config hash before, now after" in r.stderr
    assert not _keys(tmp_path, "edited", 0)


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
    # epoch 1 restarts from its beginning, step 16 in the new layout, where the schedule starts too
    assert _keys(tmp_path, "one", 0)[0]["step"] == 16
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 9)) + list(range(17, 49))  # epoch 0 in 2-process steps
    assert history[-1]["lr"] == 0.0  # the cosine schedule ran to its end


def test_reshard_to_more_processes_at_zero_0_trains_the_remaining_epochs(data, tmp_path):
    r = _job(data, tmp_path, nproc=1, zero=0, kill_at=20, name="one")  # newest checkpoint: step 18, epoch 1
    assert r.returncode != 0
    r = _job(data, tmp_path, zero=0, name="two", reshard=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restarting epoch 1 at step 8" in r.stdout + r.stderr  # 8 steps per epoch with 2 processes
    assert _keys(tmp_path, "two", 0)[0]["step"] == 8 and _keys(tmp_path, "two", 1)[-1]["step"] == 23
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 17)) + list(range(9, 25))  # epoch 0 in 1-process steps
    assert history[-1]["lr"] == 0.0
    ckpts = Checkpoints(tmp_path / "ckpt")  # the 1-process checkpoints (steps up to 18) are gone
    assert ckpts.tags() == ["step00000024", "step00000021"] and ckpts.newest_complete()[1]["world_size"] == 2


def test_reshard_with_grad_accum_saves_only_at_the_engines_accumulation_boundaries(data, tmp_path):
    # 1 process: 16 steps an epoch; the newest checkpoint is step 18 (epoch 1). 2 processes restart epoch 1
    # at step 8, which is 2 micro-steps into a window of 3 in global steps but 0 in the fresh engine's.
    r = _job(data, tmp_path, nproc=1, zero=0, grad_accum=3, save_every=3, kill_at=20, name="one")
    assert r.returncode != 0
    r = _job(data, tmp_path, zero=0, grad_accum=3, save_every=3, name="two", reshard=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restarting epoch 1 at step 8" in r.stdout + r.stderr
    windows = [int(w) for w in (tmp_path / "windows-two.txt").read_text().split()]
    assert len(windows) == len(_saves(tmp_path, "two")) >= 3
    assert windows[:-1] == [0] * (len(windows) - 1)  # the last save is the run's end


class _Payload:
    """A pickle that runs a command when unpickled: what a tampered checkpoint file could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim, nproc", [("zero_pp_rank_0_mp_rank_00_optim_states.pt", 1),  # exact resume
                                           ("mp_rank_00_model_states.pt", 1),
                                           ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 2)])  # reshard
def test_a_checkpoint_file_holding_code_is_refused_and_never_run(data, tmp_path, victim, nproc):
    r = _job(data, tmp_path, nproc=1, zero=1, kill_at=20, name="one")  # newest checkpoint: step 18
    assert r.returncode != 0
    ckpts = Checkpoints(tmp_path / "ckpt")
    tag = ckpts.newest_complete()[0]
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer_state_dict": _Payload(marker)}, tmp_path / "ckpt" / tag / victim)
    meta_path = tmp_path / "ckpt" / tag / META  # sizes as the manifest says: the checkpoint looks complete
    meta = json.loads(meta_path.read_text())
    meta["files"][victim] = (tmp_path / "ckpt" / tag / victim).stat().st_size
    meta_path.write_text(json.dumps(meta))
    assert ckpts.newest_complete()[0] == tag
    r = _job(data, tmp_path, nproc=nproc, zero=1, name="resumed", **({"reshard": True} if nproc == 2 else {}))
    assert r.returncode != 0 and f"{tag}/{victim}: refused to load: it holds more than weights" in r.stderr, \
        r.stderr[-3000:]
    assert not marker.exists()
    assert not _keys(tmp_path, "resumed", 0)  # refused before training a step

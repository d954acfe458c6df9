"""End to end on the `ci` corpus: every stage, 2 processes for the training stages, real shards, real
DeepSpeed, real FAISS; then the skip / redo behaviour of a re-run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from unfused_dist.config import load_config
from unfused_dist.data.source import label_shard_name
from unfused_dist.data.manifest import DatasetManifest
from unfused_dist.data.shards import iter_shard

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).with_name("ci_reference.json")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ci_run(ci_local_run):
    return ci_local_run["run_dir"], ci_local_run["stdout"]


def _pipeline(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pipeline", "-c", "configs/ci.yaml",
                           f"run.dir={run_dir}", "run.nproc=2"], cwd=ROOT, capture_output=True, text=True)


def test_every_stage_leaves_its_artefacts(ci_run):
    run_dir, out = ci_run
    for stage in ("pretrain", "pseudolabel", "distill"):
        assert (run_dir / stage / "done.json").is_file()
    teacher = json.loads((run_dir / "pretrain" / "encoder.json").read_text())
    student = json.loads((run_dir / "distill" / "encoder.json").read_text())
    assert (teacher["parameters"], student["parameters"]) == (9_518_208, 5_321_856)
    assert json.loads((run_dir / "pretrain" / "done.json").read_text())["world_size"] == 2
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["row"] for r in results["rows"]] == ["scratch", "teacher_probe", "teacher_finetune",
                                                   "unfused_probe", "unfused_finetune"]
    for name in ("results.md", "results.png", "losses.png", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0
    assert "| unfused_finetune |" in out  # the table is printed


def test_label_shards_align_with_audio_shards(ci_run):
    run_dir, _ = ci_run
    cfg = load_config(run_dir / "config.yaml")
    train = Path(cfg.data.target) / "train"
    labels = Path(json.loads((run_dir / "pseudolabel" / "done.json").read_text())["labels_dir"])
    meta = json.loads((labels / "meta.json").read_text())
    assert meta["k"] == cfg.pseudolabel.k and len(meta["teacher_sha256"]) == 64
    for shard in DatasetManifest.load(train).shards:
        audio_keys = [s.key for s in iter_shard(train / shard.name)]
        label_samples = list(iter_shard(labels / label_shard_name(shard.name)))
        assert [s.key for s in label_samples] == audio_keys
        assert all(0 <= s.cls() < cfg.pseudolabel.k for s in label_samples)


def test_every_rows_accuracy_is_in_its_reference_band(ci_run):
    """Each row's accuracy, and the simple baseline's, against a known-good run's (tests/ci_reference.json):
    the band around each is set from the run-to-run spread measured over several runs (benchmarks/RESULTS.md),
    so a model that learns worse (shuffled labels, badly mixed batches, misaligned pseudo-labels) leaves its
    band, and so does one that suddenly learns better. Updating the reference is a deliberate commit that says
    why the numbers moved."""
    run_dir, _ = ci_run
    results = json.loads((run_dir / "results.json").read_text())
    reference = json.loads(REFERENCE.read_text())
    got = {r["row"]: r for r in results["rows"]} | {"baseline": results["baseline"]}
    outside = [f"{row} {split}: {got[row][split]:.3f} outside [{lo:.3f}, {hi:.3f}]"
               for row, bands in reference["bands"].items() for split, (lo, hi) in bands.items()
               if not lo <= got[row][split] <= hi]
    assert not outside, ("; ".join(outside) + f" (bands: {REFERENCE.name}; if the change is meant to move them, "
                         "measure the spread again and update the reference, saying why)")
    for row in reference["above_baseline"]:  # fine-tuned rows that the ci task lets beat log-mel statistics
        assert got[row]["test_acc"] > results["baseline"]["test_acc"], (row, got[row], results["baseline"])
    assert results["pseudolabels"]["nmi_vs_true_labels"] > reference["min_nmi"]
    distill = json.loads((run_dir / "distill" / "history.json").read_text())
    first, last = distill[:4], distill[-4:]
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)  # the student learns the pseudo-labels


def test_rerun_skips_finished_stages_and_redoes_a_half_finished_one(ci_run):
    run_dir, _ = ci_run
    # Simulate a pseudolabel stage killed half-way: no done.json, a stray partial artefact.
    (run_dir / "pseudolabel" / "done.json").unlink()
    (run_dir / "pseudolabel" / "partial.tmp").write_text("half-written")
    proc = _pipeline(run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pretrain: done already" in proc.stdout and "distill: done already" in proc.stdout
    assert "unfused_dist.cli run pseudolabel" in proc.stdout and "[pipeline] pseudolabel: " in proc.stdout
    assert (run_dir / "pseudolabel" / "done.json").is_file()
    assert not (run_dir / "pseudolabel" / "partial.tmp").exists()
    status = subprocess.run([sys.executable, "-m", "launchers.cli", "status", str(run_dir)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "pseudolabel" in status and "pending" not in status and "started" not in status


def test_a_different_config_in_the_same_run_dir_is_refused(ci_run):
    run_dir, _ = ci_run
    proc = subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pipeline", "-c", "configs/ci.yaml",
                           f"run.dir={run_dir}", "run.nproc=2", "distill.epochs=99"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "different config (distill.epochs: " in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_fails_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pipeline", "-c", "configs/ci.yaml",
                           f"run.dir={run_dir}", f"data.target={tmp_path / 'nowhere'}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'nowhere' / 'train' / 'manifest.json'}: no manifest" in proc.stderr
    assert not run_dir.exists()  # the corrected command is not refused as a "different config"

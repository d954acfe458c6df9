import io
import os
import tarfile

import pytest

pytest_plugins = ["slurm_cluster"]  # the session-scoped real SLURM (tests/slurm_cluster.py)

# Every test process: no DeepSpeed shared-memory op builds, quiet logs.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests of a whole pipeline (run in CI too)")


@pytest.fixture(scope="session")
def ci_data():
    """The `ci` corpora and their shards (data/ci, what configs/ci.yaml reads), built once if missing:
    every test that runs a stage of configs/ci.yaml asks for it, so each runs alone too."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", "scripts/make_data.sh", "ci"], cwd=root, check=True)
    return root / "data" / "ci"


@pytest.fixture(scope="session")
def ci_local_run(tmp_path_factory, ci_data):
    """The whole `ci` pipeline on this machine (2 processes), once per session: its run dir, its output,
    and its results table as it was when it finished (later tests re-run stages in that dir)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path_factory.mktemp("run") / "ci"
    proc = subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pipeline", "-c", "configs/ci.yaml",
                           f"run.dir={run_dir}", "run.nproc=2"], cwd=root, capture_output=True, text=True)
    # a rank's one-line error comes first: a traceback of the rank left waiting would push it out of the tail
    errors = [line for line in proc.stderr.splitlines() if "unfused: error:" in line]
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"run_dir": run_dir, "stdout": proc.stdout,
            "results": json.loads((run_dir / "results.json").read_text())}


@pytest.fixture
def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tone_corpus(root, n_per_class=12, classes=("low", "mid", "high"), splits=("train", "val", "test")):
    """Short labelled tones at mixed sample rates as raw files + a path,label,split CSV."""
    import csv

    import numpy as np
    import soundfile as sf

    freqs = {c: 200 * 2 ** i for i, c in enumerate(classes)}
    rng = np.random.default_rng(0)
    rows = []
    (root / "raw").mkdir(parents=True, exist_ok=True)
    for i in range(n_per_class * len(classes)):
        label = classes[i % len(classes)]
        sr = (16000, 22050, 8000)[i % 3]
        t = np.arange(int(sr * rng.uniform(0.6, 1.4))) / sr
        x = 0.3 * np.sin(2 * np.pi * freqs[label] * t) + 0.02 * rng.standard_normal(len(t))
        path = f"raw/{label}_{i:03d}.wav"
        sf.write(root / path, x.astype("float32"), sr)
        rows.append((path, label, splits[(i // len(classes)) % len(splits)]))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture
def tone_dataset(tmp_path):
    """A built dataset (train/val/test split dirs) with small shards."""
    from shards_tools.build import build

    csv_path = write_tone_corpus(tmp_path / "src")
    # the source's order: tests name samples by their place in the shards
    build(csv_path, tmp_path / "shards", workers=1, shard_samples=3, keep_order=True, progress=False)
    return tmp_path / "shards"


@pytest.fixture
def append_member():
    """Append a member with raw bytes to an existing tar (to plant foreign or corrupt members)."""
    import io
    import tarfile

    def append(tar_path, name: str, payload: bytes) -> None:
        with tarfile.open(tar_path, "a") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return append


def read_tar(path) -> list[tuple[str, bytes]]:
    """(name, payload) of every member of a tar, in order."""
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """Write (name, payload) members as regular files: to rebuild a shard with planted damage."""
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def corrupt_audio():
    """Replace the audio member of the i-th sample of a shard with a FLAC header and garbage; returns its key."""
    def corrupt(tar_path, index: int) -> str:
        members = read_tar(tar_path)
        audio = [i for i, (name, _) in enumerate(members) if name.endswith((".flac", ".wav"))][index]
        members[audio] = (members[audio][0], b"fLaC" + b"\x00" * 64)
        write_tar(tar_path, members)
        return members[audio][0].split(".")[0]
    return corrupt


def build_noise_dataset(root, n: int, shard_samples: int):
    """n short noise clips (keys c000, c001, ...) built in that order into root/shards/train (tests name
    samples by their place in the shards); returns the split dir."""
    import numpy as np
    import soundfile as sf

    from shards_tools.build import build

    (root / "raw").mkdir(parents=True)
    for i in range(n):
        sf.write(root / "raw" / f"c{i:03d}.wav", np.random.default_rng(i).uniform(-.3, .3, 1600).astype("float32"),
                 16000)
    build(root / "raw", root / "shards", workers=1, shard_samples=shard_samples, keep_order=True, progress=False)
    return root / "shards" / "train"

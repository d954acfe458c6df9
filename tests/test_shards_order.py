"""Shards are mixed when written: a build deals its inputs to shards in a seeded random order (so no shard is a
run of one class or one source), `--keep-order` opts out, and `stats` / `verify` say how mixed a dataset is."""
import csv
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards_tools.build import build
from shards_tools.mixing import expected_distinct
from shards_tools.stats import split_stats
from shards_tools.verify import verify_split
from unfused_dist.data.manifest import DatasetManifest
from unfused_dist.data.shards import iter_shard

CLI = Path(sys.executable).parent / "unfused-shards"


def _class_folders(root: Path, classes: int = 6, per_class: int = 12) -> Path:
    """A folder per class (the usual corpus layout), so the source's order is sorted by label."""
    for c, i in itertools.product(range(classes), range(per_class)):
        path = root / f"class{c}" / f"clip{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.random.default_rng(c * 100 + i).uniform(-.3, .3, 400).astype(np.float32), 16000)
    return root


def _labels_per_shard(split: Path) -> list[list[str]]:
    return [[s.meta()["label"] for s in iter_shard(p)] for p in DatasetManifest.load(split).shard_paths(split)]


def test_a_build_mixes_every_shard_and_keep_order_keeps_the_sources_runs(tmp_path):
    src = _class_folders(tmp_path / "raw")
    build(src, tmp_path / "mixed", workers=2, shard_samples=6, labels_from_dirs=True, progress=False)
    build(src, tmp_path / "kept", workers=2, shard_samples=6, labels_from_dirs=True, keep_order=True,
          progress=False)
    mixed, kept = tmp_path / "mixed" / "train", tmp_path / "kept" / "train"

    assert [set(labels) for labels in _labels_per_shard(kept)] == [{f"class{c}"} for c in range(6) for _ in (0, 1)]
    random_order = expected_distinct([12] * 6, 6)  # 4.1 classes in a shard of 6
    distinct = [len(set(labels)) for labels in _labels_per_shard(mixed)]
    assert np.mean(distinct) > 0.85 * random_order and min(distinct) >= 2, distinct
    assert sorted(sum(_labels_per_shard(mixed), [])) == sorted(sum(_labels_per_shard(kept), []))

    build_info = DatasetManifest.load(mixed).build, DatasetManifest.load(kept).build
    assert [(b.order, b.seed) for b in build_info] == [("shuffled", 0), ("source", None)]
    # stats and verify judge the mix from the shards themselves
    label_mix = {name: split_stats(d).mixes[0] for name, d in (("mixed", mixed), ("kept", kept))}
    assert label_mix["mixed"].score() > 0.85 and not label_mix["mixed"].is_sorted()
    assert label_mix["kept"].score() < 0.4 and label_mix["kept"].is_sorted()
    assert verify_split(mixed).warnings == []
    (warning,) = verify_split(kept).warnings
    assert (f"{kept}: shards sorted by label (1.0 distinct labels per shard where a random order gives "
            f"{random_order:.1f})") in warning


def test_the_order_depends_on_the_seed_and_the_keys_only(tmp_path):
    """The same inputs listed in another order give byte-identical shards; another seed, other shards."""
    src = _class_folders(tmp_path / "raw", classes=3, per_class=8)
    rows = [(p.relative_to(src).as_posix(), p.parent.name) for p in sorted(src.rglob("*.wav"))]
    for name, ordered in (("sorted.csv", rows), ("reversed.csv", rows[::-1])):
        with open(src / name, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *ordered])
    for name in ("sorted", "reversed"):
        build(src / f"{name}.csv", tmp_path / name, workers=1, shard_samples=5, progress=False)
    build(src / "sorted.csv", tmp_path / "seed1", workers=1, shard_samples=5, seed=1, progress=False)
    shas = {name: [s.sha256 for s in DatasetManifest.load(tmp_path / name / "train").shards]
            for name in ("sorted", "reversed", "seed1")}
    assert shas["sorted"] == shas["reversed"] and shas["seed1"] != shas["sorted"]
    assert DatasetManifest.load(tmp_path / "seed1" / "train").build.seed == 1


def test_segments_of_a_long_recording_are_spread_over_the_shards(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    sf.write(src / "long.wav", np.random.default_rng(0).uniform(-.3, .3, 16000 * 8).astype(np.float32), 16000)
    for i in range(32):
        sf.write(src / f"short{i:02d}.wav", np.random.default_rng(i + 1).uniform(-.3, .3, 800).astype(np.float32),
                 16000)

    def segments_per_shard(**order) -> list[int]:
        out = tmp_path / f"out{len(order)}"
        build(src, out, workers=1, shard_samples=8, segment_seconds=1.0, progress=False, **order)
        return [sum(s.key.startswith("long__seg") for s in iter_shard(p))
                for p in DatasetManifest.load(out / "train").shard_paths(out / "train")]

    assert segments_per_shard(keep_order=True) == [8, 0, 0, 0, 0]  # one shard is the whole recording
    mixed = segments_per_shard()
    assert sum(mixed) == 8 and len(mixed) == 5 and max(mixed) <= 4 and sum(n > 0 for n in mixed) >= 3, mixed


def test_expected_distinct_matches_enumeration():
    sizes, n = [3, 1, 2], 3
    items = [g for g, size in enumerate(sizes) for _ in range(size)]
    draws = list(itertools.combinations(items, n))
    assert expected_distinct(sizes, n) == pytest.approx(np.mean([len(set(d)) for d in draws]))
    assert expected_distinct([5, 5], 10) == 2 and expected_distinct([4], 2) == 1


def test_the_cli_takes_keep_order_and_seed_and_reports_the_mix(tmp_path):
    src = _class_folders(tmp_path / "raw", classes=4, per_class=6)
    out = tmp_path / "out"
    subprocess.run([str(CLI), "build", str(src), str(out), "--labels-from-dirs", "--shard-samples", "6",
                    "--keep-order", "--quiet"], check=True, capture_output=True)
    assert DatasetManifest.load(out / "train").build.order == "source"
    proc = subprocess.run([str(CLI), "verify", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "train: WARNING" in proc.stderr and "shards sorted by label" in proc.stderr
    stats = subprocess.run([str(CLI), "stats", str(out)], capture_output=True, text=True, check=True).stdout
    assert "labels per shard: 1.0 distinct" in stats and "sorted: `unfused-shards build` without --keep-order" in stats

    subprocess.run([str(CLI), "build", str(src), str(out), "--labels-from-dirs", "--shard-samples", "6", "--seed", "3",
                    "--quiet"], check=True, capture_output=True)
    assert (DatasetManifest.load(out / "train").build.order, DatasetManifest.load(out / "train").build.seed) == \
        ("shuffled", 3)
    proc = subprocess.run([str(CLI), "verify", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr
    stats = subprocess.run([str(CLI), "stats", str(out)], capture_output=True, text=True, check=True).stdout
    assert "labels per shard:" in stats and "(1.0" not in stats.split("labels per shard:")[1].split("\n")[0]

"""The `ci` demo corpora: manifests, splits, audio and idempotence (python -m shards_tools.datasets ci)."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf

from shards_tools.datasets import common, debs, kws
from shards_tools.datasets.__main__ import build_task

REPO = Path(__file__).resolve().parents[1]
TASKS = ("kws", "langid", "instrument", "pool")
LABELLED = ("kws", "langid", "instrument")

_missing = [t for t in ("espeak-ng", "flite", "sox", "apt-get") if shutil.which(t) is None]
if importlib.util.find_spec("tinysoundfont") is None:
    _missing.append("tinysoundfont")
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"missing {_missing}: run scripts/setup.sh")


def _run(out: Path) -> subprocess.CompletedProcess:
    # The default cache (or $UNFUSED_SOURCES_CACHE) is shared across runs, so packages download once.
    cmd = [sys.executable, "-m", "shards_tools.datasets", "ci", "--out", str(out), "--workers", "2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="session")
def ci_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datasets") / "ci"
    _run(out)
    return out


def _rows(ci_dir: Path, task: str) -> list[dict]:
    return common.read_manifest(ci_dir / task / "manifest.csv")


def _by_split(rows: list[dict], key: str) -> dict[str, set]:
    out = defaultdict(set)
    for r in rows:
        out[r["split"]].add(r[key])
    return out


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", TASKS)
def test_manifest_header_and_columns(ci_dir, task):
    with open(ci_dir / task / "manifest.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:4] == ["path", "label", "split", "source"]
    rows = _rows(ci_dir, task)
    assert rows
    for r in rows:
        assert r["split"] in common.SPLITS
        assert r["source"], r
        if task == "pool":
            assert r["split"] == "train" and r["label"] == ""
        else:
            assert r["label"]


@pytest.mark.parametrize("task", TASKS)
def test_every_path_exists_and_decodes(ci_dir, task):
    for r in _rows(ci_dir, task):
        assert not os.path.isabs(r["path"]), r["path"]
        info = sf.info(str(ci_dir / task / r["path"]))
        assert info.frames > 0 and info.samplerate in (8000, 16000)


@pytest.mark.parametrize("task", LABELLED)
def test_every_label_in_every_split(ci_dir, task):
    labels = _by_split(_rows(ci_dir, task), "label")
    assert set(labels) == set(common.SPLITS)
    assert labels["val"] == labels["train"] and labels["test"] == labels["train"]
    expected = {"kws": 35, "langid": 5, "instrument": 11}[task]
    assert len(labels["train"]) == expected


def test_kws_split_by_voice_and_one_second(ci_dir):
    rows = _rows(ci_dir, "kws")
    voices = _by_split(rows, "voice")
    assert not (voices["train"] & voices["val"] or voices["train"] & voices["test"] or voices["val"] & voices["test"])
    assert {r["label"] for r in rows} == set(kws.WORDS)
    for r in rows[:20]:
        info = sf.info(str(ci_dir / "kws" / r["path"]))
        assert (info.samplerate, info.frames) == (16000, 16000)


def test_langid_split_by_prompt(ci_dir):
    prompts = _by_split(_rows(ci_dir, "langid"), "prompt")
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])


def test_instrument_test_soundfont_unseen(ci_dir):
    fonts = _by_split(_rows(ci_dir, "instrument"), "soundfont")
    assert len(fonts["test"]) == 1 and not fonts["test"] & (fonts["train"] | fonts["val"])


def test_pool_segments_and_task_references(ci_dir):
    cfg = common.SIZES["ci"]
    rows = _rows(ci_dir, "pool")
    music = [r for r in rows if r["task"] == "music"]
    assert len(music) >= 20
    assert {r["source"] for r in music} == set(cfg["pool_seconds"])
    for r in music:
        info = sf.info(str(ci_dir / "pool" / r["path"]))
        assert info.frames == int(cfg["segment_seconds"] * info.samplerate)
    for task in LABELLED:  # exactly the train split of each task, referenced by relative path
        want = {os.path.normpath(f"../{task}/{r['path']}") for r in _rows(ci_dir, task) if r["split"] == "train"}
        got = {os.path.normpath(r["path"]) for r in rows if r["task"] == task}
        assert got == want


def test_sources_and_licences(ci_dir):
    text = (ci_dir / "SOURCES.md").read_text()
    for task in TASKS:
        for src in {r["source"] for r in _rows(ci_dir, task)}:
            assert src in text
    assert (debs.DEFAULT_CACHE / "planetblupi-music-ogg" / "copyright").is_file()


def test_second_run_is_noop(ci_dir):
    before = _snapshot(ci_dir)
    res = _run(ci_dir)
    assert res.stdout.count("up to date") == len(TASKS)
    assert _snapshot(ci_dir) == before


def test_rebuild_is_deterministic(ci_dir, tmp_path):
    """A fresh build (one worker instead of two) gives byte-identical audio and manifest."""
    build_task("kws", kws, tmp_path, "ci", debs.DEFAULT_CACHE, workers=1)

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".done"}

    assert digest(tmp_path / "kws") == digest(ci_dir / "kws")


def test_rank_split_fractions():
    ids = [f"voice{i}" for i in range(100)]
    split = common.rank_split(ids, 0.15, 0.15, salt="t")
    assert [sum(s == k for s in split.values()) for k in common.SPLITS] == [70, 15, 15]
    assert split == common.rank_split(reversed(ids), 0.15, 0.15, salt="t")  # order-free
    small = common.rank_split(["a", "b", "c", "d"], 0.15, 0.15)
    assert sorted(small.values()) == ["test", "train", "train", "val"]

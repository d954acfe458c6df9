"""`unfused-shards merge` and JSONL sources, end to end on tiny generated audio files."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards_tools.build import build
from shards_tools.merge import MergeError, merge
from shards_tools.sources import SourceError, read_source
from unfused_dist.data.manifest import DatasetManifest

CLI = Path(sys.executable).parent / "unfused-shards"  # the venv running the tests

# (relative path, label, split): A and B share no file names, so their keys are disjoint
A_FILES = [("a/x1.wav", "cat", "train"), ("a/x2.wav", "dog", "train"), ("a/x3.wav", "cat", "train"),
           ("a/v1.wav", "cat", "val")]
B_FILES = [("b/y1.wav", "bird", "train"), ("b/y2.wav", "bird", "train"), ("b/t1.wav", "dog", "test")]


def _corpus(root: Path, files: list[tuple[str, str, str]]) -> Path:
    """Short tones (distinct pitch per file) + a path,label,split CSV; returns the CSV."""
    for i, (rel, _, _) in enumerate(files):
        t = np.arange(int(8000 * (0.2 + 0.05 * i))) / 8000
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), 8000)
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *files])
    return root / "manifest.csv"


def _build(tmp_path: Path, name: str, files: list[tuple[str, str, str]], **kw) -> Path:
    out = tmp_path / name
    build(_corpus(tmp_path / f"src_{name}", files), out, workers=1, shard_samples=2, progress=False, **kw)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def a_b(tmp_path: Path) -> tuple[Path, Path]:
    return _build(tmp_path, "A", A_FILES), _build(tmp_path, "B", B_FILES)


def test_merge_copies_shards_and_sums_manifests(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = a_b
    out = tmp_path / "out"
    r = _cli("merge", a, b, out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]

    train = DatasetManifest.load(out / "train")
    parts = [DatasetManifest.load(a / "train"), DatasetManifest.load(b / "train")]
    assert train.num_samples == 5 == sum(m.num_samples for m in parts)
    assert train.total_seconds == pytest.approx(sum(m.total_seconds for m in parts))
    # A's 2 shards then B's 1, renumbered; each copy is byte-identical to its input shard
    originals = [(d / "train", s) for d, m in zip((a, b), parts) for s in m.shards]
    assert [s.name for s in train.shards] == ["audio-000000.tar", "audio-000001.tar", "audio-000002.tar"]
    assert sorted(p.name for p in (out / "train").glob("audio-*.tar")) == [s.name for s in train.shards]
    for merged, (src_dir, orig) in zip(train.shards, originals):
        assert merged.sha256 == orig.sha256 == _sha(out / "train" / merged.name) == _sha(src_dir / orig.name)
        assert (merged.num_samples, merged.first_key, merged.last_key) == (
            orig.num_samples, orig.first_key, orig.last_key)

    # one vocabulary for all splits, including labels only one input has
    for split in ("train", "val", "test"):
        assert DatasetManifest.load(out / split).labels == ["bird", "cat", "dog"]
    assert DatasetManifest.load(out / "val").num_samples == 1
    assert DatasetManifest.load(out / "test").num_samples == 1
    assert str(a.resolve()) in train.build.source and str(b.resolve()) in train.build.source
    assert train.build.command.startswith("unfused-shards merge") and train.build.rejected == 0

    r = _cli("verify", out)
    assert r.returncode == 0 and r.stdout.count(": OK ") == 3, r.stderr


def test_merge_single_split_dirs_and_overwrite(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = a_b
    out = tmp_path / "out"
    (summary,) = merge([a / "train", b / "train"], out)
    assert (summary.split, summary.clips, summary.shards) == ("train", 5, 3)
    r = _cli("merge", a / "val", b / "test", out)
    assert r.returncode == 2 and "already holds a dataset" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("merge", "--overwrite", b / "train", a / "train", out)
    assert r.returncode == 0, r.stderr
    m = DatasetManifest.load(out / "train")
    assert m.shards[0].sha256 == DatasetManifest.load(b / "train").shards[0].sha256
    assert _cli("verify", out).returncode == 0


def test_merge_refuses_duplicate_keys(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = a_b
    copy = tmp_path / "A_copy"
    shutil.copytree(a, copy)
    out = tmp_path / "out"
    r = _cli("merge", a, copy, out)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "a__x1" in line and str(a) in line and str(copy) in line
    assert not out.exists()  # refused before writing anything


def test_merge_refuses_different_sample_rate(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = a_b
    c = _build(tmp_path, "C", [("c/z1.wav", "cat", "train")], sample_rate=8000)
    r = _cli("merge", a, c, tmp_path / "out")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "sample rate" in line and str(a) in line and str(c) in line
    with pytest.raises(MergeError, match="sample rate"):
        merge([c, a], tmp_path / "out")


def test_merge_refuses_missing_input(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    r = _cli("merge", a_b[0], tmp_path / "nothing", tmp_path / "out")
    assert r.returncode == 2 and "nothing" in r.stderr


def test_jsonl_build_equals_csv_build(tmp_path: Path) -> None:
    csv_path = _corpus(tmp_path / "src", A_FILES + B_FILES)
    # both path spellings (NeMo's extra fields ignored); same relative paths, so same sample JSON too
    rows = [{"audio_filepath" if i % 2 else "path": rel, "label": label, "split": split, "duration": 0.2}
            for i, (rel, label, split) in enumerate(A_FILES + B_FILES)]
    jsonl = csv_path.parent / "manifest.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    build(csv_path, tmp_path / "from_csv", workers=1, shard_samples=2, progress=False)
    build(jsonl, tmp_path / "from_jsonl", workers=1, shard_samples=2, progress=False)
    for split in ("train", "val", "test"):
        c = DatasetManifest.load(tmp_path / "from_csv" / split)
        j = DatasetManifest.load(tmp_path / "from_jsonl" / split)
        assert [(s.first_key, s.last_key, s.sha256) for s in j.shards] == [
            (s.first_key, s.last_key, s.sha256) for s in c.shards]
        assert j.labels == c.labels == ["bird", "cat", "dog"]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"label": "cat"}', "no path field"),
    ('{"path": "a.wav", "label": 3}', "'label' must be a string"),
    ('{"path": "a.wav", "split": "../x"}', "not a valid folder name"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"path": "ok.wav"}\n\n' + line + "\n")
    with pytest.raises(SourceError, match=rf"m\.jsonl:3: .*{re.escape(problem)}"):
        read_source(jsonl)
    r = _cli("build", jsonl, tmp_path / "out")
    assert r.returncode == 2 and "m.jsonl:3: " in r.stderr and problem in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_overwrite_drops_the_old_builds_rejections(tmp_path: Path) -> None:
    # OUT first holds a build with a rejected input: OUT/rejected.jsonl and OUT/train/rejected.jsonl
    out = _build(tmp_path, "out", A_FILES[:2] + [("a/gone.wav", "cat", "train")])
    (tmp_path / "src_out" / "a" / "gone.wav").unlink()
    build(tmp_path / "src_out" / "manifest.csv", out, workers=1, shard_samples=2, progress=False)
    assert (out / "rejected.jsonl").is_file() and (out / "train" / "rejected.jsonl").is_file()
    (out / "train" / "notes.txt").write_text("the user's")
    a, b = _build(tmp_path, "A", A_FILES), _build(tmp_path, "B", B_FILES)

    merge([a, b], out, overwrite=True)
    assert not (out / "rejected.jsonl").exists()
    assert not any(out.rglob("rejected.jsonl"))
    assert (out / "train" / "notes.txt").read_text() == "the user's"  # not ours to delete
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]  # no staging folder left
    assert _cli("verify", out).returncode == 0


def test_merge_checks_input_shards_before_touching_out(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = a_b
    out = tmp_path / "out"
    merge([a, b], out)
    before = _snapshot(out)
    shard = b / "train" / DatasetManifest.load(b / "train").shards[0].name
    data = bytearray(shard.read_bytes())
    data[-1] = 1  # end-of-archive padding: the tar still reads, only its sha256 differs
    shard.write_bytes(bytes(data))

    r = _cli("merge", "--overwrite", a, b, out)
    assert _snapshot(out) == before  # OUT untouched: old manifests and shards all there
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{shard} no longer matches its manifest (sha256)" in r.stderr and f"delete {shard}" in r.stderr
    assert _cli("verify", out).returncode == 0


def test_a_merge_failing_midway_leaves_out_as_it_was(a_b: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shards_tools.merge as merge_module

    a, b = a_b
    out = tmp_path / "out"
    merge([a, b], out)
    before = _snapshot(out)
    real_copy, calls = shutil.copyfile, []

    def copy_then_fail(src, dst):
        calls.append(src)
        if len(calls) == 4:  # the fourth shard: the first split already complete in staging
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(merge_module.shutil, "copyfile", copy_then_fail)
    with pytest.raises(MergeError, match=r"No space left on device.*nothing in .* was changed"):
        merge([b, a], out, overwrite=True)
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    calls.clear()
    with pytest.raises(MergeError, match="No space left"):
        merge([b, a], tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # created for this merge, so removed with it


def test_merge_orders_integer_labels_as_the_builder_does(tmp_path: Path) -> None:
    a = _build(tmp_path, "A", [("a/x1.wav", "2", "train"), ("a/x2.wav", "10", "train")])
    b = _build(tmp_path, "B", [("b/y1.wav", "3", "train")])
    assert DatasetManifest.load(a / "train").labels == ["2", "10"]
    merge([a, b], tmp_path / "out")
    assert DatasetManifest.load(tmp_path / "out" / "train").labels == ["2", "3", "10"]  # not '10' < '2'


def test_merge_overwrite_refuses_an_out_with_splits_the_inputs_lack(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = a_b
    out = tmp_path / "out"
    merge([a, b], out)
    shutil.copytree(out / "test", out / "dev")  # a split of the old dataset that this merge would not replace
    _edit = json.loads((out / "dev/manifest.json").read_text())
    _edit["split"] = "dev"
    (out / "dev/manifest.json").write_text(json.dumps(_edit))
    with pytest.raises(MergeError, match=r"holds split\(s\) dev that the inputs do not have"):
        merge([a, b], out, overwrite=True)


def test_merge_refuses_to_clear_a_split_parked_by_a_stopped_swap(a_b: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = a_b
    out = tmp_path / "out"
    merge([a, b], out)
    parked = out / ".merge-staging" / "train.old"  # as a merge killed between its two renames leaves it
    shutil.copytree(out / "train", parked)
    with pytest.raises(MergeError, match=r"holds train.old, left by a merge stopped while swapping"):
        merge([a, b], out, overwrite=True)
    assert (parked / "manifest.json").is_file()

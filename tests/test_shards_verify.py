"""`unfused-shards verify`: damage to a manifest, its folder or its label shards is caught, and every error says
what repairs it (delete the damaged shard, re-run the same build)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards_tools.build import build
from shards_tools.verify import VerifyError, verify, verify_split
from unfused_dist.cluster.labels import write_label_shards
from unfused_dist.data.source import label_shard_name
from unfused_dist.data.manifest import DatasetManifest
from unfused_dist.data.shards import iter_shard

CLI = Path(sys.executable).parent / "unfused-shards"  # the venv running the tests
REDO = "re-run the same `unfused-shards build` command"


def _edit_manifest(split_dir: Path, **changes) -> None:
    path = split_dir / "manifest.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _touch_padding(shard: Path) -> None:
    """Change one byte of the tar's end-of-archive padding: the shard still reads, only its sha256 differs."""
    data = bytearray(shard.read_bytes())
    assert data[-1] == 0
    data[-1] = 1
    shard.write_bytes(bytes(data))


def _only_error(path: Path) -> str:
    _, errors = verify(path)
    assert len(errors) == 1, errors
    return errors[0]


def test_a_split_with_shards_but_no_manifest_is_incomplete(tone_dataset: Path) -> None:
    (tone_dataset / "val" / "manifest.json").unlink()  # what a build killed before its last step leaves
    reports, errors = verify(tone_dataset)
    assert sorted(r.split for r in reports) == ["test", "train"]
    assert len(errors) == 1 and errors[0].startswith("val: ERROR ")
    assert "no manifest.json" in errors[0] and "incomplete" in errors[0] and REDO in errors[0]
    # the split dir itself, too: an error line, not "no dataset here"
    assert _only_error(tone_dataset / "val").startswith("val: ERROR ")
    # a folder of unrelated things is still no dataset
    (tone_dataset / "notes").mkdir()
    assert len(verify(tone_dataset)[1]) == 1


@pytest.mark.parametrize("field, delta", [("total_seconds", 5.0), ("num_samples", 1)])
def test_manifest_totals_must_be_the_sum_over_its_shards(tone_dataset: Path, field: str, delta) -> None:
    split = tone_dataset / "train"
    _edit_manifest(split, **{field: getattr(DatasetManifest.load(split), field) + delta})
    with pytest.raises(VerifyError, match=rf"manifest.json: {field} .* but its shards list .*{REDO}"):
        verify_split(split)


def test_labels_must_be_in_the_builders_order(tone_dataset: Path) -> None:
    split = tone_dataset / "train"
    labels = DatasetManifest.load(split).labels
    assert labels == ["high", "low", "mid"]
    _edit_manifest(split, labels=labels[::-1])  # every sample would get another class id
    with pytest.raises(VerifyError, match=r"labels are not in the builder's order"):
        verify_split(split)
    _edit_manifest(split, labels=[*labels, "high"])
    with pytest.raises(VerifyError, match=r"labels are not in the builder's order"):
        verify_split(split)
    _edit_manifest(split, labels=labels)
    verify_split(split)


def test_integer_labels_may_be_sorted_as_text_or_as_numbers(tmp_path: Path) -> None:
    import csv

    import soundfile as sf

    rows = []
    for i, label in enumerate(["2", "10", "2", "10"]):
        sf.write(tmp_path / f"c{i}.wav", (0.1 * np.sin(np.arange(1600) * (0.1 + i / 10))).astype("float32"), 16000)
        rows.append((f"c{i}.wav", label, "train"))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    build(tmp_path / "m.csv", tmp_path / "out", workers=1, progress=False)
    split = tmp_path / "out" / "train"
    for order in (["10", "2"], ["2", "10"]):  # the builder's sort, before and after numeric ordering
        _edit_manifest(split, labels=order)
        verify_split(split)


def test_the_manifest_split_is_its_folders_name(tone_dataset: Path) -> None:
    (tone_dataset / "test").rename(tone_dataset / "holdout")
    line = _only_error(tone_dataset)
    assert line.startswith("holdout: ERROR ") and "split 'test' but its folder is 'holdout'" in line
    _edit_manifest(tone_dataset / "val", split="train")
    with pytest.raises(VerifyError, match=r"says split 'train' but its folder is 'val'"):
        verify_split(tone_dataset / "val")


def test_a_label_shard_without_an_audio_shard_is_an_error(tone_dataset: Path) -> None:
    split = tone_dataset / "train"
    keys = [s.key for sh in DatasetManifest.load(split).shards for s in iter_shard(split / sh.name)]
    labels = split / "labels" / "run1"
    write_label_shards(split, labels, keys, np.arange(len(keys)) % 3, np.zeros(len(keys)))
    verify_split(split)
    first = labels / label_shard_name(DatasetManifest.load(split).shards[0].name)
    shutil.copyfile(first, labels / "labels-000099.tar")
    with pytest.raises(VerifyError, match=r"labels-000099.tar: label shard for no audio shard"):
        verify_split(split)


def test_every_sample_label_is_in_the_vocabulary(tone_dataset: Path) -> None:
    split = tone_dataset / "train"
    _edit_manifest(split, labels=None)  # the samples still carry "low", "mid", "high"
    with pytest.raises(VerifyError, match=r"has label '(low|mid|high)' but the manifest has no labels"):
        verify_split(split)
    _edit_manifest(split, labels=["high", "low"])
    with pytest.raises(VerifyError, match=r"label 'mid' is not in the manifest's labels"):
        verify_split(split)


def _truncate(shard: Path, corrupt_audio, append_member) -> None:
    shard.write_bytes(shard.read_bytes()[:3000])


def _foreign(shard: Path, corrupt_audio, append_member) -> None:
    append_member(shard, "x.pickle", b"\x80\x04.")


def _bad_audio(shard: Path, corrupt_audio, append_member) -> None:
    corrupt_audio(shard, 0)


def _sha_only(shard: Path, corrupt_audio, append_member) -> None:
    _touch_padding(shard)


@pytest.mark.parametrize("damage", [_truncate, _foreign, _bad_audio, _sha_only])
def test_a_damaged_shard_error_says_delete_it_and_rerun_the_build(tone_dataset: Path, damage, corrupt_audio,
                                                                  append_member) -> None:
    split = tone_dataset / "train"
    shard = split / DatasetManifest.load(split).shards[1].name
    damage(shard, corrupt_audio, append_member)
    line = _only_error(tone_dataset)
    assert line.startswith(f"train: ERROR {shard.name}: ")
    assert f"delete {shard} and {REDO}" in line and "rewrites only missing shards" in line
    assert "rebuild the split" not in line  # a plain re-run keeps a damaged shard of unchanged size


def test_a_missing_shard_error_says_rerun_the_build(tone_dataset: Path) -> None:
    split = tone_dataset / "val"
    (split / DatasetManifest.load(split).shards[0].name).unlink()
    line = _only_error(tone_dataset)
    assert "missing from" in line and REDO in line and "delete" not in line


def test_the_repair_the_error_names_works(tmp_path: Path) -> None:
    """End to end with the CLI: the message names the shard and the recorded command; following it repairs
    the split, while re-running the build without deleting the shard does not."""
    from conftest import write_tone_corpus

    csv_path = write_tone_corpus(tmp_path / "src", n_per_class=3)
    out = tmp_path / "out"
    command = [str(CLI), "build", str(csv_path), str(out), "--workers", "1", "--shard-samples", "2", "--quiet"]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    shard = out / "train" / DatasetManifest.load(out / "train").shards[0].name
    _touch_padding(shard)

    r = subprocess.run([str(CLI), "verify", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"delete {shard} and {REDO} (`unfused-shards build {csv_path} {out}" in r.stderr

    subprocess.run(command, capture_output=True, timeout=300)  # what "rebuild the split" used to suggest
    assert _only_error(out).startswith(f"train: ERROR {shard.name}: sha256")
    shard.unlink()
    subprocess.run(command, capture_output=True, timeout=300)
    reports, errors = verify(out)
    assert errors == [] and len(reports) == 3


def test_splits_of_one_dataset_share_one_vocabulary(tone_dataset: Path) -> None:
    assert verify(tone_dataset)[1] == []
    _edit_manifest(tone_dataset / "test", labels=["high", "low"])  # test's class 1 would be train's "low"...
    _, errors = verify(tone_dataset)
    assert any(e.startswith("test: ERROR") and "labels differ from" in e and "class ids differ" in e
               for e in errors), errors


def test_one_unreadable_manifest_is_one_error_line_the_other_splits_still_verified(tone_dataset: Path) -> None:
    (tone_dataset / "test/manifest.json").write_text("{not json")
    reports, errors = verify(tone_dataset)
    assert sorted(r.split for r in reports) == ["train", "val"]
    assert len(errors) == 1 and errors[0].startswith("test: ERROR")


def test_a_split_folder_reached_through_a_symlink_keeps_its_name(tone_dataset: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "store" / "train_v2"
    elsewhere.parent.mkdir()
    shutil.move(tone_dataset / "train", elsewhere)
    (tone_dataset / "train").symlink_to(elsewhere)
    verify_split(tone_dataset / "train")


def test_a_shard_entry_of_the_wrong_type_is_a_one_line_error(tone_dataset: Path) -> None:
    raw = json.loads((tone_dataset / "train/manifest.json").read_text())
    raw["shards"][0]["num_samples"] = "x"
    (tone_dataset / "train/manifest.json").write_text(json.dumps(raw))
    r = subprocess.run([str(CLI), "verify", str(tone_dataset)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "train: ERROR" in r.stderr and "has a field of the wrong type" in r.stderr

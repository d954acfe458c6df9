"""Builder at corpus scale: every kind of bad input is rejected (never dropped), an interrupted or killed
build resumes writing only what is missing, long recordings are cut into segments, and shards can hold
FLAC or WAV."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards_tools.build import RECORDS_DIR, REJECTED_NAME, build
from shards_tools.sources import SourceError
from shards_tools.verify import verify_split
from unfused_dist.data.manifest import DatasetManifest
from unfused_dist.data.shards import iter_shard

CLI = Path(sys.executable).parent / "unfused-shards"


def _noise(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(sr * seconds))).astype(np.float32)


def _good_corpus(root: Path, n: int, seconds: float = 0.5) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"g{i:03d}.wav" for i in range(n)]
    for i, name in enumerate(names):
        sf.write(root / name, _noise(seconds, 22050, i), 22050)
    return names


def _bad_inputs(root: Path) -> dict[str, str]:
    """Every bad kind the issue names -> the start of the reason it must be rejected with."""
    good = root / "g000.wav"
    wav = good.read_bytes()
    sf.write(root / "full.flac", _noise(1.0), 16000)
    flac = (root / "full.flac").read_bytes()
    (root / "full.flac").unlink()
    (root / "trunc_wav.wav").write_bytes(wav[: len(wav) // 2])
    (root / "trunc_flac.flac").write_bytes(flac[: len(flac) // 2])
    (root / "zero_length.wav").write_bytes(b"")
    sf.write(root / "zero_frames.wav", np.zeros(0, np.float32), 16000)
    (root / "not_audio.wav").write_text("just some text, not audio\n" * 20)
    codec = bytearray(wav)
    codec[20:22] = struct.pack("<H", 0x1234)  # an unknown WAVE format tag
    (root / "bad_codec.wav").write_bytes(bytes(codec))
    x = _noise(0.5)
    x[100] = np.nan
    sf.write(root / "nan.wav", x, 16000, subtype="FLOAT")
    x[100] = np.inf
    sf.write(root / "inf.wav", x, 16000, subtype="FLOAT")
    sf.write(root / "full.aiff", _noise(1.0), 16000)
    aiff = (root / "full.aiff").read_bytes()
    (root / "full.aiff").unlink()
    (root / "trunc_aiff.aiff").write_bytes(aiff[: len(aiff) // 2])  # libsndfile reads it without a word
    (root / "a_directory.wav").mkdir()
    (root / "dangling.wav").symlink_to(root / "nowhere.wav")
    (root / "dup").mkdir()
    sf.write(root / "dup/k.wav", _noise(0.5), 16000)  # key dup__k; good (first in path order)
    sf.write(root / "dup__k.wav", _noise(0.5), 16000)  # the same key: rejected
    return {"trunc_wav.wav": "truncated", "trunc_flac.flac": "corrupt", "trunc_aiff.aiff": "truncated", "zero_length.wav": "empty file",
            "zero_frames.wav": "zero-length audio", "not_audio.wav": "undecodable", "bad_codec.wav": "undecodable",
            "nan.wav": "NaN or inf", "inf.wav": "NaN or inf", "a_directory.wav": "unreadable",
            "dangling.wav": "missing file", "dup__k.wav": "duplicate key dup__k"}


def test_every_bad_kind_goes_to_rejected_jsonl_and_every_good_file_to_the_shards(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    good = _good_corpus(src, 6)
    bad = _bad_inputs(src)
    listing = src / "files.csv"  # a CSV can name a folder as a file, which a folder scan would not
    listing.write_text("files\n" + "".join(f"{name}\n" for name in [*good, "dup/k.wav", *bad]))
    r = subprocess.run([str(CLI), "build", str(listing), str(tmp_path / "out"), "--workers", "2", "--shard-samples", "4",
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    assert f"{len(bad)} rejected" in r.stdout and str(tmp_path / "out" / REJECTED_NAME) in r.stderr
    split = tmp_path / "out/train"
    rejected = {j["path"]: j["reason"] for j in map(json.loads, (split / REJECTED_NAME).read_text().splitlines())}
    assert set(rejected) == set(bad)
    # OUT/rejected.jsonl: the same lines, for every split of the build
    assert (tmp_path / "out" / REJECTED_NAME).read_text() == (split / REJECTED_NAME).read_text()
    for path, reason in bad.items():
        assert rejected[path].startswith(reason), (path, rejected[path])
    keys = [s.key for shard in DatasetManifest.load(split).shard_paths(split) for s in iter_shard(shard)]
    expected_good = {Path(g).stem for g in good} | {"dup__k"}
    assert set(keys) == expected_good and len(keys) == len(expected_good)
    assert DatasetManifest.load(split).build.rejected == len(bad)
    verify_split(split)


def test_out_rejected_jsonl_lists_every_splits_rejections_and_goes_once_none_are_left(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    good = _good_corpus(src, 4)
    (src / "junk.wav").write_bytes(b"not audio")
    rows = [f"{good[0]},a,train", f"{good[1]},b,train", f"{good[2]},a,val", f"{good[3]},b,val",
            "junk.wav,a,train", "gone.wav,b,val"]
    listing = src / "list.csv"
    listing.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert [s.rejected for s in build(listing, out, workers=1, progress=False)] == [1, 1]
    lines = [json.loads(line) for line in (out / REJECTED_NAME).read_text().splitlines()]
    assert [(r["path"], r["split"]) for r in lines] == [("junk.wav", "train"), ("gone.wav", "val")]
    assert lines[0]["reason"].startswith("undecodable") and lines[1]["reason"] == "missing file"

    listing.write_text("path,label,split\n" + "\n".join(rows[:4]) + "\n")
    build(listing, out, workers=1, progress=False)
    assert not (out / REJECTED_NAME).exists() and not (out / "train" / REJECTED_NAME).exists()


def _records_mtimes(split: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in split.glob("audio-*.tar")}


def test_a_build_run_again_writes_only_missing_or_changed_shards(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _good_corpus(src, 12)
    out = tmp_path / "out"
    first = build(src, out, workers=2, shard_samples=3, keep_order=True, progress=False)[0]  # shards by position
    split = out / "train"
    shas = [s.sha256 for s in DatasetManifest.load(split).shards]
    before = _records_mtimes(split)

    (split / "audio-000002.tar").unlink()  # lost
    sf.write(src / "g010.wav", _noise(0.5, 22050, 99), 22050)  # changed: its shard (3) must be redone
    again = build(src, out, workers=2, shard_samples=3, keep_order=True, progress=False)[0]
    after = _records_mtimes(split)
    assert (first.reused, again.reused) == (0, 2)
    assert {n for n in after if after[n] != before.get(n)} == {"audio-000002.tar", "audio-000003.tar"}
    new = [s.sha256 for s in DatasetManifest.load(split).shards]
    assert new[:3] == shas[:3] and new[3] != shas[3]
    verify_split(split)

    # a different plan (shard size) rebuilds everything and leaves no stale shard or record behind
    build(src, out, workers=1, shard_samples=5, progress=False)
    assert sorted(p.name for p in split.glob("audio-*.tar")) == [f"audio-00000{i}.tar" for i in range(3)]
    assert sorted(p.name for p in (split / RECORDS_DIR).glob("*.json")) == [f"audio-00000{i}.tar.json"
                                                                          for i in range(3)]


def test_a_killed_build_resumes_and_ends_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _good_corpus(src, 40, seconds=1.0)
    out, clean = tmp_path / "out", tmp_path / "clean"
    build(src, clean, workers=1, shard_samples=2, progress=False)
    records = out / "train" / RECORDS_DIR
    proc = subprocess.Popen([str(CLI), "build", str(src), str(out), "--workers", "2", "--shard-samples", "2",
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (records.is_dir() and any(records.glob("audio-*.json"))):  # wait for a finished shard
            assert proc.poll() is None and time.monotonic() < deadline, "build ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train/manifest.json").exists()  # the split is visibly incomplete
    done_before = {p.name.removesuffix(".json") for p in records.glob("audio-*.json")}
    assert 0 < len(done_before) < 20

    summary = build(src, out, workers=2, shard_samples=2, progress=False)[0]
    assert summary.reused >= len(done_before) and summary.shards == 20
    assert [s.sha256 for s in DatasetManifest.load(out / "train").shards] == \
        [s.sha256 for s in DatasetManifest.load(clean / "train").shards]
    assert not list((out / "train").glob(".*.tmp"))
    verify_split(out / "train")


def test_a_second_build_into_the_same_split_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _good_corpus(src, 2)
    (tmp_path / "out/train" / RECORDS_DIR).mkdir(parents=True)
    with open(tmp_path / "out/train" / RECORDS_DIR / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SourceError, match="another `unfused-shards build` is writing"):
            build(src, tmp_path / "out", workers=1, progress=False)
    build(src, tmp_path / "out", workers=1, progress=False)  # released: fine


def test_long_recordings_are_cut_into_segments_and_nothing_is_dropped(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    sf.write(src / "long.flac", _noise(10.4, 44100, 1), 44100)  # 10.4 s -> 4 + 4 + 2.4
    sf.write(src / "tail.wav", _noise(9.5, 16000, 2), 16000)  # 9.5 s -> 4 + 5.5 (1.5 s tail < half joins)
    sf.write(src / "short.wav", _noise(3.0, 16000, 3), 16000)  # stays whole, own key
    sf.write(src / "cut.wav", _noise(20.0, 16000, 4), 16000)
    cut = (src / "cut.wav").read_bytes()
    (src / "cut.wav").write_bytes(cut[: len(cut) * 55 // 100])  # 11 s left, the header still promises 20 s
    summary = build(src, tmp_path / "out", workers=2, shard_samples=2, segment_seconds=4.0, progress=False)[0]
    split = tmp_path / "out/train"
    lines = [json.loads(line) for line in (split / REJECTED_NAME).read_text().splitlines()]
    assert summary.rejected == len(lines) == 1  # once for the file, not once per segment
    assert lines[0]["path"] == "cut.wav" and lines[0]["reason"].startswith("truncated")
    metas = [s.meta() for shard in DatasetManifest.load(split).shard_paths(split) for s in iter_shard(shard)]
    got = {m["id"]: (round(m["duration"], 3), round(m.get("offset", -1), 3)) for m in metas}
    assert got == {"long__seg00000": (4.0, 0.0), "long__seg00001": (4.0, 4.0), "long__seg00002": (2.4, 8.0),
                   "short": (3.0, -1), "tail__seg00000": (4.0, 0.0), "tail__seg00001": (5.5, 4.0)}
    verify_split(split)


def test_wav_codec_shards_verify_and_decode(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _good_corpus(src, 3)
    build(src, tmp_path / "out", workers=1, codec="wav", progress=False)
    split = tmp_path / "out/train"
    assert DatasetManifest.load(split).codec == "wav"
    samples = list(iter_shard(split / "audio-000000.tar"))
    assert set(samples[0].members) == {"wav", "json"} and samples[0].audio(16000).shape == (8000,)
    verify_split(split)


def _die_on(key: str):
    """An encode that kills its own worker process at `key`, as the OOM killer or a decoder crash would."""
    from shards_tools import build as build_module
    encode = build_module.encode_entry

    def encode_or_die(e, opts):
        if e.key == key:
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(e, opts)
    return encode_or_die


def test_a_worker_that_dies_stops_the_build_clearly_and_a_rerun_finishes_it(tmp_path: Path, monkeypatch) -> None:
    """multiprocessing.Pool waited for ever on a dead worker's shard."""
    from shards_tools import build as build_module
    from shards_tools.build import WorkerDied

    src = tmp_path / "raw"
    _good_corpus(src, 12)
    out = tmp_path / "out"
    monkeypatch.setattr(build_module, "encode_entry", _die_on("g005"))  # the workers fork with it
    with pytest.raises(WorkerDied, match="a worker process died while writing shards.*run the same command again"):
        build(src, out, workers=2, shard_samples=2, progress=False)
    assert not (out / "train/manifest.json").exists()
    monkeypatch.undo()
    summary = build(src, out, workers=2, shard_samples=2, progress=False)[0]
    assert summary.clips == 12 and summary.rejected == 0
    verify_split(out / "train")


def test_a_shard_with_a_file_refused_as_unreadable_is_written_again_by_the_next_run(tmp_path: Path) -> None:
    """A file refused for its permissions and then made readable keeps its size and mtime, so the shard's
    fingerprint is unchanged: the record as a permission error leaves it (the tests run as root, whom no
    permission stops) must not be reused."""
    src = tmp_path / "raw"
    _good_corpus(src, 3)
    split = tmp_path / "out/train"
    build(src, tmp_path / "out", workers=1, shard_samples=1, progress=False)
    record_path = split / RECORDS_DIR / "audio-000001.tar.json"
    record = json.loads(record_path.read_text())
    record.update(shard=None, size=0, rejected=[{"order": 1, "path": "g001.wav",
                                                 "reason": "unreadable: [Errno 13] Permission denied"}])
    record_path.write_text(json.dumps(record))
    (split / "audio-000001.tar").unlink()
    summary = build(src, tmp_path / "out", workers=1, shard_samples=1, progress=False)[0]
    assert (summary.reused, summary.clips, summary.rejected) == (2, 3, 0)
    verify_split(split)


def test_a_nul_in_a_manifest_path_rejects_that_row_only(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    good = _good_corpus(src, 2)
    listing = src / "list.csv"
    listing.write_text("files\n" + "".join(f"{n}\n" for n in good) + "bad\0name.wav\n")
    summary = build(listing, tmp_path / "out", workers=2, progress=False)[0]
    assert summary.clips == 2 and summary.rejected == 1
    line = json.loads((tmp_path / "out" / REJECTED_NAME).read_text())
    assert line["path"] == "bad\0name.wav" and "null" in line["reason"]


def test_out_must_be_a_folder_without_another_datasets_splits(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    good = _good_corpus(src, 4)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SourceError, match="a_file: exists and is not a folder"):
        build(src, tmp_path / "a_file", workers=1, progress=False)
    listing = src / "list.csv"
    listing.write_text("path,split\n" + "".join(f"{n},{s}\n" for n, s in zip(good, ["train", "train", "val", "test"])))
    out = tmp_path / "out"
    build(listing, out, workers=1, progress=False)
    with pytest.raises(SourceError, match="holds split\\(s\\) test, val that SRC does not have"):
        build(src, out, workers=1, progress=False)  # a folder source: train only
    assert (out / "val/manifest.json").exists()  # refused before anything was touched


def test_the_source_path_as_written_is_part_of_a_shards_fingerprint(tmp_path: Path) -> None:
    """Each sample's JSON records the path as the source wrote it: `./g000.wav` then `g000.wav` must give
    the shard a fresh build gives, not the old one kept."""
    src = tmp_path / "raw"
    good = _good_corpus(src, 2)
    listing = src / "list.csv"
    listing.write_text("files\n" + "".join(f"./{n}\n" for n in good))
    build(listing, tmp_path / "out", workers=1, progress=False)
    listing.write_text("files\n" + "".join(f"{n}\n" for n in good))
    assert build(listing, tmp_path / "out", workers=1, progress=False)[0].reused == 0
    build(listing, tmp_path / "fresh", workers=1, progress=False)
    assert (tmp_path / "out/train/audio-000000.tar").read_bytes() == (tmp_path / "fresh/train/audio-000000.tar").read_bytes()


@pytest.mark.parametrize("labels, edited, after", [
    (["2", "10", "1"], ["1", "10", "2"], ["1", "10", "2"]),  # the older builder's text order: kept
    (["b", "c", "a"], ["c", "b", "a"], ["a", "b", "c"]),  # an order no builder wrote (verify says rebuild): fixed
])
def test_a_rebuild_keeps_an_earlier_builders_label_order_and_repairs_any_other(tmp_path: Path, labels, edited,
                                                                             after) -> None:
    """Builds before integer labels sorted numerically wrote '10' before '2': a rebuild into that OUT keeps
    the order its models were trained with. Any other order is what verify tells the user to rebuild."""
    src = tmp_path / "raw"
    good = _good_corpus(src, 3)
    listing = src / "list.csv"
    listing.write_text("wav,label\n" + "".join(f"{n},{lab}\n" for n, lab in zip(good, labels)))
    out = tmp_path / "out"
    build(listing, out, workers=1, progress=False)
    assert DatasetManifest.load(out / "train").labels == sorted(labels, key=lambda x: (len(x), x))
    raw = json.loads((out / "train/manifest.json").read_text())
    raw["labels"] = edited
    (out / "train/manifest.json").write_text(json.dumps(raw))
    build(listing, out, workers=1, progress=False)
    assert DatasetManifest.load(out / "train").labels == after
    verify_split(out / "train")


def test_a_split_folder_that_is_not_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _good_corpus(src, 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/train").write_text("x")
    r = subprocess.run([str(CLI), "build", str(src), str(tmp_path / "out"), "--quiet"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"unfused-shards build: {tmp_path / 'out/train'}: cannot write the split here " \
                               "(Not a directory); make it a folder you can write, or choose another OUT"


def test_the_recorded_build_command_works_from_any_folder(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    _good_corpus(src, 2)
    r = subprocess.run([str(CLI), "build", "raw", "out", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert DatasetManifest.load(tmp_path / "out/train").build.command == \
        f"unfused-shards build {tmp_path / 'raw'} {tmp_path / 'out'} --quiet"

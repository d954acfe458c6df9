"""Shard builder / verifier end to end on real audio files written into tmp_path."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards_tools.build import build
from shards_tools.sources import make_key
from shards_tools.verify import VerifyError, verify, verify_split
from unfused_dist.audio.io import AudioDecodeError, decode_audio, encode_flac, load_file, resample, to_mono
from unfused_dist.data.manifest import DatasetManifest, ManifestError

CLI = Path(sys.executable).parent / "unfused-shards"
LABELS = ["bird", "cat", "dog"]  # "bird" exists only in val: it must still be in every split's vocabulary


def _tone(sr: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return x if channels == 1 else np.stack([x, 0.5 * x], axis=1)


def _write(path: Path, x: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".wav": "WAV", ".ogg": "OGG", ".flac": "FLAC"}[path.suffix]
    sub = {"WAV": "PCM_16", "OGG": "VORBIS", "FLAC": "PCM_16"}[fmt]
    sf.write(path, x, sr, format=fmt, subtype=sub)


# (relative path, sample rate, seconds, channels, label, split): the good inputs, in CSV order
GOOD = [
    ("cat/a.wav", 8000, 1.0, 1, "cat", "train"),
    ("dog/b.ogg", 22050, 0.5, 1, "dog", "train"),
    ("dog/c d.flac", 44100, 0.75, 2, "dog", "train"),
    ("cat/e.v2.wav", 44100, 0.25, 2, "cat", "train"),
    ("val/f.flac", 22050, 1.0, 1, "bird", "val"),
    ("val/g.ogg", 8000, 0.5, 1, "cat", "val"),
    ("test/h.wav", 44100, 0.5, 2, "dog", "test"),
]
GOOD_KEYS = {"train": ["cat__a", "dog__b", "dog__c_d", "cat__e_v2"], "val": ["val__f", "val__g"],
             "test": ["test__h"]}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """src/manifest.csv with good files in three splits, plus a corrupt, an empty, a zero-frame, a NaN,
    a missing file and a duplicate row in train."""
    src = tmp_path / "src"
    rows = []
    for i, (rel, sr, sec, ch, label, split) in enumerate(GOOD):
        _write(src / rel, _tone(sr, sec, ch, freq=200 + 50 * i), sr)
        rows.append((rel, label, split))
    (src / "bad").mkdir()
    (src / "bad/corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 50)
    (src / "bad/empty.wav").write_bytes(b"")
    sf.write(src / "bad/zero.wav", np.zeros(0, np.float32), 16000)
    sf.write(src / "bad/nan.wav", np.full(1000, np.nan, np.float32), 16000, subtype="FLOAT")
    bad = ["bad/corrupt.wav", "bad/empty.wav", "bad/zero.wav", "bad/nan.wav", "bad/missing.wav", "cat/a.wav"]
    rows[2:2] = [(p, "cat", "train") for p in bad]  # interleaved: good order must survive rejects
    with open(src / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return src / "manifest.csv"


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def _shas(split_dir: Path) -> list[str]:
    return [s.sha256 for s in DatasetManifest.load(split_dir).shards]


def test_build_csv_with_splits(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summaries = build(corpus, out, workers=2, shard_samples=3, keep_order=True, progress=False)
    assert [s.split for s in summaries] == ["train", "val", "test"]
    for split, keys in GOOD_KEYS.items():
        m = DatasetManifest.load(out / split)
        assert (m.split, m.sample_rate, m.codec, m.format_version) == (split, 16000, "flac", 1)
        assert m.labels == LABELS and m.label_index == {"bird": 0, "cat": 1, "dog": 2}
        assert m.num_samples == len(keys) == sum(s.num_samples for s in m.shards)
        assert all(s.num_samples <= 3 for s in m.shards)
        names = [n for p in m.shard_paths(out / split) for n in _members(p)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("flac", "json")]
        assert (m.shards[0].first_key, m.shards[-1].last_key) == (keys[0], keys[-1])
    # every member: 16 kHz mono PCM_16 FLAC + its JSON
    good = {make_key(g[0]): g for g in GOOD}
    total = 0.0
    for tar_path in sorted(out.glob("*/audio-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                key = member.name.split(".")[0]
                rel, sr, sec, ch, label, split = good[key]
                if member.name.endswith(".flac"):
                    info = sf.info(io.BytesIO(data))
                    assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
                    assert info.frames == round(sec * 16000)
                else:
                    meta = json.loads(data)
                    assert meta == {"id": key, "duration": pytest.approx(sec), "label": label, "source": rel,
                                    "orig_sample_rate": sr}
                    total += meta["duration"]
    assert total == pytest.approx(sum(g[2] for g in GOOD))
    # rejects: one JSON line each, in source order, only in train
    rejected = [json.loads(line) for line in (out / "train/rejected.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejected] == ["bad/corrupt.wav", "bad/empty.wav", "bad/zero.wav", "bad/nan.wav",
                                             "bad/missing.wav", "cat/a.wav"]
    reasons = [r["reason"] for r in rejected]
    assert reasons[0].startswith("undecodable") and reasons[1] == "empty file"
    assert reasons[2] == "zero-length audio" and reasons[3] == "NaN or inf samples"
    assert reasons[4] == "missing file" and reasons[5].startswith("duplicate key cat__a")
    assert {r["split"] for r in rejected} == {"train"}
    assert [s.rejected for s in summaries] == [6, 0, 0]
    assert DatasetManifest.load(out / "train").build.rejected == 6
    assert not (out / "val/rejected.jsonl").exists()


def test_shards_read_with_webdataset(corpus: Path, tmp_path: Path) -> None:
    import webdataset as wds

    build(corpus, tmp_path / "out", workers=1, shard_samples=2, keep_order=True, progress=False)
    urls = [str(p) for p in DatasetManifest.load(tmp_path / "out/train").shard_paths(tmp_path / "out/train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node))
    assert [s["__key__"] for s in samples] == GOOD_KEYS["train"]
    assert all(set(s) >= {"flac", "json"} for s in samples)


def test_rebuild_is_byte_identical(corpus: Path, tmp_path: Path) -> None:
    build(corpus, tmp_path / "a", workers=2, shard_samples=2, progress=False)
    build(corpus, tmp_path / "b", workers=1, shard_samples=2, progress=False)
    build(corpus, tmp_path / "a", workers=2, shard_samples=2, progress=False)  # over an existing build
    for split in GOOD_KEYS:
        assert _shas(tmp_path / "a" / split) == _shas(tmp_path / "b" / split)
        assert sorted(p.name for p in (tmp_path / "a" / split).iterdir()) == sorted(
            p.name for p in (tmp_path / "b" / split).iterdir())


def test_verify_good_truncated_and_foreign_member(corpus: Path, tmp_path: Path, append_member) -> None:
    out = tmp_path / "out"
    build(corpus, out, workers=2, shard_samples=2, progress=False)
    reports, errors = verify(out)
    assert errors == [] and [r.split for r in reports] == ["test", "train", "val"]
    assert sum(r.clips for r in reports) == len(GOOD)

    shard = out / "train" / DatasetManifest.load(out / "train").shards[1].name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(VerifyError, match=shard.name):
        verify_split(out / "train")
    shard.write_bytes(data)
    verify_split(out / "train")

    append_member(out / "val/audio-000000.tar", "val__f.pyd", b"\x80\x04not really a pickle")
    with pytest.raises(VerifyError, match=r"audio-000000.tar: foreign member 'val__f.pyd'"):
        verify_split(out / "val")
    reports, errors = verify(out)
    assert len(errors) == 1 and errors[0].startswith("val: ERROR audio-000000.tar")


def test_folder_source_labels_from_dirs(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    for i, name in enumerate(["dog/x.wav", "cat/y.flac", "cat/sub/z.ogg", ".hidden/w.wav", "notes.txt"]):
        if name.endswith(".txt"):
            (src / name).write_text("not audio")
        else:
            _write(src / name, _tone(16000, 0.2), 16000)
    (s,) = build(src, tmp_path / "out", workers=1, labels_from_dirs=True, keep_order=True, progress=False)
    m = DatasetManifest.load(tmp_path / "out/train")
    assert (s.clips, s.rejected, m.labels) == (3, 0, ["cat", "dog", "sub"])
    assert _members(tmp_path / "out/train/audio-000000.tar")[::2] == [
        "cat__sub__z.flac", "cat__y.flac", "dog__x.flac"]


def test_lape_csv_forms(tmp_path: Path) -> None:
    """LAPE manifests: `files` (paths only, here absolute) and `wav,label`."""
    audio = tmp_path / "audio"
    for name in ["p.wav", "q.wav"]:
        _write(audio / name, _tone(8000, 0.2), 8000)
    (tmp_path / "files.csv").write_text(f"files\n{audio / 'p.wav'}\n{audio / 'q.wav'}\n")
    (s,) = build(tmp_path / "files.csv", tmp_path / "o1", workers=1, keep_order=True, progress=False)
    m = DatasetManifest.load(tmp_path / "o1/train")
    assert (s.clips, m.labels, m.shards[0].first_key) == (2, None, "audio__p")
    (tmp_path / "wl.csv").write_text("wav,label\naudio/p.wav,yes\naudio/q.wav,no\n")
    build(tmp_path / "wl.csv", tmp_path / "o2", workers=1, progress=False)
    assert DatasetManifest.load(tmp_path / "o2/train").labels == ["no", "yes"]


def test_shard_mb_target_is_planned_from_durations(tmp_path: Path) -> None:
    """--shard-mb plans shards before encoding, from header durations: 1 s of 16 kHz FLAC is estimated at
    ~21 KB, so a 0.045 MB target holds two 1 s clips, and a 4 s clip gets a shard of its own."""
    src = tmp_path / "raw"
    for i, sec in enumerate([1, 1, 1, 1, 4, 1]):
        noise = np.random.default_rng(i).uniform(-0.5, 0.5, 16000 * sec).astype(np.float32)
        _write(src / f"n{i}.wav", noise, 16000)
    build(src, tmp_path / "out", workers=1, shard_mb=0.045, keep_order=True, progress=False)
    m = DatasetManifest.load(tmp_path / "out/train")
    assert [s.num_samples for s in m.shards] == [2, 2, 1, 1] and m.num_samples == 6


def test_make_key() -> None:
    assert make_key("a/b c/x.y.wav") == "a__b_c__x_y"
    assert make_key("dir.v1/file") == "dir_v1__file"
    assert make_key("ü-ok_1.flac") == "ü-ok_1" and make_key("a+b (1).wav") == "a_b__1_"


def test_audio_io_roundtrip_and_errors() -> None:
    stereo = _tone(44100, 0.5, channels=2)
    buf = io.BytesIO()
    sf.write(buf, stereo, 44100, format="WAV")
    x, sr = decode_audio(buf.getvalue())
    assert x.shape == (2, 22050) and sr == 44100 and x.dtype == np.float32
    y = resample(to_mono(x), sr, 16000)
    assert y.shape == (8000,) and y.dtype == np.float32
    z, zsr = decode_audio(encode_flac(y, 16000))
    assert z.shape == (1, 8000) and zsr == 16000 and np.abs(z[0] - y).max() < 1e-3
    for bad, reason in [(b"", "empty file"), (b"not audio at all", "undecodable")]:
        with pytest.raises(AudioDecodeError, match=reason):
            decode_audio(bad)
    with pytest.raises(AudioDecodeError, match="missing file"):
        load_file("/nonexistent/file.wav")


def test_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):
        DatasetManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        DatasetManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ManifestError, match="unknown format_version 99"):
        DatasetManifest.load(tmp_path)


@pytest.mark.skipif(not CLI.exists(), reason="unfused-shards console script not installed in this venv")
def test_cli_exit_codes(corpus: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "out"
    r = run("build", str(corpus), str(out), "--workers", "2", "--shard-samples", "2")
    assert r.returncode == 3, r.stderr
    assert "train: 4 clips" in r.stdout and "6 rejected" in r.stdout
    clean = tmp_path / "clean"
    _write(clean / "only.wav", _tone(8000, 0.3), 8000)
    assert run("build", str(clean), str(tmp_path / "out2"), "--quiet").returncode == 0
    r = run("verify", str(out))
    assert r.returncode == 0 and r.stdout.count(": OK ") == 3, r.stderr
    r = run("stats", str(out / "val"))
    assert r.returncode == 0 and "bird 1, cat 1" in r.stdout
    shard = out / "test/audio-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    r = run("verify", str(out))
    assert r.returncode == 1 and "test: ERROR audio-000000.tar" in r.stderr
    assert run("build", str(tmp_path / "nope"), str(out)).returncode == 2
    assert run("merge").returncode == 2

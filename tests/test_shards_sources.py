"""shards_tools/sources.py: folder walks (unreadable and symlinked folders), keys, label order and the errors a
bad manifest gives, on tiny WAVs written into tmp_path."""

from __future__ import annotations

import json
import os
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards_tools.build import build
from shards_tools.cli import EXIT_REJECTED, EXIT_USAGE, main
from shards_tools.sources import SourceError, make_key, read_source


def _wav(path: Path, seconds: float = 0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(int(8000 * seconds), 0.1, np.float32), 8000)
    return path


def _keys(source) -> list[str]:
    return [i.key for i in source.items if not i.error]


def _rejected(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]


def _deny(monkeypatch, *denied: Path) -> None:
    """os.scandir raises PermissionError on these folders, as it does for a non-root user on a chmod 000
    folder (tests run as root, where chmod denies nothing). Both os.walk and our walker list via it."""
    real = os.scandir
    denied_abs = {os.path.abspath(d) for d in denied}

    def scandir(path="."):
        if os.path.abspath(os.fspath(path)) in denied_abs:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


# ---- 1. unreadable folders -------------------------------------------------------------------------

def test_unreadable_subfolder_is_a_rejected_row(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    _wav(src / "ok/a.wav")
    _wav(src / "locked/b.wav")
    _deny(monkeypatch, src / "locked")
    source = read_source(src)
    assert [(i.source, i.error) for i in source.items] == [("locked", "unreadable folder (Permission denied)"),
                                                           ("ok/a.wav", None)]
    out = tmp_path / "out"
    assert main(["build", str(src), str(out), "--workers", "1", "--quiet"]) == EXIT_REJECTED
    assert _rejected(out) == [{"path": "locked", "reason": "unreadable folder (Permission denied)",
                               "split": "train"}]
    assert "1 inputs rejected" in capsys.readouterr().err


def test_unreadable_source_folder_says_it_cannot_be_read(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _wav(src / "a.wav")
    _deny(monkeypatch, src)
    with pytest.raises(SourceError, match=r"src: cannot read this folder \(Permission denied\)"):
        read_source(src)


# ---- 2. symlinked folders --------------------------------------------------------------------------

def test_symlinked_folders_are_followed_once(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    _wav(src / "real/a.wav")
    _wav(elsewhere / "deep/b.wav")
    (src / "linked").symlink_to(elsewhere)  # outside the source: followed, keyed as seen under src
    (src / "alias").symlink_to(src / "real")  # a folder already walked under its real path
    (src / "real/loop").symlink_to(src)  # back to an ancestor: must not loop
    (elsewhere / "up").symlink_to(elsewhere)
    _wav(src / "real/x.wav").with_name("y.wav").symlink_to(src / "real/x.wav")  # files were followed already
    source = read_source(src)
    assert _keys(source) == ["linked__deep__b", "real__a", "real__x", "real__y"]
    assert source.items[0].path == str(src / "linked/deep/b.wav")
    assert all(i.error is None for i in source.items)


# ---- 3. keys keep Unicode letters ------------------------------------------------------------------

def test_keys_keep_unicode_letters_in_nfc():
    assert make_key("你好.wav") == "你好" and make_key("再见.wav") == "再见"
    cafe_nfc, cafe_nfd = "café.wav", unicodedata.normalize("NFD", "café.wav")
    assert cafe_nfc != cafe_nfd and make_key(cafe_nfc) == make_key(cafe_nfd) == "café"
    assert make_key("cafè.wav") == "cafè"
    assert make_key("ü-ok_1.flac") == "ü-ok_1"
    assert make_key("dir.v1/a b.c.wav") == "dir_v1__a_b_c"  # ASCII keys as before
    assert make_key("x?y*z~.wav") == "x_y_z_"


def test_unicode_names_build_without_collisions(tmp_path):
    src = tmp_path / "src"
    for name in ("你好.wav", "再见.wav", "café.wav", "cafè.wav"):
        _wav(src / name)
    out = tmp_path / "out"
    [summary] = build(src, out, workers=1, shard_samples=10, progress=False)
    assert summary.rejected == 0 and summary.clips == 4
    with tarfile.open(next((out / "train").glob("audio-*.tar"))) as tar:
        names = tar.getnames()
    assert sorted(n.split(".")[0] for n in names[::2]) == sorted(["你好", "再见", "café", "cafè"])


# ---- 4. manifest paths outside the manifest's folder -------------------------------------------------

def test_keys_of_paths_outside_the_manifest_folder_hold_no_machine_path(tmp_path):
    r = tmp_path / "r"
    _wav(r / "audio/x.wav")
    _wav(r / "c/in/y.wav")
    outside = _wav(tmp_path / "abs/z.wav")
    manifest = r / "c/m.csv"
    manifest.write_text(f"path\n../audio/x.wav\nin/../../c/in/y.wav\n{outside}\n{r / 'c/in/y.wav'}\n"
                        "a/../../audio/x.wav\n")
    items = read_source(manifest).items
    assert [i.key for i in items[:3]] == ["audio__x", "in__y", make_key(str(outside).lstrip("/"))]
    assert items[0].path == str(r / "audio/x.wav")
    assert [i.error for i in items[3:]] == ["duplicate key in__y (already used by in/../../c/in/y.wav)",
                                            "duplicate key audio__x (already used by ../audio/x.wav)"]


def test_json_lines_paths_outside_the_folder(tmp_path):
    _wav(tmp_path / "audio/x.wav")
    manifest = tmp_path / "m/m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text('{"path": "../../%s/audio/x.wav"}\n' % tmp_path.name)
    assert _keys(read_source(manifest)) == [f"{tmp_path.name}__audio__x"]


# ---- 5. integer labels -----------------------------------------------------------------------------

def test_integer_labels_sort_numerically(tmp_path):
    for i in range(4):
        _wav(tmp_path / f"{i}.wav")
    (tmp_path / "m.csv").write_text("path,label\n0.wav,10\n1.wav,2\n2.wav,0\n3.wav,1\n")
    assert read_source(tmp_path / "m.csv").labels == ["0", "1", "2", "10"]
    (tmp_path / "m.csv").write_text("path,label\n0.wav,10\n1.wav,2\n2.wav,b\n3.wav,-1\n")
    assert read_source(tmp_path / "m.csv").labels == ["-1", "10", "2", "b"]  # not all integers: text order


def test_integer_labels_ids_in_the_built_manifest(tmp_path):
    for label in ("0", "1", "2", "10"):
        _wav(tmp_path / f"src/{label}/a.wav")
    build(tmp_path / "src", tmp_path / "out", workers=1, labels_from_dirs=True, progress=False)
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert manifest["labels"] == ["0", "1", "2", "10"]


# ---- 6. manifests that are not UTF-8 text or not valid CSV -------------------------------------------

@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_non_utf8_manifest_names_file_and_line(tmp_path, name, capsys):
    _wav(tmp_path / "a.wav")
    first = "path\n" if name.endswith(".csv") else ""
    line = "a.wav\n" if name.endswith(".csv") else '{"path": "a.wav"}\n'
    (tmp_path / name).write_bytes((first + line * 3).encode() + "caf\xe9.wav\n".encode("latin-1"))
    lineno = 5 if name.endswith(".csv") else 4
    with pytest.raises(SourceError, match=rf"{name}:{lineno}: not UTF-8 text \(byte 0xe9\); save the manifest"):
        read_source(tmp_path / name)
    assert main(["build", str(tmp_path / name), str(tmp_path / "out"), "--quiet"]) == EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_audio_or_binary_file_as_source(tmp_path):
    wav = _wav(tmp_path / "a.wav")
    with pytest.raises(SourceError, match=r"a\.wav: this is an audio file; give the folder holding it"):
        read_source(wav)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(wav.read_bytes())
    with pytest.raises(SourceError, match=r"blob\.bin:1: not UTF-8 text"):
        read_source(blob)


def test_csv_field_over_the_limit_is_a_source_error(tmp_path):
    (tmp_path / "m.csv").write_text('path\na.wav\n"unclosed.wav\n' + "x" * 200_000 + "\n")
    with pytest.raises(SourceError, match=r"m\.csv:\d+: not a valid CSV row \(field larger than field limit"):
        read_source(tmp_path / "m.csv")


# ---- 7. .json manifests ----------------------------------------------------------------------------

def test_json_manifest_is_read_as_json_lines(tmp_path):
    _wav(tmp_path / "a.wav")
    (tmp_path / "m.json").write_text('\n{"audio_filepath": "a.wav", "label": "x", "duration": 0.1}\n')
    source = read_source(tmp_path / "m.json")
    assert _keys(source) == ["a"] and source.labels == ["x"]


def test_json_file_that_is_not_json_lines(tmp_path):
    (tmp_path / "m.json").write_text('[\n  {"path": "a.wav"}\n]\n')
    with pytest.raises(SourceError, match=r"m\.json: neither CSV nor JSON lines"):
        read_source(tmp_path / "m.json")


# ---- 8. --labels-from-dirs and files directly in the source --------------------------------------------

def test_labels_from_dirs_rejects_files_outside_a_class_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _wav(src / "cat/a.wav")
    _wav(src / "stray.wav")
    monkeypatch.chdir(src)
    for where in (src, "."):  # the label was the source's own name, or "" for "."
        source = read_source(where, labels_from_dirs=True)
        assert source.labels == ["cat"]
        assert [(i.source, i.label, i.error) for i in source.items] == [
            ("cat/a.wav", "cat", None),
            ("stray.wav", None, "not in a class folder: --labels-from-dirs takes the label from the parent folder")]
    out = tmp_path / "out"
    [summary] = build(src, out, workers=1, labels_from_dirs=True, progress=False)
    assert (summary.clips, summary.rejected) == (1, 1)
    assert [r["path"] for r in _rejected(out)] == ["stray.wav"]

"""Turn a raw corpus (a folder of audio files, or a CSV manifest) into an ordered list of items to build.

Accepted sources:
- a folder, scanned recursively, in sorted order of relative path (hidden files/folders skipped: macOS `._x.wav` litter);
  every file goes to split `train`; with labels_from_dirs the parent folder's name is the label;
- a CSV with a header naming the path column `path` (LAPE forms: `files`, `wav`; also `file`,
  `filename`), optionally `label` (or `labels`) and `split` (default `train`). Relative paths are
  relative to the CSV's folder;
- a JSONL file (name ending in .jsonl): one JSON object per line with `path` (or NeMo's `audio_filepath`),
  optionally `label` and `split`. Relative paths are relative to the JSONL's folder.

Keys are derived from the path relative to the source root, so they are stable across machines.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from unfused_dist.audio.io import AUDIO_EXTENSIONS

PATH_COLUMNS = ("path", "files", "wav", "file", "filename")
LABEL_COLUMNS = ("label", "labels")
JSONL_PATH_FIELDS = ("path", "audio_filepath")
DEFAULT_SPLIT = "train"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SPLIT_OK = re.compile(r"^[A-Za-z0-9_-]+$")


class SourceError(Exception):
    """The source as a whole is unusable (missing, no path column, bad split name): the build cannot start."""


@dataclass(frozen=True)
class SourceItem:
    path: str  # what the worker opens: absolute, normalised (symlinks kept)
    source: str  # the path as the user gave it (CSV cell, or path relative to the folder)
    key: str
    label: str | None
    split: str
    error: str | None = None  # set when the row is already known to be bad (duplicate key, empty path)


@dataclass
class Source:
    root: Path
    items: list[SourceItem]
    labels: list[str] | None  # sorted union over ALL splits, so val/test share train's class ids
    origin: Path  # the folder or CSV the user named

    def splits(self) -> list[str]:
        """Splits in order of first appearance in the source."""
        return list(dict.fromkeys(item.split for item in self.items))


def make_key(rel_path: str) -> str:
    """'a/b c/x.y.wav' -> 'a__b_c__x_y': no dots (WebDataset cuts keys at the first dot), no slashes."""
    stem = rel_path.replace("\\", "/")
    base, dot, ext = stem.rpartition(".")
    if dot and "/" not in ext:  # drop only the extension, not a dot inside a folder name
        stem = base
    return _UNSAFE.sub("_", stem.replace("/", "__"))


def read_source(src: str | Path, labels_from_dirs: bool = False) -> Source:
    src = Path(src)
    if src.is_dir():
        rows = list(_scan_folder(src, labels_from_dirs))
        root = src
        if not rows:
            raise SourceError(f"{src}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found under this folder")
    elif src.is_file():
        if labels_from_dirs:
            raise SourceError(f"{src}: --labels-from-dirs applies to folder sources; use a `label` column")
        is_jsonl = src.name.lower().endswith(".jsonl")
        rows = list(_read_jsonl(src) if is_jsonl else _read_csv(src))
        root = src.parent
        if not rows:
            raise SourceError(f"{src}: no entries" if is_jsonl else f"{src}: the CSV has a header but no rows")
    else:
        raise SourceError(f"{src}: no such file or folder; give a folder of audio or a CSV manifest")
    items = _assign_keys(rows, root)
    labels = sorted({i.label for i in items if i.label is not None}) or None
    return Source(root=root, items=items, labels=labels, origin=src)


def _scan_folder(root: Path, labels_from_dirs: bool):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root))
    # one global order by relative path: independent of the filesystem's listing order
    for rel in sorted(found, key=lambda p: p.as_posix()):
        label = (root / rel).parent.name if labels_from_dirs else None
        yield rel.as_posix(), label, DEFAULT_SPLIT


def _read_csv(csv_path: Path):
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        path_col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
        if path_col is None:
            raise SourceError(
                f"{csv_path}: no path column in header {header}; name it one of {', '.join(PATH_COLUMNS)}"
            )
        label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
        split_col = header.index("split") if "split" in header else None
        for lineno, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue  # blank line
            cell = lambda col: row[col].strip() if col is not None and col < len(row) else ""  # noqa: E731
            split = cell(split_col) or DEFAULT_SPLIT
            _check_split(csv_path, lineno, split)
            yield cell(path_col), cell(label_col) or None, split


def _check_split(src: Path, lineno: int, split: str) -> None:
    if not _SPLIT_OK.match(split):
        raise SourceError(f"{src}:{lineno}: split {split!r} is not a valid folder name (use letters, digits, _ or -)")


def _read_jsonl(jsonl_path: Path):
    """Rows (path, label, split) like _read_csv's, so both share _assign_keys. A malformed line stops the
    build (unlike a bad audio file): it usually means the whole manifest is wrong."""
    with open(jsonl_path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield _parse_jsonl_line(jsonl_path, lineno, line)


def _parse_jsonl_line(jsonl_path: Path, lineno: int, line: str) -> tuple[str, str | None, str]:
    where = f"{jsonl_path}:{lineno}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise SourceError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    field = next((f for f in JSONL_PATH_FIELDS if f in obj), None)
    if field is None:
        raise SourceError(f"{where}: no path field; name it one of {', '.join(JSONL_PATH_FIELDS)}")
    values = {k: obj.get(k) for k in (field, "label", "split")}
    # strings only: str(3) as a label would sort '10' before '2' and silently reorder class ids
    bad = next((k for k, v in values.items() if v is not None and not isinstance(v, str)), None)
    if bad:
        raise SourceError(f"{where}: {bad!r} must be a string, got {values[bad]!r}")
    split = (values["split"] or "").strip() or DEFAULT_SPLIT
    _check_split(jsonl_path, lineno, split)
    return (values[field] or "").strip(), (values["label"] or "").strip() or None, split


def _assign_keys(rows, root: Path) -> list[SourceItem]:
    root_abs = Path(os.path.abspath(root))
    seen: dict[tuple[str, str], str] = {}  # (split, key) -> source of first occurrence
    items = []
    for given, label, split in rows:
        if not given:
            items.append(SourceItem("", "", "", label, split, error="empty path"))
            continue
        path = Path(os.path.normpath(root_abs / given))  # an absolute `given` replaces root_abs
        try:
            rel = path.relative_to(root_abs).as_posix()
        except ValueError:  # absolute path outside the root: key from the full path
            rel = path.relative_to(path.anchor).as_posix()
        key = make_key(rel)
        error = None
        if not key:
            error = "empty key (file name is only an extension)"
        elif (split, key) in seen:
            error = f"duplicate key {key} (already used by {seen[(split, key)]})"
        else:
            seen[(split, key)] = given
        items.append(SourceItem(str(path), given, key, label, split, error=error))
    return items

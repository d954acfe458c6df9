"""Turn a raw corpus (a folder of audio files, or a CSV or JSON lines manifest) into an ordered list of items
to build.

Accepted sources:
- a folder, scanned recursively, in sorted order of relative path (hidden files/folders skipped: macOS `._x.wav`
  litter); every file goes to split `train`. Symlinked folders are followed like symlinked files, each real
  folder once (a link back to an ancestor does not loop; a folder reached both directly and through a link is
  keyed by its real path). A subfolder that cannot be listed becomes a rejected row ("unreadable folder
  (...)"); a source folder that cannot be listed is an error. With labels_from_dirs the parent folder's name is
  the label, and a file directly in the source folder (no class folder) is a rejected row;
- a CSV with a header naming the path column `path` (LAPE forms: `files`, `wav`; also `file`,
  `filename`), optionally `label` (or `labels`) and `split` (default `train`). Relative paths are
  relative to the CSV's folder;
- a JSON lines file (name ending in .jsonl, or .json as NeMo names its manifests): one JSON object per line
  with `path` (or NeMo's `audio_filepath`), optionally `label` and `split`. Relative paths are relative to the
  manifest's folder. A .json file whose first line is not a JSON object is refused (neither CSV nor JSON lines).
A manifest must be UTF-8 text; anything else (or a malformed CSV) is an error naming the file and line.

Keys (make_key) are the same on every machine: made from the path relative to the source root, or, for a
manifest path outside its folder (`../audio/x.wav`, `/data/x.wav`), from the path as written, normalised, with
its leading `../` parts and its root (`/`, a drive) dropped: `../audio/x.wav` -> `audio__x`. The name is
NFC-normalised (macOS gives NFD), the extension dropped, `/` becomes `__` and anything but Unicode letters,
digits, `_` and `-` becomes `_` (no dots: WebDataset cuts keys at the first dot). Two paths with one key: the
second is a rejected row.

Labels: the vocabulary is sorted as text, or numerically when every label is an integer ("2" before "10").
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import dropwhile
from pathlib import Path, PurePath, PurePosixPath

from unfused_dist.audio.io import AUDIO_EXTENSIONS

PATH_COLUMNS = ("path", "files", "wav", "file", "filename")
LABEL_COLUMNS = ("label", "labels")
JSONL_PATH_FIELDS = ("path", "audio_filepath")
JSONL_SUFFIXES = (".jsonl", ".json")
DEFAULT_SPLIT = "train"
NOT_IN_CLASS_FOLDER = "not in a class folder: --labels-from-dirs takes the label from the parent folder"
_UNSAFE = re.compile(r"[^\w-]")  # str pattern: \w is Unicode letters, digits and _, so ASCII keys are as before
_SPLIT_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_INT_LABEL = re.compile(r"-?[0-9]+")


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
    labels: list[str] | None  # union over ALL splits, so val/test share train's class ids (see sort_labels)
    origin: Path  # the folder or CSV the user named

    def splits(self) -> list[str]:
        """Splits in order of first appearance in the source."""
        return list(dict.fromkeys(item.split for item in self.items))


def make_key(rel_path: str) -> str:
    """'a/b c/x.y.wav' -> 'a__b_c__x_y': no dots (WebDataset cuts keys at the first dot), no slashes.
    Unicode letters and digits stay (else '你好.wav' and '再见.wav' would both be '__'), in NFC so that a
    macOS (NFD) name gives the same key as elsewhere."""
    stem = unicodedata.normalize("NFC", rel_path).replace("\\", "/")
    base, dot, ext = stem.rpartition(".")
    if dot and "/" not in ext:  # drop only the extension, not a dot inside a folder name
        stem = base
    return _UNSAFE.sub("_", stem.replace("/", "__"))


def sort_labels(labels) -> list[str]:
    """Text order, or numeric order when every label is an integer: ids 0,1,2,3 for '0','1','2','10'."""
    if all(_INT_LABEL.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))  # '01' and '1' are two labels
    return sorted(labels)


def builder_label_orders(labels) -> list[list[str]]:
    """The orders a build may have given a vocabulary: sort_labels's, and plain text order, which builds before
    2026-11-25 used for all-integer labels too ('10' before '2')."""
    return [sort_labels(labels), sorted(labels)]


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
        rows = _read_manifest(src)
        root = src.parent
    else:
        raise SourceError(f"{src}: no such file or folder; give a folder of audio or a CSV manifest")
    items = _assign_keys(rows, root)
    labels = sort_labels({i.label for i in items if i.label is not None}) or None
    return Source(root=root, items=items, labels=labels, origin=src)


# ---- folders ------------------------------------------------------------------------------------------

def _scan_folder(root: Path, labels_from_dirs: bool):
    """Rows (path relative to root, label, split, error), in one global order by relative path: independent
    of the filesystem's listing order."""
    for rel, error in sorted(_walk(root), key=lambda found: found[0]):
        label = None
        if labels_from_dirs and not error:
            parent = PurePosixPath(rel).parent.name
            label, error = (parent, None) if parent else (None, NOT_IN_CLASS_FOLDER)
        yield rel, label, DEFAULT_SPLIT, error


def _walk(root: Path):
    """(relative path, None) for each audio file under root, (relative folder, reason) for each folder that
    cannot be listed. Real folders are walked first and symlinked ones in later rounds, so a folder reached
    both ways keeps its real path as key; a folder already visited (a link to an ancestor) is skipped."""
    visited: set[tuple[int, int]] = set()
    pending = [""]
    while pending:
        links = []
        for top in pending:
            stack = [top]
            while stack:
                rel = stack.pop()
                try:
                    listing = _list_folder(root / rel, visited)
                except OSError as e:
                    if not rel:
                        raise SourceError(f"{root}: cannot read this folder ({e.strerror or e}); "
                                          "check its permissions") from None
                    yield rel, f"unreadable folder ({e.strerror or e})"
                    continue
                for name, is_dir, is_link in listing:
                    child = f"{rel}/{name}" if rel else name
                    if is_dir:
                        (links if is_link else stack).append(child)
                    elif name.lower().endswith(AUDIO_EXTENSIONS):
                        yield child, None
        pending = sorted(links)


def _list_folder(path: Path, visited: set[tuple[int, int]]) -> list[tuple[str, bool, bool]]:
    """(name, is folder, is symlink) of the visible entries; [] when the real folder was already visited.
    Raises OSError when the folder cannot be listed."""
    st = os.stat(path)  # follows a link: the real folder's identity
    if (st.st_dev, st.st_ino) in visited:
        return []
    visited.add((st.st_dev, st.st_ino))
    with os.scandir(path) as it:
        return [(e.name, _is_dir(e), e.is_symlink()) for e in it if not e.name.startswith(".")]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; a broken link is a file (and is rejected as missing)
    except OSError:
        return False


# ---- manifests ----------------------------------------------------------------------------------------

def _read_manifest(src: Path) -> list[tuple]:
    if src.name.lower().endswith(AUDIO_EXTENSIONS):
        raise SourceError(f"{src}: this is an audio file; give the folder holding it, or a CSV or JSON lines "
                          "manifest listing it")
    is_jsonl = src.name.lower().endswith(JSONL_SUFFIXES)
    if is_jsonl and src.suffix.lower() == ".json":
        _check_json_lines(src)
    rows = list(_read_jsonl(src) if is_jsonl else _read_csv(src))
    if not rows:
        raise SourceError(f"{src}: no entries" if is_jsonl else f"{src}: the CSV has a header but no rows")
    return rows


@contextmanager
def _open_text(path: Path, newline: str | None = None):
    """The manifest as UTF-8 text; an unreadable or non-UTF-8 file is a SourceError naming the line."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError:
        line, byte = _first_non_utf8(path)
        raise SourceError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); save the manifest as UTF-8, or "
                          "give a folder of audio files") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read this file ({e.strerror or e}); check its permissions") from None


def _first_non_utf8(path: Path) -> tuple[int, int]:
    """(line, byte value) of the first byte that is not UTF-8. Only called after a decode error: the text
    reader decodes in blocks, so its position does not say which line is bad."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:  # e.object: the few held-back bytes (never a newline) + chunk
                return line + e.object[:e.start].count(b"\n"), e.object[e.start]
            line += chunk.count(b"\n")
    return line, 0  # a truncated character at the very end


def _check_json_lines(path: Path) -> None:
    """A .json manifest is read as JSON lines (NeMo's habit) only if its first line is a JSON object."""
    with _open_text(path) as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return  # empty: read_source says "no entries"
    try:
        ok = isinstance(json.loads(first), dict)
    except ValueError:
        ok = False
    if not ok:
        raise SourceError(f"{path}: neither CSV nor JSON lines (its first line is not a JSON object); give one "
                          "JSON object per line, or a CSV named .csv")


def _read_csv(csv_path: Path):
    with _open_text(csv_path, newline="") as f:
        reader = csv.reader(f)
        try:
            yield from _csv_rows(csv_path, reader)
        except csv.Error as e:  # e.g. a field over the size limit: an unclosed quote, or not a CSV at all
            raise SourceError(f"{csv_path}:{reader.line_num}: not a valid CSV row ({e}); check for an unclosed "
                              "quote (\"), or give a CSV manifest") from None


def _csv_rows(csv_path: Path, reader):
    header = [h.strip().lower() for h in next(reader, [])]
    path_col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    if path_col is None:
        raise SourceError(
            f"{csv_path}: no path column in header {header}; name it one of {', '.join(PATH_COLUMNS)}"
        )
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    split_col = header.index("split") if "split" in header else None
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        cell = lambda col: row[col].strip() if col is not None and col < len(row) else ""  # noqa: E731
        split = cell(split_col) or DEFAULT_SPLIT
        _check_split(csv_path, reader.line_num, split)
        yield cell(path_col), cell(label_col) or None, split, None


def _check_split(src: Path, lineno: int, split: str) -> None:
    if not _SPLIT_OK.match(split):
        raise SourceError(f"{src}:{lineno}: split {split!r} is not a valid folder name (use letters, digits, _ or -)")


def _read_jsonl(jsonl_path: Path):
    """Rows (path, label, split, None) like _read_csv's, so both share _assign_keys. A malformed line stops
    the build (unlike a bad audio file): it usually means the whole manifest is wrong."""
    with _open_text(jsonl_path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield *_parse_jsonl_line(jsonl_path, lineno, line), None


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
    # strings only: str() of a number picks a spelling for the user (3.0 -> "3.0", not "3"), a silent new class
    bad = next((k for k, v in values.items() if v is not None and not isinstance(v, str)), None)
    if bad:
        raise SourceError(f"{where}: {bad!r} must be a string, got {values[bad]!r}")
    split = (values["split"] or "").strip() or DEFAULT_SPLIT
    _check_split(jsonl_path, lineno, split)
    return (values[field] or "").strip(), (values["label"] or "").strip() or None, split


# ---- keys ---------------------------------------------------------------------------------------------

def _assign_keys(rows, root: Path) -> list[SourceItem]:
    root_abs = Path(os.path.abspath(root))
    seen: dict[tuple[str, str], str] = {}  # (split, key) -> source of first occurrence
    items = []
    for given, label, split, error in rows:
        if not given:
            items.append(SourceItem("", "", "", label, split, error="empty path"))
            continue
        path = Path(os.path.normpath(root_abs / given))  # an absolute `given` replaces root_abs
        key = "" if error else make_key(_key_path(given, path, root_abs))
        if error:
            pass  # known bad (unreadable folder...): no key to claim
        elif not key:
            error = "empty key (the path has no file name besides its extension)"
        elif (split, key) in seen:
            error = f"duplicate key {key} (already used by {seen[(split, key)]})"
        else:
            seen[(split, key)] = given
        items.append(SourceItem(str(path), given, key, label, split, error=error))
    return items


def _key_path(given: str, path: Path, root_abs: Path) -> str:
    """The path a key is made from: relative to the source root when inside it; else the path as written,
    normalised, without its root or drive and leading `..` parts, so no key holds this machine's folders."""
    try:
        return path.relative_to(root_abs).as_posix()
    except ValueError:
        pass
    written = PurePath(os.path.normpath(given))
    parts = written.parts[1:] if written.anchor else written.parts
    return "/".join(dropwhile(lambda part: part == "..", parts))

"""Reading WebDataset shards: safe member decoding and key-checked zipping of audio and label shards.

Only audio, JSON, text and integer members are ever decoded; a member with any other extension (.pyd,
.pickle, ...) is refused with the shard's name. Nothing in a shard is unpickled.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..audio.io import AudioDecodeError, decode_mono
from ..errors import UnfusedError

SAFE_EXTENSIONS = {"flac", "wav", "json", "cls", "txt"}


class ShardError(UnfusedError, ValueError):
    """A shard that cannot be read as the data contract says; the message names the shard."""


class ShardUnavailable(ShardError):
    """A shard that cannot be opened at all (missing, no permission): a setup problem (a wrong path, a deleted
    shard), never damage for the loader to skip."""


class LabelAlignmentError(ShardError):
    """A label shard whose keys differ from its audio shard's."""


@dataclass
class RawSample:
    """A sample's members as bytes, decoded lazily so that skipped samples cost no decode."""
    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    vocab: dict[str, int] | None = None  # the manifest's label vocabulary, set by readers that know it

    @property
    def label_id(self) -> int:
        """The JSON label's index in `vocab` (-1 without a vocabulary or for a label outside it). Parsed when
        asked for, not when read: a sample that is never delivered is never parsed, and unreadable JSON fails
        where a bad decode does, inside the stream's bad-sample handling."""
        if not self.vocab:
            return -1
        label = self.meta().get("label")
        if label is not None and not isinstance(label, str):
            raise ShardError(f"{self.shard}: sample '{self.key}' has a label that is not text ({label!r})")
        return self.vocab.get(label, -1)

    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.members["json"]) if "json" in self.members else {}
        except (ValueError, RecursionError) as e:
            raise ShardError(f"{self.shard}: sample '{self.key}' has unreadable JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ShardError(f"{self.shard}: sample '{self.key}' has JSON that is not an object ({type(meta).__name__})")
        return meta

    def audio(self, sample_rate: int) -> np.ndarray:
        ext = "flac" if "flac" in self.members else "wav"
        if ext not in self.members:
            raise ShardError(f"{self.shard}: sample '{self.key}' has no audio member")
        try:
            wave, sr = decode_mono(self.members[ext])
        except AudioDecodeError as e:
            raise ShardError(f"{self.shard}: sample '{self.key}' cannot be decoded ({e}); "
                             "re-run `unfused-shards verify` and rebuild the shard") from None
        if sr != sample_rate:
            raise ShardError(f"{self.shard}: sample '{self.key}' is {sr} Hz, expected {sample_rate} Hz; "
                             "rebuild the shards with `unfused-shards build`")
        return wave

    def cls(self) -> int:
        try:
            return int(self.members["cls"].decode().strip())
        except (KeyError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise ShardError(f"{self.shard}: sample '{self.key}' has no class id as its .cls ({e})") from None


def iter_shard(path: str | Path) -> Iterator[RawSample]:
    """Yield the samples of one tar in order; members of a sample are consecutive (WebDataset layout)."""
    path = str(path)
    current: RawSample | None = None
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise ShardUnavailable(f"{path}: cannot open this shard ({e.strerror or e}); check the dataset's path, or "
                               "rebuild it with `unfused-shards build`") from None
    try:
        with f:
            for fname, data in _tar_members(f, os.fstat(f.fileno()).st_size):
                base, dot, ext = fname.rpartition("/")[2].partition(".")
                key = fname[: len(fname) - len(ext) - 1] if dot else fname
                if current is not None and current.key != key:
                    yield current  # complete: a sample's members are consecutive
                    current = None
                if not dot or ext not in SAFE_EXTENSIONS:
                    raise ShardError(f"{path}: member '{fname}' is not audio/json/text/int; refusing to "
                                     "decode it (shards never carry pickles or code)")
                if current is None:
                    current = RawSample(key=key, shard=path)
                current.members[ext] = data
    except (_Truncated, OSError) as e:
        raise ShardError(f"{path}: unreadable or truncated shard ({e}); re-run `unfused-shards verify`") from None
    if current is not None:
        yield current


class _Truncated(Exception):
    pass


_BLOCK = 512
_EMPTY = b"\0" * _BLOCK
_ADLER_BASE = 65521


def _octal(field: bytes) -> int:
    return int(field.strip(b"\0 ") or b"0", 8)


def _byte_sum_mod(header: bytes) -> int:
    """The sum of a header's bytes, its checksum field counted as eight spaces, modulo 65521. zlib's Adler-32
    keeps 1 + the sum of the bytes, mod 65521, in its low half, and computes it in C: about 5x faster than
    Python's sum() over the 512 bytes (benchmarks/shard_reader.py). A header's sum is at most 130,560, so a
    damaged header passes only if its sum is off by exactly 65,521."""
    return ((zlib.adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 8 * 32) % _ADLER_BASE


def _tar_members(f, file_size: int) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular member of a ustar/PAX/GNU tar, read block by block.

    Hand-rolled rather than tarfile/webdataset: reading the header fields directly costs a quarter or less of
    what tarfile does per member (benchmarks/shard_reader.py), which matters at thousands of clips per second per
    worker. Checksums are verified, a file that ends before its end-of-archive block counts as truncated, and
    a size field is checked against the file's size before anything is read (a damaged one could ask for
    gigabytes)."""
    long_name, pos = None, 0
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise _Truncated("ends inside a header, or without the end-of-archive block")
        if header == _EMPTY:
            return
        try:
            stored, size = _octal(header[148:156]), _octal(header[124:136])
        except ValueError:
            raise _Truncated("a header's checksum or size is not a number: not a tar header") from None
        if size < 0 or stored < 0:  # int() takes a sign: "-1" would read the rest of the file
            raise _Truncated("a header's checksum or size is negative: not a tar header")
        if stored % _ADLER_BASE != _byte_sum_mod(header):
            raise _Truncated("a header's checksum is wrong")
        pos += _BLOCK + size + -size % _BLOCK
        if pos > file_size:
            raise _Truncated("a member runs past the end of the file")
        data = f.read(size)
        if len(data) < size:
            raise _Truncated("a member is cut short")
        f.read(-size % _BLOCK)
        kind = header[156:157]
        if kind == b"x":  # PAX extended header: only its path matters here
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind not in (b"0", b"\0"):
            long_name = None  # a long name for a directory or link names nothing after it
            continue  # directories, links, global headers: no sample data
        if long_name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        else:
            name = long_name
        long_name = None
        yield name, data


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<length> path=<value>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() and len(digits) <= 20 else 0
        if length <= len(digits) + 1 or pos + length > len(data):  # each record must move pos on
            raise _Truncated("a PAX header's records are malformed")
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_shard_with_labels(audio: str | Path, labels: str | Path) -> Iterator[RawSample]:
    """Zip an audio shard with its label shard; any key mismatch raises naming both shards."""
    label_iter = _label_shard(labels)
    for i, sample in enumerate(iter_shard(audio)):
        lab = next(label_iter, None)
        if lab is None or lab.key != sample.key:
            got = "end of shard" if lab is None else f"key '{lab.key}'"
            raise LabelAlignmentError(f"label shard {labels} has {got} at position {i} where audio shard {audio} "
                                      f"has key '{sample.key}'; re-run the pseudolabel stage for this dataset")
        sample.members.update({k: v for k, v in lab.members.items() if k == "cls"})
        yield sample
    extra = next(label_iter, None)
    if extra is not None:
        raise LabelAlignmentError(f"label shard {labels} has extra key '{extra.key}' after the last sample of "
                                  f"audio shard {audio}; re-run the pseudolabel stage for this dataset")


def _label_shard(labels: str | Path) -> Iterator[RawSample]:
    """The label shard's samples. One that cannot be opened was lost or never written by the pseudolabel
    stage, so the advice is to re-run that stage, not to rebuild the dataset. Opened lazily, like iter_shard,
    so that an audio shard that cannot be opened is still reported first."""
    try:
        open(labels, "rb").close()
    except OSError as e:
        raise ShardUnavailable(f"{labels}: cannot open this label shard ({e.strerror or e}); re-run the "
                               "pseudolabel stage for this run") from None
    yield from iter_shard(labels)

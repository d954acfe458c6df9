"""Reading WebDataset shards: safe member decoding and key-checked zipping of audio and label shards.

Only audio, JSON, text and integer members are ever decoded; a member with any other extension (.pyd,
.pickle, ...) is refused with the shard's name. Nothing in a shard is unpickled.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ..audio.io import AudioDecodeError, decode_mono
from ..errors import UnfusedError

SAFE_EXTENSIONS = {"flac", "wav", "json", "cls", "txt"}


class ShardError(UnfusedError, ValueError):
    """A shard that cannot be read as the data contract says; the message names the shard."""


class LabelAlignmentError(ShardError):
    """A label shard whose keys differ from its audio shard's."""


@dataclass
class RawSample:
    """A sample's members as bytes, decoded lazily so that skipped samples cost no decode."""
    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    label_id: int = -1  # filled by readers that map the JSON label to the manifest's vocabulary

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.members["json"]) if "json" in self.members else {}
        except ValueError as e:
            raise ShardError(f"{self.shard}: sample '{self.key}' has unreadable JSON ({e})") from None

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
        return int(self.members["cls"].decode().strip())


def iter_shard(path: str | Path) -> Iterator[RawSample]:
    """Yield the samples of one tar in order; members of a sample are consecutive (WebDataset layout)."""
    path = str(path)
    current: RawSample | None = None
    try:
        with open(path, "rb") as f:
            for rec in tar_file_iterator(f):
                key, ext = base_plus_ext(rec["fname"])
                if key is None or ext not in SAFE_EXTENSIONS:
                    raise ShardError(f"{path}: member '{rec['fname']}' is not audio/json/text/int; refusing to "
                                     "decode it (shards never carry pickles or code)")
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    current = RawSample(key=key, shard=path)
                current.members[ext] = rec["data"]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: unreadable or truncated shard ({e}); re-run `unfused-shards verify`") from None
    if current is not None:
        yield current


def iter_shard_with_labels(audio: str | Path, labels: str | Path) -> Iterator[RawSample]:
    """Zip an audio shard with its label shard; any key mismatch raises naming both shards."""
    label_iter = iter_shard(labels)
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

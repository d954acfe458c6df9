"""Where a stream's samples come from: the shards of one split (and their label shards), or some of them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .manifest import DatasetManifest
from .shards import RawSample, iter_shard, iter_shard_with_labels


@dataclass
class ShardSource:
    """One split dir (+ optional label shards dir) and, optionally, the subset of keys to keep."""
    split_dir: Path
    labels_dir: Path | None = None
    keys: frozenset[str] | None = None
    counts: list[int] | None = None  # samples kept per shard: required with `keys`

    def __post_init__(self):
        self.split_dir = Path(self.split_dir)
        self.manifest = DatasetManifest.load(self.split_dir)
        if self.counts is None:
            if self.keys is not None:
                raise ValueError("ShardSource: `counts` (the kept samples per shard) must come with `keys`: the "
                                 "stream's positions are computed from them")
            self.counts = [s.num_samples for s in self.manifest.shards]

    def path(self, index: int) -> Path:
        return self.split_dir / self.manifest.shards[index].name

    def iter_shard(self, index: int) -> Iterator[RawSample]:
        """Samples of one shard (restricted to `keys`), knowing the manifest's label vocabulary."""
        audio = self.path(index)
        samples = (iter_shard(audio) if self.labels_dir is None
                   else iter_shard_with_labels(audio, self.labels_dir / label_shard_name(audio.name)))
        vocab = self.manifest.label_index or None
        for s in samples:
            if self.keys is None or s.key in self.keys:
                s.vocab = vocab
                yield s


@dataclass
class ShardSubset:
    """Some shards of a source, by index, usable wherever a ShardSource is (e.g. one rank's share, or the
    shards an interrupted job has still to do)."""
    parent: ShardSource
    indices: list[int]

    def __post_init__(self):
        self.split_dir, self.manifest = self.parent.split_dir, self.parent.manifest
        self.counts = [self.parent.counts[i] for i in self.indices]

    def path(self, index: int) -> Path:
        return self.parent.path(self.indices[index])

    def iter_shard(self, index: int) -> Iterator[RawSample]:
        return self.parent.iter_shard(self.indices[index])


def label_shard_name(audio_shard_name: str) -> str:
    return audio_shard_name.replace("audio-", "labels-", 1)

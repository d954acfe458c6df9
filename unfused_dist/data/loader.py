"""Streaming training data: shards split across ranks and DataLoader workers, seeded shuffles, and the
same number of batches on every rank (so collectives never hang on uneven shards)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import DatasetManifest
from .shards import RawSample, iter_shard, iter_shard_with_labels


def assign_shards(n_shards: int, seed: int, epoch: int, world: int, workers: int,
                  shuffle: bool) -> list[list[list[int]]]:
    """plan[rank][worker] = shard indices. The order is shuffled by (seed, epoch), then dealt round-robin."""
    order = np.arange(n_shards)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    plan = [[[] for _ in range(workers)] for _ in range(world)]
    for i, shard in enumerate(order):
        plan[i % world][(i // world) % workers].append(int(shard))
    return plan


@dataclass
class ShardSource:
    """One split dir (+ optional label shards dir) and, optionally, the subset of keys to keep."""
    split_dir: Path
    labels_dir: Path | None = None
    keys: frozenset[str] | None = None
    counts: list[int] | None = None  # samples kept per shard when `keys` is set

    def __post_init__(self):
        self.split_dir = Path(self.split_dir)
        self.manifest = DatasetManifest.load(self.split_dir)
        if self.counts is None:
            self.counts = [s.num_samples for s in self.manifest.shards]

    def iter_shard(self, index: int) -> Iterator[RawSample]:
        """Samples of one shard (restricted to `keys`), with `label_id` set from the manifest's vocabulary."""
        name = self.manifest.shards[index].name
        audio = self.split_dir / name
        samples = (iter_shard(audio) if self.labels_dir is None
                   else iter_shard_with_labels(audio, self.labels_dir / label_shard_name(name)))
        vocab = self.manifest.label_index
        for s in samples:
            if self.keys is None or s.key in self.keys:
                if vocab:
                    s.label_id = vocab.get(s.meta().get("label"), -1)
                yield s


def label_shard_name(audio_shard_name: str) -> str:
    return audio_shard_name.replace("audio-", "labels-", 1)


class ShardStream(IterableDataset):
    """Yields transform(sample) for this rank's and this worker's shards of one epoch."""

    def __init__(self, source: ShardSource, transform: Callable[[RawSample, np.random.Generator], object],
                 seed: int, shuffle: bool, rank: int = 0, world: int = 1, shuffle_buffer: int = 1000):
        self.source, self.transform = source, transform
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = assign_shards(len(self.source.counts), self.seed, self.epoch, self.world, workers, self.shuffle)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        samples = (s for i in plan[self.rank][worker] for s in self.source.iter_shard(i))
        if self.shuffle:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        for s in samples:
            yield self.transform(s, rng)

    def batches_per_epoch(self, batch_size: int, workers: int, drop_last: bool = True) -> int:
        """Batches every rank yields: the minimum over ranks, so all ranks step together."""
        workers = max(workers, 1)
        plan = assign_shards(len(self.source.counts), self.seed, self.epoch, self.world, workers, self.shuffle)
        per_rank = []
        for rank_plan in plan:
            n = [sum(self.source.counts[i] for i in w) for w in rank_plan]
            per_rank.append(sum(c // batch_size if drop_last else -(-c // batch_size) for c in n))
        if min(per_rank) == 0:
            raise ValueError(f"{self.source.split_dir}: {len(self.source.counts)} shards give some rank no full batch "
                             f"of {batch_size} with {self.world} ranks x {workers} workers; build smaller shards "
                             "(unfused-shards build --shard-samples) or lower the batch size")
        return min(per_rank)


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf.pop(int(rng.integers(len(buf))))
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def make_loader(stream: ShardStream, batch_size: int, workers: int, drop_last: bool) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                      persistent_workers=False, collate_fn=_collate)


def _collate(items: list) -> tuple:
    """Items are tuples of (np.ndarray | int | str); stack arrays, tensor ints, list strings."""
    cols = list(zip(*items))
    out = []
    for col in cols:
        if isinstance(col[0], np.ndarray):
            out.append(torch.from_numpy(np.stack(col)))
        elif isinstance(col[0], (int, np.integer)):
            out.append(torch.tensor(col, dtype=torch.long))
        else:
            out.append(list(col))
    return tuple(out)

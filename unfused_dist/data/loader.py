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


def assign_shards(n_shards: int, seed: int, epoch: int, world: int, lanes: int, shuffle: bool,
                  equal: bool = False) -> list[list[list[int]]]:
    """plan[rank][lane] = shard indices (a lane is a DataLoader worker, or the main process). The order is
    shuffled by (seed, epoch), then dealt round-robin; `equal` deals only whole rounds, so every lane gets
    the same number of shards (the few left over rotate from epoch to epoch with the shuffle)."""
    order = np.arange(n_shards)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    if equal:
        order = order[: n_shards - n_shards % (world * lanes)]
    plan = [[[] for _ in range(lanes)] for _ in range(world)]
    for i, shard in enumerate(order):
        plan[i % world][(i // world) % lanes].append(int(shard))
    return plan


class LoaderStateError(ValueError):
    pass


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
    """Yields transform(sample, rng) for this rank's and this worker's shards of one epoch.

    Training mode (`batch_size` set): every lane (DataLoader worker) of every rank yields exactly
    `batches_per_lane()` full batches, so all ranks step together and the DataLoader's in-order round robin
    over lanes is exact. The position in an epoch is then one number, the batches consumed, and resuming
    from it skips the samples already delivered without decoding them. Each sample's `rng` is seeded by
    its place in the epoch, so crops after a resume equal those of an uninterrupted run.
    Evaluation mode (`batch_size` None): every sample once, in shard order when `shuffle` is off."""

    def __init__(self, source: ShardSource, transform: Callable[[RawSample, np.random.Generator], object],
                 seed: int, shuffle: bool, rank: int = 0, world: int = 1, workers: int = 0,
                 batch_size: int | None = None, shuffle_buffer: int = 1000):
        self.source, self.transform = source, transform
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.workers, self.batch_size, self.shuffle_buffer = workers, batch_size, shuffle_buffer
        self.lanes = max(workers, 1)
        self.epoch = self.batches_done = 0

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        self.epoch, self.batches_done = epoch, batches_done

    def layout(self) -> dict:
        """What must not change for a resume to be exact."""
        return {"world": self.world, "workers": self.workers, "batch_size": self.batch_size, "seed": self.seed,
                "shards": len(self.source.counts)}

    def state_dict(self) -> dict:
        return {**self.layout(), "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in self.layout().items() if state.get(k) != v]
        if changed:
            raise LoaderStateError(f"{self.source.split_dir}: the data layout changed since the checkpoint "
                                   f"({', '.join(changed)}); resume with the same settings or start a new run")
        self.set_position(state["epoch"], state["batches_done"])

    def batches_per_lane(self) -> int:
        """Full batches each lane yields in any epoch: the k smallest shards' samples, k shards per lane."""
        k = len(self.source.counts) // (self.world * self.lanes)
        q = sum(sorted(self.source.counts)[:k]) // self.batch_size if k else 0
        if q == 0:
            raise LoaderStateError(
                f"{self.source.split_dir}: {len(self.source.counts)} shards cannot give each of {self.world} "
                f"ranks x {self.lanes} workers a full batch of {self.batch_size}; build more, smaller shards "
                "(unfused-shards build --shard-samples), or lower the batch size or data.num_workers")
        return q

    def batches_per_epoch(self) -> int:
        return self.batches_per_lane() * self.lanes

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader's round robin restarts at worker 0, but after n batches the next one is lane
        # n % lanes's: rotate the worker -> lane map so the interleaving continues where it stopped.
        lane = ((info.id if info else 0) + self.batches_done) % self.lanes
        training = self.batch_size is not None
        plan = assign_shards(len(self.source.counts), self.seed, self.epoch, self.world, self.lanes,
                             self.shuffle, equal=training)
        samples = (s for i in plan[self.rank][lane] for s in self.source.iter_shard(i))
        if self.shuffle:
            samples = _buffer_shuffle(samples, self.shuffle_buffer,
                                      np.random.default_rng([self.seed, self.epoch, self.rank, lane]))
        quota = skip = None
        if training:
            quota = self.batches_per_lane() * self.batch_size
            mine = self.batches_done // self.lanes + (lane < self.batches_done % self.lanes)
            skip = mine * self.batch_size
        for j, s in enumerate(samples):
            if quota is not None and j >= quota:
                break
            if skip and j < skip:  # delivered before the resume point: never decoded
                continue
            yield self.transform(s, np.random.default_rng([self.seed, self.epoch, self.rank, lane, j]))


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf.pop(int(rng.integers(len(buf))))
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def make_loader(stream: ShardStream, batch_size: int | None = None) -> DataLoader:
    """Training streams batch with their own batch size (full batches only); evaluation streams keep
    the last partial batch."""
    training = stream.batch_size is not None
    return DataLoader(stream, batch_size=stream.batch_size if training else batch_size,
                      num_workers=stream.workers, drop_last=training, persistent_workers=False,
                      collate_fn=_collate)


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

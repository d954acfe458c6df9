"""The two streams of samples a DataLoader reads: a training stream (full, equal batches on every rank and
worker, shuffled, resumable from a position) and an evaluation stream (every sample once)."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .batchpool import new_iteration
from .order import PositionRng, assign_shards, buffer_shuffle, circular
from .shards import LabelAlignmentError, RawSample, ShardError, ShardUnavailable
from .source import ShardSource
from .workers import WORKER_CONTEXT

log = logging.getLogger("unfused_dist.data.loader")  # one name for the data path's warnings


class LoaderStateError(ValueError):
    pass


# The rules that put samples in batches; part of the layout, so a checkpoint written under other rules is
# refused instead of resumed onto other samples. 2 (issue 18): the shuffle buffer fills before it yields,
# and the rows of each round of batches are mixed across the workers.
ORDER_VERSION = 2


class _Stream(IterableDataset):
    """What both streams share: `transform(sample, rng)` over this rank's and this DataLoader worker's (its
    lane's) part of the samples, a position the workers read when an iteration starts, and the policy for
    bad samples. A sample that fails to decode (ShardError) is logged by shard and key and, with
    bad_samples="skip", replaced (training) or left out (evaluation); "fail" re-raises it. A shard that cannot
    be opened, or label shards out of line with their audio shards, always stop the run."""

    def __init__(self, source: ShardSource, transform: Callable[[RawSample, np.random.Generator], object],
                 seed: int, shuffle: bool, rank: int = 0, world: int = 1, workers: int = 0,
                 shuffle_buffer: int = 1000, bad_samples: str = "skip"):
        if bad_samples not in ("skip", "fail"):
            raise ValueError(f"bad_samples must be 'skip' or 'fail', got {bad_samples!r}")
        self.source, self.transform = source, transform
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.workers, self.shuffle_buffer, self.bad_samples = workers, shuffle_buffer, bad_samples
        self.lanes = max(workers, 1)
        # The position, also in shared memory: a training loader's workers persist across epochs with their
        # own copy of this object, and read the position from there when the next epoch's iteration starts
        self._shared_position = WORKER_CONTEXT.Array("q", 2, lock=False)
        self.set_position(0, 0)
        self.bad_count = 0  # bad samples met by this copy of the stream (each worker has its own)
        # ...and by all of this rank's workers together: created here, in the main process, so the workers
        # (separate processes) inherit it; the training loop reads it for the metrics (take_bad)
        self.bad_total = WORKER_CONTEXT.Value("q", 0)
        self._bad_reported = 0

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Where the next iteration starts. Call it before iterating the loader (`iter(loader)` starts it)."""
        self.epoch, self.batches_done = epoch, batches_done
        self._shared_position[:] = [epoch, batches_done]

    def __iter__(self):
        info = get_worker_info()
        new_iteration()
        self.epoch, self.batches_done = self._shared_position[:]  # in a worker: what set_position wrote last
        self.bad_count = 0
        yield from self._lane(info.id if info else 0)

    def _unreadable(self, error: ShardError, lane: int, missing: int | None) -> None:
        """A shard that stopped short: `missing` positions of the lane's range it did not fill (None: the
        mode has no positions, and the rest of the shard is skipped). A shard that cannot be opened at all,
        or a label shard whose keys are not its audio shard's, stops the run whatever bad_samples says: a
        wrong path or stale labels (made for another build of the dataset) are no damage to skip."""
        if self.bad_samples == "fail" or isinstance(error, (ShardUnavailable, LabelAlignmentError)):
            raise error
        lost = ("the rest of the shard is skipped" if missing is None else "no sample was lost" if missing == 0
                else f"{missing} of this worker's samples from it count as bad and are replaced")
        log.warning("rank %d worker %d: %s; %s (set data.bad_samples=fail to stop instead)",
                    self.rank, lane, error, lost)

    def _readable(self, index: int, lane: int) -> Iterator[RawSample]:
        """A whole shard, for the modes without positions (resampled, evaluation): with bad_samples="skip" a
        shard that cannot be read to its end gives what it can and is logged."""
        try:
            yield from self.source.iter_shard(index)
        except ShardError as e:
            self._unreadable(e, lane, None)

    def _bad(self, sample: RawSample | _Unread, error: ShardError, lane: int) -> None:
        if self.bad_samples == "fail":
            raise error
        self.bad_count += 1
        with self.bad_total.get_lock():
            self.bad_total.value += 1
        if isinstance(sample, _Unread):
            return  # its shard was logged once, by _unreadable
        log.warning("skipping a bad sample (%d this epoch in rank %d worker %d): %s; set data.bad_samples=fail "
                    "to stop instead", self.bad_count, self.rank, lane, error)

    def take_bad(self) -> int:
        """Bad samples met since the last call by every worker of this rank (call in the main process)."""
        total = self.bad_total.value
        new, self._bad_reported = total - self._bad_reported, total
        return new


class TrainingStream(_Stream):
    """Training: yields transform(sample, rng) for this rank's and this worker's part of one epoch.

    The shards, in an order shuffled by (seed, epoch), are read as one circular sequence of samples, and every
    lane (a DataLoader worker of a rank) takes its own contiguous range of it, of exactly `batches_per_lane()`
    full batches; when shuffled, the ranges start at an offset drawn by (seed, epoch), so the remainder (under
    one batch per lane) is a different run of samples each epoch, even with a single shard. So every rank steps
    together, an epoch delivers each sample at most once, and the DataLoader's in-order round robin over lanes
    is exact. Samples are shuffled in a buffer per lane, and the training loader (make_loader) mixes each round
    of the lanes' batches, so that a batch draws from the whole of the rank's range. The position in an epoch
    is one number, the batches consumed; resuming from it skips the samples already delivered without decoding
    them. Each sample's `rng` is seeded by its place in the epoch, so crops after a resume equal those of an
    uninterrupted run. With `resampled`, lanes instead draw whole shards with replacement, seeded by
    (seed, epoch, rank, lane): for datasets with fewer shards than ranks x workers.

    A bad sample is replaced by the next good sample of the lane (so batch counts stay equal). A shard that
    cannot be read to the end of the lane's range (truncated, a refused member, or fewer samples than its
    manifest says) is logged once, and with "skip" each sample it could not give is counted as bad and
    replaced the same way.

    state_dict() / load_state_dict(): the position, with the layout it is valid for (what decides which
    sample lands where); loading a state whose layout differs raises LoaderStateError naming what changed."""

    def __init__(self, source: ShardSource, transform: Callable[[RawSample, np.random.Generator], object],
                 seed: int, shuffle: bool, rank: int = 0, world: int = 1, workers: int = 0,
                 batch_size: int = 0, shuffle_buffer: int = 1000, bad_samples: str = "skip", resampled: bool = False):
        if batch_size < 1:
            raise ValueError(f"a training stream needs a batch size of at least 1, got {batch_size}")
        super().__init__(source, transform, seed, shuffle, rank, world, workers, shuffle_buffer, bad_samples)
        self.batch_size, self.resampled = batch_size, resampled

    def layout(self) -> dict:
        """What must not change for a resume to be exact: everything that decides which sample lands where.
        (The shards' content is not in it: re-encoded shards with the same keys and counts resume exactly.)"""
        sizes = hashlib.sha256(",".join(map(str, self.source.counts)).encode()).hexdigest()[:12]
        keys = getattr(self.source, "keys", None)  # a subset with the same counts would land on other samples
        subset = {"keys": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]} if keys else {}
        return {**subset, "world": self.world, "workers": self.workers, "batch_size": self.batch_size,
                "seed": self.seed, "shards": len(self.source.counts), "samples": sum(self.source.counts), "shard_sizes": sizes,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer if self.shuffle else None,
                "resampled": self.resampled, "order_version": ORDER_VERSION}

    def state_dict(self) -> dict:
        """The position (epoch, batches consumed, and what each worker has delivered of the epoch, for the
        record) with the layout it is valid for."""
        lanes, done = self.lanes, self.batches_done
        delivered = [(done // lanes + (lane < done % lanes)) * self.batch_size for lane in range(lanes)]
        return {**self.layout(), "epoch": self.epoch, "batches_done": done, "samples_per_worker": delivered}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s position; LoaderStateError, naming what changed, when its layout is not this one."""
        if "shard_sizes" not in state:
            raise LoaderStateError(f"{self.source.split_dir}: the checkpoint's loader state is from an older version "
                                   "(no shard sizes; samples were laid out differently then), so its position cannot "
                                   "be resumed exactly; start a new run, or continue from its weights at an epoch start")
        changed = ", ".join(f"{k} {state.get(k)} -> {v}" for k, v in self.layout().items() if state.get(k) != v)
        if state.get("order_version") != ORDER_VERSION:
            raise LoaderStateError(f"{self.source.split_dir}: the data layout changed since the checkpoint ({changed}): "
                                   "it was written under other rules for putting samples in batches (an earlier "
                                   "version), so its position cannot be resumed exactly; move the stage's ckpt/ away "
                                   "to train it afresh")
        if changed:
            raise LoaderStateError(f"{self.source.split_dir}: the data layout changed since the checkpoint ({changed}); "
                                   "resume with the same data.num_workers, batch size, shuffle settings and shards")
        self.set_position(state["epoch"], state["batches_done"])

    def batches_per_lane(self) -> int:
        """Full batches each lane yields in any epoch."""
        lanes = self.world * self.lanes
        if len(self.source.counts) < lanes and not self.resampled:
            raise LoaderStateError(
                f"{self.source.split_dir}: {len(self.source.counts)} shards for {self.world} ranks x {self.lanes} "
                "workers; every worker needs a shard of its own: build more, smaller shards (unfused-shards build "
                "--shard-samples), lower data.num_workers, or set data.resampled=true")
        q = sum(self.source.counts) // (lanes * self.batch_size)
        if q == 0:
            raise LoaderStateError(
                f"{self.source.split_dir}: {sum(self.source.counts)} samples cannot give each of {self.world} "
                f"ranks x {self.lanes} workers a full batch of {self.batch_size}; lower the batch size or "
                "data.num_workers")
        return q

    def batches_per_epoch(self) -> int:
        return self.batches_per_lane() * self.lanes

    def _lane(self, lane: int):
        quota = self.batches_per_lane() * self.batch_size
        # Batch n is lane n % lanes's. The loader mixes each round of `lanes` batches (one per lane, see
        # TrainingLoader), so a position inside a round restarts every lane at the round's start, and the
        # loader drops the round's batches already consumed.
        mine = self.batches_done // self.lanes

        def samples() -> Iterator[RawSample]:
            raw = self._resampled(lane) if self.resampled else self._range(lane, quota)
            if self.shuffle:
                raw = buffer_shuffle(raw, self.shuffle_buffer,
                                     np.random.default_rng([self.seed, self.epoch, self.rank, lane]))
            return raw

        yield from self._deliver(samples, quota, mine * self.batch_size, lane)

    def _range(self, lane: int, quota: int) -> Iterator[RawSample | _Unread]:
        """This lane's contiguous range of the epoch's circular sample sequence (shards in shuffled order)."""
        counts = self.source.counts
        order, offset = np.arange(len(counts)), 0
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order, offset = rng.permutation(order), int(rng.integers(sum(counts)))
        for start, stop in circular(offset + (self.rank * self.lanes + lane) * quota, quota, sum(counts)):
            pos = 0
            for i in order:
                n = counts[i]
                if pos < stop and pos + n > start:
                    yield from self._shard_range(int(i), max(0, start - pos), min(n, stop - pos), lane)
                pos += n

    def _shard_range(self, index: int, lo: int, hi: int, lane: int) -> Iterator[RawSample | _Unread]:
        """Samples lo..hi-1 of a shard, read to its end only when hi is its manifest count, and then checked
        to hold no more. What stops it short (a ShardError, or fewer samples than the manifest says) fails the
        run with bad_samples="fail"; with "skip" it is logged once and each position it could not fill gets
        an _Unread, a bad sample for _deliver: positions stay where the manifest puts them."""
        n, read = self.source.counts[index], 0
        try:
            for j, s in enumerate(self.source.iter_shard(index)):
                if j == n:
                    raise ShardError(f"{self.source.path(index)}: holds more samples than the {n} its manifest "
                                     "lists; run `unfused-shards verify` and rebuild it")
                if j >= lo:
                    yield s
                read = j + 1
                if read == hi < n:
                    return
            if read < hi:
                raise ShardError(f"{self.source.path(index)}: ends after {read} samples where its manifest lists "
                                 f"{n}; run `unfused-shards verify` and rebuild it")
        except ShardError as e:
            missing = hi - max(read, lo)
            self._unreadable(e, lane, missing)
            yield from (_Unread(e) for _ in range(missing))

    def _resampled(self, lane: int) -> Iterator[RawSample]:
        """Whole shards drawn with replacement, for ever (the caller stops)."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, lane, 1])
        empty: set[int] = set()  # shards that gave nothing: when all have, drawing more would loop for ever
        while len(empty) < len(self.source.counts):
            index, gave = int(rng.integers(len(self.source.counts))), False
            for s in self._readable(index, lane):
                gave = True
                yield s
            if not gave:
                empty.add(index)
        raise ShardError(f"{self.source.split_dir}: rank {self.rank} worker {lane} found no readable sample in any "
                         "shard; run `unfused-shards verify`")

    def _deliver(self, samples: Callable[[], Iterator[RawSample]], quota: int, skip: int, lane: int):
        """Positions skip..quota-1 of the lane's sequence, transformed. Position j gets the first sample
        that decodes among j, j+1, ... (wrapping to the start): deterministic, so a resume that skips
        to j yields what an uninterrupted run yields, and every lane yields exactly `quota - skip` items."""
        rng = PositionRng(self.seed, self.epoch, self.rank, lane)
        pending: list[int] = []  # positions whose own sample was bad, waiting for the next good one
        # resampled streams never end: past this many bad samples in a row, nothing in the shards decodes
        # (with 9 shards in 10 bad, a false alarm needs ~100 bad shard draws in a row: 3e-5)
        give_up = 10 * sum(self.source.counts) + 100
        streak = 0
        for j, s in enumerate(samples()):
            if j >= quota and not pending:
                return
            if j < skip:  # delivered before the resume point: never decoded
                continue
            positions = pending + [j] if j < quota else pending
            try:
                if isinstance(s, _Unread):
                    raise s.error
                items = [self.transform(s, rng.at(p)) for p in positions]
            except ShardError as e:
                self._bad(s, e, lane)
                if j < quota:
                    pending.append(j)
                streak += 1
                if streak > give_up:
                    raise ShardError(f"{self.source.split_dir}: rank {self.rank} worker {lane} found no sample it "
                                     f"could decode in {streak} draws; run `unfused-shards verify`") from None
                continue
            pending.clear()
            streak = 0
            yield from items
        if pending:  # the lane's last samples were bad: wrap around to its first good one
            for s in samples():
                try:
                    if isinstance(s, _Unread):
                        raise s.error
                    items = [self.transform(s, rng.at(p)) for p in pending]
                except ShardError:
                    continue
                yield from items
                return
            raise ShardError(f"{self.source.split_dir}: rank {self.rank} worker {lane} found no sample it "
                             "could decode in its shards; run `unfused-shards verify`")


class EvaluationStream(_Stream):
    """Evaluation: every sample once (a bad one left out), in shard order when `shuffle` is off; shards dealt
    round-robin to ranks, then to workers. The loader keeps the last partial batch."""

    def _lane(self, lane: int):
        plan = assign_shards(len(self.source.counts), self.seed, self.epoch, self.world, self.lanes, self.shuffle)
        samples = (s for i in plan[self.rank][lane] for s in self._readable(i, lane))
        if self.shuffle:
            samples = buffer_shuffle(samples, self.shuffle_buffer,
                                     np.random.default_rng([self.seed, self.epoch, self.rank, lane]))
        rng = PositionRng(self.seed, self.epoch, self.rank, lane)
        for j, s in enumerate(samples):
            try:
                yield self.transform(s, rng.at(j))
            except ShardError as e:
                self._bad(s, e, lane)


@dataclass(frozen=True)
class _Unread:
    """A position of a lane's range whose sample its shard could not give."""
    error: ShardError

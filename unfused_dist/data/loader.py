"""Streaming training data: shards split across ranks and DataLoader workers, seeded shuffles, and the
same number of batches on every rank (so collectives never hang on uneven shards)."""
from __future__ import annotations

import atexit
import gc
import hashlib
import logging
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..engine.preemption import ignore_in_workers
from .batchpool import Mixing, PooledLoader, collate, new_iteration
from .manifest import DatasetManifest
from .shards import LabelAlignmentError, RawSample, ShardError, ShardUnavailable, iter_shard, iter_shard_with_labels

log = logging.getLogger(__name__)

# DataLoader workers start from a fork server, never by forking the training process itself: that process
# has threads (the metrics HTTP server, tqdm's monitor, the last epoch's queue feeders), and CPython 3.11
# can deadlock a child forked while one of them starts or ends (seen: a fine-tuning rank hung forever in
# os.fork() at the start of an epoch while the other waited in all_reduce). The server preloads what
# every worker needs, so starting one stays cheap (evaluation loaders start theirs each time they run).
WORKER_CONTEXT = mp.get_context("forkserver")
# A program run as `python -m NAME` (torchrun ranks, submitit jobs) is re-run as __mp_main__ in every worker:
# preloading NAME in the server makes that re-run find its imports done.
_MAIN_MODULE = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
WORKER_CONTEXT.set_forkserver_preload(["__main__", *([_MAIN_MODULE] if _MAIN_MODULE else []),
                                       "unfused_dist.data.loader", "unfused_dist.data.transforms"])


@atexit.register  # after multiprocessing's own exit handler, so it runs before it
def _kill_workers_left_open() -> None:
    """At exit multiprocessing SIGTERMs its daemonic children and joins them. Workers ignore SIGTERM
    (engine.preemption.ignore_in_workers), so a loader still open then (an iterator kept alive by a
    traceback, say) would hang the exit: kill them outright."""
    for child in mp.active_children():
        if child.daemon:
            child.kill()


@dataclass(frozen=True)
class _WorkerInit:
    """DataLoader worker_init_fn.

    It freezes the objects the worker inherited (torch, numpy, the fork server's preloads, ~170k of them)
    out of the garbage collector's reach: the first full collection would otherwise walk them all, ~90 ms
    per worker, and write to every page that holds one, turning ~30 MiB per worker from shared to private
    (measured in benchmarks/RESULTS.md, "Frozen inherited objects"). They live as long as the worker anyway.

    A worker's parent is the fork server, which lives as long as any of its children, so torch's own
    watchdog (it watches the parent) never sees the training process die, say of SIGKILL: this watches
    that process instead and ends the worker once it is gone."""
    owner: int  # the training process's pid

    def __call__(self, worker_id: int) -> None:
        gc.freeze()
        ignore_in_workers(worker_id)
        threading.Thread(target=_exit_when_gone, args=(self.owner,), daemon=True, name="owner-watch").start()


def _exit_when_gone(pid: int, every_s: float = 1.0) -> None:
    while _alive(pid):
        time.sleep(every_s)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def assign_shards(n_shards: int, seed: int, epoch: int, world: int, lanes: int,
                  shuffle: bool) -> list[list[list[int]]]:
    """Evaluation: plan[rank][lane] = shard indices (a lane is a DataLoader worker, or the main process).
    The order is shuffled by (seed, epoch), then dealt round-robin."""
    order = np.arange(n_shards)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    plan = [[[] for _ in range(lanes)] for _ in range(world)]
    for i, shard in enumerate(order):
        plan[i % world][(i // world) % lanes].append(int(shard))
    return plan


class LoaderStateError(ValueError):
    pass


# The rules that put samples in batches; part of the layout, so a checkpoint written under other rules is
# refused instead of resumed onto other samples. 2 (issue 18): the shuffle buffer fills before it yields,
# and the rows of each round of batches are mixed across the workers.
ORDER_VERSION = 2


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


class ShardStream(IterableDataset):
    """Yields transform(sample, rng) for this rank's and this worker's part of one epoch.

    Training mode (`batch_size` set): the shards, in an order shuffled by (seed, epoch), are read as one
    circular sequence of samples, and every lane (a DataLoader worker of a rank) takes its own contiguous
    range of it, of exactly `batches_per_lane()` full batches; when shuffled, the ranges start at an offset
    drawn by (seed, epoch), so the remainder (under one batch per lane) is a different run of samples each
    epoch, even with a single shard. So every rank steps together, an epoch delivers each sample at most once, and
    the DataLoader's in-order round robin over lanes is exact. Samples are shuffled in a buffer per lane, and
    the training loader (make_loader) mixes each round of the lanes' batches, so that a batch draws from the
    whole of the rank's range. The position in an epoch is one number, the batches consumed; resuming from it
    skips the samples already delivered without decoding them.
    Each sample's `rng` is seeded by its place in the epoch, so crops after a resume equal those of an
    uninterrupted run. With `resampled`, lanes instead draw whole shards with replacement, seeded by
    (seed, epoch, rank, lane): for datasets with fewer shards than ranks x workers.

    A sample that fails to decode (ShardError) is logged by shard and key and, with bad_samples="skip",
    replaced by the next good sample of the lane (so batch counts stay equal); "fail" re-raises it. A shard
    that cannot be read to the end of the lane's range (truncated, a refused member, or fewer samples than its
    manifest says) is logged once, and with "skip" each sample it could not give is counted as bad and
    replaced the same way. Label shards out of line with their audio shards always stop the run.

    Evaluation mode (`batch_size` None): every sample once, in shard order when `shuffle` is off."""

    def __init__(self, source: ShardSource, transform: Callable[[RawSample, np.random.Generator], object],
                 seed: int, shuffle: bool, rank: int = 0, world: int = 1, workers: int = 0,
                 batch_size: int | None = None, shuffle_buffer: int = 1000, bad_samples: str = "skip",
                 resampled: bool = False):
        if bad_samples not in ("skip", "fail"):
            raise ValueError(f"bad_samples must be 'skip' or 'fail', got {bad_samples!r}")
        self.source, self.transform = source, transform
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.workers, self.batch_size, self.shuffle_buffer = workers, batch_size, shuffle_buffer
        self.bad_samples, self.resampled = bad_samples, resampled
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
        return {**self.layout(), "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        if "shard_sizes" not in state:
            raise LoaderStateError(f"{self.source.split_dir}: the checkpoint's loader state is from an older version "
                                   "(no shard sizes; samples were laid out differently then), so its position cannot "
                                   "be resumed exactly; start a new run, or continue from its weights at an epoch start")
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in self.layout().items() if state.get(k) != v]
        if changed:
            raise LoaderStateError(f"{self.source.split_dir}: the data layout changed since the checkpoint "
                                   f"({', '.join(changed)}); resume with the same settings or start a new run")
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

    def __iter__(self):
        info = get_worker_info()
        new_iteration()
        self.epoch, self.batches_done = self._shared_position[:]  # in a worker: what set_position wrote last
        self.bad_count = 0
        lane = info.id if info else 0
        if self.batch_size is None:
            yield from self._evaluation(lane)
            return
        quota = self.batches_per_lane() * self.batch_size
        # Batch n is lane n % lanes's. The loader mixes each round of `lanes` batches (one per lane, see
        # TrainingLoader), so a position inside a round restarts every lane at the round's start, and the
        # loader drops the round's batches already consumed.
        mine = self.batches_done // self.lanes

        def samples() -> Iterator[RawSample]:
            raw = self._resampled(lane) if self.resampled else self._range(lane, quota)
            if self.shuffle:
                raw = _buffer_shuffle(raw, self.shuffle_buffer,
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
        for start, stop in _circular(offset + (self.rank * self.lanes + lane) * quota, quota, sum(counts)):
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

    def _evaluation(self, lane: int):
        plan = assign_shards(len(self.source.counts), self.seed, self.epoch, self.world, self.lanes, self.shuffle)
        samples = (s for i in plan[self.rank][lane] for s in self._readable(i, lane))
        if self.shuffle:
            samples = _buffer_shuffle(samples, self.shuffle_buffer,
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


def _circular(start: int, length: int, total: int) -> list[tuple[int, int]]:
    """[start, start + length) of a circular sequence of `total` items (length <= total), as at most two
    ranges of positions."""
    start %= total
    if start + length <= total:
        return [(start, start + length)]
    return [(start, total), (0, start + length - total)]


class PositionRng:
    """A random generator for each position of a lane's epoch, deterministic in (seed, epoch, rank, lane,
    position) whatever came before: so a resume that skips positions draws what an uninterrupted run draws.

    Philox is counter-based: keyed by (seed, epoch, rank, lane) with the position in the counter's top word,
    each position has its own stream of 2**192 blocks. Setting that state costs ~2 us, against ~20 us for
    seeding a new default_rng per sample, which at thousands of clips/s per worker was 2 % of the worker.
    `at` returns the same Generator object each time, re-positioned: use it within the call only."""

    def __init__(self, *key: int):
        self._bits = np.random.Philox(key=np.random.SeedSequence(list(key)).generate_state(2, np.uint64))
        self._state = self._bits.state  # a copy: its counter is set per position, its buffer stays empty
        self._generator = np.random.Generator(self._bits)

    def at(self, position: int) -> np.random.Generator:
        self._state["state"]["counter"][3] = position
        self._bits.state = self._state
        return self._generator


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle through a buffer of `size` items: it fills before the first item goes out, then each item in
    sends a random one out. A buffer that yields before it is full draws the first batches of every epoch from
    the first few items of a worker's range: on a dataset sorted by label, a few classes (issue 18: yielding
    after 64 items took the demo's fine-tuning from scratch from 0.455 to 0.110). Filling costs reading, not
    decoding: the buffer holds the members' bytes (benchmarks/loader.py prints the wait for the first batch)."""
    items, draws = iter(items), _draws(rng)
    buf = list(islice(items, size))
    for item in items:
        i = next(draws) % len(buf)  # modulo bias: len(buf) / 2**62, none in practice
        buf[i], item = item, buf[i]
        yield item
    while buf:
        yield _pop(buf, next(draws))


def _draws(rng: np.random.Generator, block: int = 1024) -> Iterator[int]:
    """Random 62-bit integers, a block at a time: a numpy call per draw made the shuffle ~4x as costly per
    item (benchmarks/shard_reader.py)."""
    while True:
        yield from rng.integers(0, 1 << 62, size=block).tolist()


def _pop(buf: list, draw: int):
    """Remove and return buf[draw % len(buf)] (modulo bias: len(buf) / 2**62, none in practice)."""
    i = draw % len(buf)
    buf[i], buf[-1] = buf[-1], buf[i]  # O(1): the order of the rest does not matter
    return buf.pop()


class TrainingLoader(PooledLoader):
    """A training stream's loader. Each DataLoader worker reads its own contiguous range of the shards, so
    one worker's batches come from part of the data only (on a dataset sorted by label, from part of the
    classes). The loader therefore mixes the rows of each round of `lanes` consecutive batches (one from every
    worker) with a permutation seeded by (seed, epoch, rank, round): every batch draws from every worker's
    range, as a uniform sample of the rank's data would. Deterministic, so a resume yields what an
    uninterrupted run yields; a resume inside a round decodes that round's first batches again."""

    def mixing(self) -> Mixing | None:
        stream: ShardStream = self.dataset
        if stream.lanes == 1:
            return None
        rows = stream.lanes * stream.batch_size
        key = (stream.seed, stream.epoch, stream.rank)

        def order(round_: int) -> np.ndarray:
            return np.random.default_rng([*key, round_, 2]).permutation(rows)
        return Mixing(stream.lanes, order, stream.batches_done // stream.lanes, stream.batches_done % stream.lanes)


def make_loader(stream: ShardStream, batch_size: int | None = None) -> DataLoader:
    """Training streams batch with their own batch size (full batches only), mixed across workers
    (TrainingLoader); evaluation streams keep the last partial batch.

    A training loader is made once and iterated once per epoch, `stream.set_position` before each: its
    workers persist (starting them costs ~0.1 s each, a tenth of a short epoch on small machines) and each
    new iteration re-reads the position. An evaluation loader is iterated once."""
    training = stream.batch_size is not None
    if stream.workers:
        _check_picklable(stream.transform)
    return (TrainingLoader if training else PooledLoader)(
        stream, batch_size=stream.batch_size if training else batch_size,
        num_workers=stream.workers, drop_last=training,
        persistent_workers=training and stream.workers > 0,
        collate_fn=collate, worker_init_fn=_WorkerInit(os.getpid()),
        multiprocessing_context=WORKER_CONTEXT if stream.workers else None,
        # its own generator: a DataLoader otherwise draws its workers' seed from torch's global
        # RNG, and a resume (which starts a new DataLoader mid-epoch) would shift that stream
        generator=torch.Generator().manual_seed(stream.seed))


def _check_picklable(transform: Callable) -> None:
    try:
        pickle.dumps(transform)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ValueError(f"the stream's transform {transform!r} cannot be pickled ({e}); DataLoader workers "
                         "start from a fork server and receive it pickled: make it a module-level function "
                         "or a dataclass with __call__ (see unfused_dist/data/transforms.py), or use "
                         "data.num_workers=0") from None

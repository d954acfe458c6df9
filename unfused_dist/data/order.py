"""The order of an epoch's samples: which shards a lane reads, the shuffle buffer, and a random generator
per position, all deterministic in (seed, epoch, rank, lane), so a resume draws what an uninterrupted run
draws."""
from __future__ import annotations

from itertools import islice
from typing import Iterator

import numpy as np


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


def circular(start: int, length: int, total: int) -> list[tuple[int, int]]:
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


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
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

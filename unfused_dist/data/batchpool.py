"""Batches from DataLoader workers to the training process through shared memory that is reused.

torch sends each batch tensor a worker makes in a new shared-memory segment: the worker creates, zeroes and
page-faults it, hands over its file descriptor (a socket connection and an hmac handshake per batch), and
the training process maps and faults it once more. Here each worker stacks its batches into a few buffers
it keeps (BatchPool); a buffer crosses to the training process once per iteration, and a batch after that
is a few bytes naming the buffer. The training process copies the batch out and marks the buffer free
(PooledLoader), so what it yields is the caller's to keep. When all of a worker's buffers of that shape
are still unconsumed the batch goes torch's way instead: nothing ever waits on the pool. With it,
`benchmarks/loader.py` (1 s clips, log-mel, 2 workers) went from 0.65-0.84 to 0.81-0.93 of the CPU limit and
from 0.86-1.05 to 1.01-1.17 of a per-file DataLoader (benchmarks/RESULTS.md).

The pool is per worker process and learns of a new iteration from the dataset (`new_iteration()`, called
by the streams' __iter__): then the DataLoader has dropped the last iteration's unconsumed batches, and the
training process has forgotten the buffers it was sent.

A loader may also mix rows among consecutive batches (`PooledLoader.mixing`, which the training loader uses
to mix each round of its workers' batches): the rows are gathered out of the buffers in the same single copy."""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info


def collate(items: list) -> tuple:
    """Items are tuples (a batch kind, data.transforms, or plain) of (np.ndarray | int | str); field by field,
    stack arrays, tensor ints, list strings, into a batch of the items' kind. In a worker,
    arrays go into a pooled buffer when one is free, else through torch's default_collate (which in a worker
    stacks straight into a new shared-memory segment)."""
    pool = BatchPool.in_this_worker() if get_worker_info() is not None else None
    out = []
    for col in zip(*items):
        if isinstance(col[0], np.ndarray):
            tensors = [torch.from_numpy(a) for a in col]
            pooled = pool.stack(tensors) if pool else None
            out.append(pooled if pooled is not None else default_collate(tensors))
        elif isinstance(col[0], (int, np.integer)):
            out.append(torch.tensor(col, dtype=torch.long))
        else:
            out.append(list(col))
    return same_kind(items[0], out)


def same_kind(like: tuple, fields) -> tuple:
    """`fields` as a batch of the kind of `like` (a NamedTuple batch kind, or a plain tuple)."""
    return like._make(fields) if hasattr(like, "_make") else tuple(fields)


def new_iteration() -> None:
    """Call at the start of each iteration of a dataset that a PooledLoader's workers iterate."""
    if get_worker_info() is not None:
        BatchPool.in_this_worker().reset()


@dataclass
class Pooled:
    """A batch column waiting in buffer `slot` of worker `pid`'s pool. In each iteration the buffer travels
    with the slot's first batch and the pool's busy flags with the worker's first batch; otherwise None."""
    pid: int
    slot: int
    buffer: torch.Tensor | None
    busy: torch.Tensor | None


class BatchPool:
    """One worker's batch buffers, in shared memory, and a busy flag for each (1: holds a batch the
    training process has not copied out yet)."""
    SLOTS = 32
    PER_SHAPE = 6  # a worker has at most prefetch_factor (2 by default) + 1 batches unconsumed
    _mine: BatchPool | None = None

    @classmethod
    def in_this_worker(cls) -> BatchPool:
        if cls._mine is None:
            cls._mine = cls()
        return cls._mine

    def __init__(self):
        self.busy = torch.zeros(self.SLOTS, dtype=torch.uint8).share_memory_()
        self._busy = self.busy.numpy()
        self.buffers: list[torch.Tensor] = []
        self.by_shape: dict[tuple, list[int]] = {}
        self.reset()

    def reset(self) -> None:
        self._busy[:] = 0
        self.sent: set[int] = set()  # slots whose buffer the training process has this iteration

    def stack(self, tensors: list[torch.Tensor]) -> Pooled | None:
        """The tensors stacked into a free buffer of their shape, or None when there is none (or when they
        differ in shape or dtype: default_collate then says how)."""
        first = tensors[0]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
            return None
        shape = (len(tensors), *first.shape)
        slots = self.by_shape.setdefault((shape, first.dtype), [])
        slot = next((i for i in slots if not self._busy[i]), None)
        if slot is None:
            if len(slots) == self.PER_SHAPE or len(self.buffers) == self.SLOTS:
                return None
            slot = len(self.buffers)
            self.buffers.append(torch.empty(shape, dtype=first.dtype).share_memory_())
            slots.append(slot)
        torch.stack(tensors, out=self.buffers[slot])
        self._busy[slot] = 1
        pooled = Pooled(os.getpid(), slot, None if slot in self.sent else self.buffers[slot],
                        None if self.sent else self.busy)
        self.sent.add(slot)
        return pooled


@dataclass
class Mixing:
    """Rows mixed among each round of `size` consecutive batches: row q of a round's output (batch q // b, row
    q % b, for batches of b rows) is row `order(r)[q]` of the round's input batches laid end to end, r counting
    rounds from `first_round`. The first `skip` output batches are dropped (a resume inside a round)."""
    size: int
    order: Callable[[int], np.ndarray]
    first_round: int = 0
    skip: int = 0


class PooledLoader(DataLoader):
    """A DataLoader (collate_fn=collate) that copies pooled batch columns out of the workers' buffers, and
    mixes rows among consecutive batches when `mixing()` says so."""

    def mixing(self) -> Mixing | None:
        """How this iteration mixes rows among its batches (None: it does not). Read when iteration starts."""
        return None

    def __iter__(self):
        batches = super().__iter__()
        if self.num_workers == 0:
            return batches
        # what this iteration's workers have sent: kept on the loader, not in the generator, because a
        # persistent-worker DataLoader has one iterator that an older generator would read from too
        self._buffers: dict[tuple[int, int], np.ndarray] = {}
        self._busy: dict[int, np.ndarray] = {}
        mixing = self.mixing()
        return self._copied_out(batches) if mixing is None else self._mixed_out(batches, mixing)

    def _copied_out(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        for batch in batches:
            yield same_kind(batch, [self._take(col) if isinstance(col, Pooled) else col for col in batch])

    def _mixed_out(self, batches: Iterator[tuple], mixing: Mixing) -> Iterator[tuple]:
        skip, r = mixing.skip, mixing.first_round
        while round_ := list(islice(batches, mixing.size)):
            order = mixing.order(r)
            columns = [self._mix_column(pieces, order) for pieces in zip(*round_)]
            for batch in list(zip(*columns))[skip:]:
                yield same_kind(round_[0], batch)
            skip, r = 0, r + 1

    def _mix_column(self, pieces: tuple, order: np.ndarray) -> list:
        """One column of a round: its output batches, each row gathered straight from the input it comes from."""
        if isinstance(pieces[0], list):  # strings (keys): plain Python
            flat = [x for piece in pieces for x in piece]
            rows = [flat[i] for i in order]
            n = len(pieces[0])
            return [rows[k * n:(k + 1) * n] for k in range(len(pieces))]
        arrays = [self._view(p) if isinstance(p, Pooled) else p.numpy() for p in pieces]
        n = len(arrays[0])
        if any(a.shape != arrays[0].shape or a.dtype != arrays[0].dtype for a in arrays):
            raise ValueError(f"batches to mix differ in shape or type: {[(a.shape, a.dtype) for a in arrays]}")
        source, row = np.divmod(order, n)
        out = []
        for k in range(len(arrays)):
            batch = np.empty_like(arrays[0])
            src, rows = source[k * n:(k + 1) * n], row[k * n:(k + 1) * n]
            for j, a in enumerate(arrays):
                here = np.flatnonzero(src == j)
                batch[here] = a[rows[here]]
            out.append(torch.from_numpy(batch))
        for p in pieces:
            if isinstance(p, Pooled):
                self._release(p)
        return out

    def _take(self, col: Pooled) -> torch.Tensor:
        # numpy copies in this thread; torch's clone would wake its thread pool, which then spins on the
        # cores the workers need
        batch = torch.from_numpy(self._view(col).copy())
        self._release(col)
        return batch

    def _view(self, col: Pooled) -> np.ndarray:
        """The worker's buffer holding the column: valid until _release."""
        if col.busy is not None:
            self._busy[col.pid] = col.busy.numpy()
        if col.buffer is not None:
            self._buffers[col.pid, col.slot] = col.buffer.numpy()
        buffer = self._buffers.get((col.pid, col.slot))
        if buffer is None:
            raise RuntimeError(f"worker {col.pid} named its buffer {col.slot} without sending it this iteration: "
                               "its dataset must call batchpool.new_iteration() when each iteration starts")
        return buffer

    def _release(self, col: Pooled) -> None:
        self._busy[col.pid][col.slot] = 0  # copied out: the worker may refill it

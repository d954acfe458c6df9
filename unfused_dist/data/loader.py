"""DataLoaders over the streams: a training loader mixes each round of its workers' batches; evaluation
loaders keep the last partial batch."""
from __future__ import annotations

import os
import pickle
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .batchpool import Mixing, PooledLoader, collate
from .stream import EvaluationStream, TrainingStream
from .workers import WORKER_CONTEXT, WorkerInit


class TrainingLoader(PooledLoader):
    """A training stream's loader. Each DataLoader worker reads its own contiguous range of the shards, so
    one worker's batches come from part of the data only (on a dataset sorted by label, from part of the
    classes). The loader therefore mixes the rows of each round of `lanes` consecutive batches (one from every
    worker) with a permutation seeded by (seed, epoch, rank, round): every batch draws from every worker's
    range, as a uniform sample of the rank's data would. Deterministic, so a resume yields what an
    uninterrupted run yields; a resume inside a round decodes that round's first batches again."""

    def mixing(self) -> Mixing | None:
        stream: TrainingStream = self.dataset
        if stream.lanes == 1:
            return None
        rows = stream.lanes * stream.batch_size
        key = (stream.seed, stream.epoch, stream.rank)

        def order(round_: int) -> np.ndarray:
            return np.random.default_rng([*key, round_, 2]).permutation(rows)
        return Mixing(stream.lanes, order, stream.batches_done // stream.lanes, stream.batches_done % stream.lanes)


def make_loader(stream: TrainingStream | EvaluationStream, batch_size: int | None = None) -> DataLoader:
    """Training streams batch with their own batch size (full batches only), mixed across workers
    (TrainingLoader); evaluation streams keep the last partial batch.

    A training loader is made once and iterated once per epoch, `stream.set_position` before each: its
    workers persist (starting them costs ~0.1 s each, a tenth of a short epoch on small machines) and each
    new iteration re-reads the position. An evaluation loader is iterated once."""
    training = isinstance(stream, TrainingStream)
    if stream.workers:
        _check_picklable(stream.transform)
    return (TrainingLoader if training else PooledLoader)(
        stream, batch_size=stream.batch_size if training else batch_size,
        num_workers=stream.workers, drop_last=training,
        persistent_workers=training and stream.workers > 0,
        collate_fn=collate, worker_init_fn=WorkerInit(os.getpid()),
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


class EpochLoader:
    """A training stream's batches, epoch by epoch, for the trainer (engine.module.TrainData): `batches(epoch,
    start)` from a position, and the stream's state (position and layout) to save and to resume from. One
    DataLoader, made once: its workers persist across epochs. `after_batch` runs after each batch is taken
    (the stages count the bad samples the workers skipped there)."""

    def __init__(self, stream: TrainingStream, after_batch: Callable[[], None] | None = None):
        self.stream, self.after_batch = stream, after_batch
        self.loader = make_loader(stream)

    def batches(self, epoch: int, start: int):
        self.stream.set_position(epoch, start)
        for batch in self.loader:
            if self.after_batch:
                self.after_batch()
            yield batch

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.stream.set_position(epoch, batches_done)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

"""What the trainer trains: the contract between `Trainer` and a stage's module, stated once.

A `TrainModule` is an `nn.Module` whose `forward(*batch)` returns `(loss, logs)`: the scalar loss to
minimise and a dict of scalar tensors to log (kept on the device; the trainer reads them in one transfer).
Three hooks have defaults, so a module overrides only what it has:
- `rank_state()` / `load_rank_state(state)`: this rank's own state beyond weights (an augmentation
  generator, a memory bank), saved in every checkpoint (tensors and plain values only: loaded weights-only);
- `after_step()`: called after every optimizer micro-step (e.g. a momentum-encoder update).

`TrainData` is the other side: where the trainer's batches come from, and the data's part of a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from torch import nn


class TrainModule(nn.Module):
    def rank_state(self) -> dict:
        return {}

    def load_rank_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no per-rank state, but the checkpoint holds {sorted(state)}")

    def after_step(self) -> None:
        pass


class TrainData(Protocol):
    """What Trainer.fit reads its batches from (data.loader.EpochLoader for a shard stream): an epoch's batches
    from a position, and that position as state, saved in every checkpoint and loaded on resume, where a
    state that cannot be resumed exactly raises, naming what changed."""

    def batches(self, epoch: int, start: int) -> Iterable: ...

    def set_position(self, epoch: int, batches_done: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class InMemoryData:
    """TrainData over batches computed from (epoch, start) (tensors in memory, e.g. a linear probe's
    features): its position is the trainer's step count, so its state holds nothing more."""
    batches_from: Callable[[int, int], Iterable]

    def batches(self, epoch: int, start: int) -> Iterable:
        return self.batches_from(epoch, start)

    def set_position(self, epoch: int, batches_done: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

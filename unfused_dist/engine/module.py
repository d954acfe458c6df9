"""What the trainer trains: the contract between `Trainer` and a stage's module, stated once.

A `TrainModule` is an `nn.Module` whose `forward(*batch)` returns `(loss, logs)`: the scalar loss to
minimise and a dict of scalar tensors to log (kept on the device; the trainer reads them in one transfer).
Three hooks have defaults, so a module overrides only what it has:
- `rank_state()` / `load_rank_state(state)`: this rank's own state beyond weights (an augmentation
  generator, a memory bank), saved in every checkpoint (tensors and plain values only: loaded weights-only);
- `after_step()`: called after every optimizer micro-step (e.g. a momentum-encoder update).
"""
from __future__ import annotations

from torch import nn


class TrainModule(nn.Module):
    def rank_state(self) -> dict:
        return {}

    def load_rank_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no per-rank state, but the checkpoint holds {sorted(state)}")

    def after_step(self) -> None:
        pass

"""Per-sample transforms run inside DataLoader workers: RawSample -> the tuple a batch is collated from.

They are small frozen dataclasses, not closures, because the workers start from a fork server (see
`data.workers.WORKER_CONTEXT`) and receive the stream, transform included, pickled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..audio.frontend import FrontendConfig, centre_crop, random_crop
from .shards import RawSample


@dataclass(frozen=True)
class RandomCrop:
    """A random crop of `samples` at `sample_rate`; with_label: None, 'label' (true label id) or 'cls'
    (pseudo-label)."""
    samples: int
    sample_rate: int
    with_label: str | None = None

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> tuple:
        wave = random_crop(sample.audio(self.sample_rate), self.samples, rng)
        if self.with_label is None:
            return (wave,)
        return wave, (sample.cls() if self.with_label == "cls" else sample.label_id)


@dataclass(frozen=True)
class CentreCrop:
    """(centre crop, label id, key): what evaluation and embedding read."""
    samples: int
    sample_rate: int

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> tuple:
        return centre_crop(sample.audio(self.sample_rate), self.samples), sample.label_id, sample.key


@dataclass(frozen=True)
class WithShard:
    """`base`'s tuple plus the sample's shard name."""
    base: Callable[[RawSample, np.random.Generator], tuple]

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> tuple:
        return (*self.base(sample, rng), sample.shard)


def train_transform(audio: FrontendConfig, with_label: str | None, seconds: float | None = None) -> RandomCrop:
    """Random crop of `seconds` (default: the 0.95 s SSL/distillation crop)."""
    n = audio.crop_samples if seconds is None else int(round(seconds * audio.sample_rate))
    return RandomCrop(n, audio.sample_rate, with_label)


def eval_transform(audio: FrontendConfig, seconds: float) -> CentreCrop:
    return CentreCrop(int(round(seconds * audio.sample_rate)), audio.sample_rate)

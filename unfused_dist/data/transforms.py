"""Per-sample transforms run inside DataLoader workers: RawSample -> an item of one batch kind (below), which
the loader collates field by field into a batch of the same kind.

They are small frozen dataclasses, not closures, because the workers start from a fork server (see
`data.workers.WORKER_CONTEXT`) and receive the stream, transform included, pickled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from ..audio.frontend import FrontendConfig, centre_crop, random_crop
from .shards import RawSample


# The batch kinds: what a module's forward and a stage's loops read by name. (NamedTuples: the loader's
# pooling and mixing treat them as columns; `engine(**batch._asdict())` calls a module by field name.)
class Clips(NamedTuple):
    """Self-supervised training: waveforms only."""
    wave: Any


class LabelledClips(NamedTuple):
    """Supervised training: waveforms and the label the module learns (a true label id, or a pseudo-label)."""
    wave: Any
    label: Any


class KeyedClips(NamedTuple):
    """Evaluation and embedding: centre crops, true label ids (-1: unlabelled) and sample keys."""
    wave: Any
    label: Any
    key: Any


class ShardedClips(NamedTuple):
    """KeyedClips and the shard each clip came from (the embedding dump writes per shard)."""
    wave: Any
    label: Any
    key: Any
    shard: Any


@dataclass(frozen=True)
class RandomCrop:
    """A random crop of `samples` at `sample_rate`; with_label: None, 'label' (true label id) or 'cls'
    (pseudo-label)."""
    samples: int
    sample_rate: int
    with_label: str | None = None

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> Clips | LabelledClips:
        wave = random_crop(sample.audio(self.sample_rate), self.samples, rng)
        if self.with_label is None:
            return Clips(wave)
        return LabelledClips(wave, sample.cls() if self.with_label == "cls" else sample.label_id)


@dataclass(frozen=True)
class CentreCrop:
    """KeyedClips: what evaluation and embedding read."""
    samples: int
    sample_rate: int

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> KeyedClips:
        return KeyedClips(centre_crop(sample.audio(self.sample_rate), self.samples), sample.label_id, sample.key)


@dataclass(frozen=True)
class WithShard:
    """`base`'s KeyedClips plus the sample's shard name."""
    base: Callable[[RawSample, np.random.Generator], KeyedClips]

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> ShardedClips:
        return ShardedClips(*self.base(sample, rng), sample.shard)


def train_transform(audio: FrontendConfig, with_label: str | None, seconds: float | None = None) -> RandomCrop:
    """Random crop of `seconds` (default: the 0.95 s SSL/distillation crop)."""
    n = audio.crop_samples if seconds is None else int(round(seconds * audio.sample_rate))
    return RandomCrop(n, audio.sample_rate, with_label)


def eval_transform(audio: FrontendConfig, seconds: float) -> CentreCrop:
    return CentreCrop(int(round(seconds * audio.sample_rate)), audio.sample_rate)

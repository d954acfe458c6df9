"""Pieces every stage shares: sample transforms, normalisation stats, embedding a split, labelled subsets."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..audio.frontend import FrontendConfig, LogMel, Normalizer, centre_crop
from ..config import Config
from ..data.loader import EpochLoader, make_loader
from ..data.source import ShardSource
from ..data.stream import EvaluationStream, TrainingStream
from ..metrics.exporter import Metrics, stage_metrics
from ..data.transforms import eval_transform
from ..artefacts import mark_done
from ..engine.device import place, rank_device, to_device
from ..engine.distributed import init_distributed, is_main, rank_world
from ..engine.precision import fp32
from ..engine.export import export_encoder, full_state_dict
from ..engine.trainer import Trainer, write_history
from ..models.encoder import AudioNTT


class Features(nn.Module):
    """waveform batch -> normalised log-mel (B, 1, mels, frames)."""

    def __init__(self, audio: FrontendConfig, mean: float, std: float):
        super().__init__()
        self.logmel, self.norm = LogMel(audio), Normalizer(mean, std)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with fp32(wave):  # the STFT, mel sums, log and normalisation in fp32, also in mixed-precision runs
            return self.norm(self.logmel(wave.float()))


def norm_stats(source: ShardSource, audio: FrontendConfig, n_clips: int) -> tuple[float, float]:
    """Scalar mean/std of log-mel over the first n clips (centre crops) of a split [ours, METHOD.md]."""
    logmel = LogMel(audio)
    values = []
    seen = 0
    for i in range(len(source.counts)):
        for s in source.iter_shard(i):
            values.append(logmel(torch.from_numpy(centre_crop(s.audio(audio.sample_rate),
                                                              audio.crop_samples))[None]).flatten())
            seen += 1
            if seen >= n_clips:
                break
        if seen >= n_clips:
            break
    x = torch.cat(values)
    return float(x.mean()), float(x.std())


@torch.no_grad()
def embed_split(encoder: AudioNTT, features: Features, source: ShardSource, cfg: Config, pooling: str,
                desc: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Frozen-encoder embeddings of every clip of a split, in shard order: keys, (N, D) float32, label ids.
    pooling: 'embedding' (mean+max over time), 'mean' (mean over time), 'block1' (x1)."""
    device = rank_device()
    place(encoder, device).eval()
    place(features, device)
    stream = EvaluationStream(source, eval_transform(cfg.audio, cfg.data.task_seconds), seed=0, shuffle=False,
                              workers=cfg.data.num_workers)
    loader = make_loader(stream, cfg.data.eval_batch_size)
    keys, embs, labels = [], [], []
    with tqdm(total=sum(source.counts), desc=desc, unit="clip", disable=not is_main(), dynamic_ncols=True) as bar:
        for batch in loader:
            out = encoder(features(to_device(batch.wave, device)))
            emb = {"embedding": out.embedding, "mean": out.mean}.get(pooling)
            embs.append((out.blocks[0] if emb is None else emb).cpu().numpy())
            labels.append(batch.label.numpy())
            keys += batch.key
            bar.update(len(batch.key))
    return keys, np.concatenate(embs), np.concatenate(labels)


def labelled_subset(source: ShardSource, per_class: int, seed: int) -> ShardSource:
    """A seeded budget of `per_class` clips per class (0: all), chosen by hashing keys so it does not
    depend on shard order; returns a source restricted to those keys with exact per-shard counts."""
    if per_class <= 0:
        return source
    by_label: dict[str, list[tuple[str, str, int]]] = {}
    for i in range(len(source.counts)):
        for s in source.iter_shard(i):  # reads JSON members only: audio is decoded lazily
            h = hashlib.md5(f"{seed}:{s.key}".encode()).hexdigest()
            by_label.setdefault(s.meta().get("label"), []).append((h, s.key, i))
    chosen = [item for items in by_label.values() for item in sorted(items)[:per_class]]
    counts = [0] * len(source.counts)
    for _, _, i in chosen:
        counts[i] += 1
    return ShardSource(source.split_dir, source.labels_dir, keys=frozenset(k for _, k, _ in chosen), counts=counts)


def tensor_batches(n: int, batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index batches of an in-memory set for this rank: a seeded permutation per epoch, split evenly."""
    rank, world = rank_world()
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + batch] for i in range(0, per_rank - batch + 1, batch)] or [mine]


def split_dir(cfg: Config, split: str) -> Path:
    return Path(cfg.data.target) / split


def training_stream(cfg: Config, source: ShardSource, transform, batch_size: int) -> TrainingStream:
    """This rank's shuffled training stream, as the data config says."""
    rank, world = init_distributed(cfg.run.device)
    d = cfg.data
    return TrainingStream(source, transform, cfg.run.seed, shuffle=True, rank=rank, world=world,
                          workers=d.num_workers, batch_size=batch_size, shuffle_buffer=d.shuffle_buffer,
                          bad_samples=d.bad_samples, resampled=d.resampled)


def epoch_loader(stream: TrainingStream, metrics: Metrics) -> EpochLoader:
    """The trainer's data: the stream's batches epoch by epoch, counting the bad samples the workers skipped."""
    return EpochLoader(stream, after_batch=lambda: metrics.bad_sample("undecodable", stream.take_bad()))


def train_encoder(cfg: Config, module: nn.Module, encoder: AudioNTT, source: ShardSource, transform, stage,
                  out: Path, norm: tuple[float, float]) -> None:
    """The shared body of the encoder-training stages (pretrain, distill): stream the source, train through
    the engine for `stage.epochs` (capped at `stage.max_steps`), export the encoder, mark the stage done."""
    stream = training_stream(cfg, source, transform, stage.batch_size)
    steps = stream.batches_per_epoch()
    epochs = stage.epochs if not stage.max_steps else -(-stage.max_steps // steps)
    total = min(steps * epochs, stage.max_steps or steps * epochs)
    with stage_metrics(cfg, out.name) as metrics:  # closed (target file removed) on Preempted too
        trainer = Trainer(module, cfg.engine, stage.optim, stage.batch_size, total, out / "ckpt", cfg.hash(),
                          desc=out.name, metrics=metrics)
        progress = trainer.fit(epoch_loader(stream, metrics), steps, epochs, stage.batch_size, max_steps=total,
                               seconds_per_clip=cfg.audio.crop_seconds)
    state = full_state_dict(encoder, cfg.engine.zero_stage)  # collective under ZeRO-3: every rank calls it
    if is_main():
        export_encoder(encoder, out, state=state, meta={"stage": out.name, "norm_mean": norm[0], "norm_std": norm[1]})
        write_history(progress, out / "history.json")
        mark_done(out, {"steps": progress.global_step, "world_size": stream.world})

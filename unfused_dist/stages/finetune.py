"""Stage 4: fine-tuning (or linear probing) on the real labels; the model is selected on the validation
split and only then scored on the test split. One row of the results table per call."""
from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artefacts import atomic_write_text, mark_done, reset
from ..config import Config
from ..errors import UnfusedError
from ..data.loader import make_loader
from ..data.source import ShardSource
from ..data.stream import EvaluationStream
from ..engine.distributed import barrier, init_distributed, is_main
from ..engine.export import load_encoder
from ..engine.device import to_device
from ..engine.module import TrainModule
from ..engine.precision import fp32
from ..engine.trainer import Trainer, write_history
from ..metrics.exporter import stage_metrics
from ..models.encoder import AudioNTT, count_parameters
from ..run_layout import RunLayout
from ..stage_table import Row
from ..data.transforms import eval_transform, train_transform
from .common import Features, embed_split, labelled_subset, norm_stats, split_dir, epoch_loader, tensor_batches, \
    training_stream
from ..log import logger


class Classifier(TrainModule):
    """Encoder + Linear on the mean over time of the final layer (METHOD.md, stage 4)."""

    def __init__(self, encoder: AudioNTT, features: Features, n_classes: int):
        super().__init__()
        self.encoder, self.features = encoder, features
        self.fc = nn.Linear(encoder.dim, n_classes)

    def logits(self, wave: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.features(wave)).mean)

    def forward(self, wave: torch.Tensor, label: torch.Tensor):
        z = self.logits(wave)
        with fp32(z):
            return F.cross_entropy(z.float(), label), {"acc": (z.argmax(1) == label).float().mean()}


class LinearProbe(TrainModule):
    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        z = self.fc(x)
        with fp32(z):
            return F.cross_entropy(z.float(), y), {"acc": (z.argmax(1) == y).float().mean()}


def run(cfg: Config, row: Row) -> None:
    """Row `row` of the results table (its stage in stage_table.py: finetune-<row>)."""
    layout = RunLayout.of(cfg)
    out = layout.row(row.name)
    # A row restarts rather than resumes: its model selection (best validation epoch) lives in memory.
    reset(out, keep_checkpoints=False)
    init, mode = row.init, row.mode
    train_full = ShardSource(split_dir(cfg, "train"))
    torch.manual_seed(cfg.run.seed + 2)  # every row: its head (and scratch's encoder) from a fixed seed
    if init is None:
        encoder = AudioNTT(n_fc=cfg.distill.n_fc, n_mels=cfg.audio.n_mels)
        mean, std = norm_stats(train_full, cfg.audio, cfg.audio.norm_clips)
    else:
        encoder, meta = load_encoder(layout.stage(init))
        mean, std = meta["norm_mean"], meta["norm_std"]
    features = Features(cfg.audio, mean, std)
    train = labelled_subset(train_full, cfg.finetune.labels_per_class, cfg.run.seed)
    n_classes = len(train.manifest.labels or [])
    if n_classes < 2:
        raise UnfusedError(f"{train.split_dir}: the target needs labels (found {n_classes} classes); set "
                           "data.target to a dataset built from a manifest with a label column")
    run_fn = _probe if mode == "probe" else _finetune
    result, progress = run_fn(cfg, encoder, features, train, n_classes, out)
    if is_main():
        result.update({"row": row.name, "init": init or "random", "mode": mode, "train_clips": sum(train.counts),
                       "encoder_parameters": count_parameters(encoder),
                       "parameters": count_parameters(encoder) + encoder.dim * n_classes + n_classes})
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=1))
        write_history(progress, out / "history.json")
        mark_done(out, result)
        logger(f"finetune {row.name}").info(f"val {result['val_acc']:.3f} (epoch {result['best_epoch']}), "
                                            f"test {result['test_acc']:.3f}")


def _finetune(cfg, encoder, features, train, n_classes, out):
    c = cfg.finetune
    model = Classifier(encoder, features, n_classes)
    # Fine-tuning trains on crops of the task's length, as it is evaluated (METHOD.md: task-specific crops).
    stream = training_stream(cfg, train, train_transform(cfg.audio, "label", cfg.data.task_seconds), c.batch_size)
    steps = stream.batches_per_epoch()
    metrics = stage_metrics(cfg, f"finetune-{out.name}")
    trainer = Trainer(model, cfg.engine, c.optim, c.batch_size, steps * c.epochs, out / "ckpt", cfg.hash(),
                      desc=f"finetune {out.name}", metrics=metrics)
    best = {"val_acc": -1.0, "best_epoch": -1, "state": None}

    def on_epoch_end(epoch):
        if not is_main():
            return None
        acc = accuracy(trainer.module, "val", cfg)
        if acc > best["val_acc"]:
            best.update(val_acc=acc, best_epoch=epoch, state=copy.deepcopy(trainer.module.state_dict()))
        return {"val_acc": acc}

    with metrics:
        progress = trainer.fit(epoch_loader(stream, metrics), steps, c.epochs, c.batch_size, on_epoch_end,
                               seconds_per_clip=cfg.data.task_seconds)
    result = {}
    if is_main():
        trainer.module.load_state_dict(best.pop("state"))
        result = {**best, "test_acc": accuracy(trainer.module, "test", cfg)}
    return result, progress


def _probe(cfg, encoder, features, train, n_classes, out):
    c = cfg.finetune
    cache = out / "features.npz"
    rank, world = init_distributed(cfg.run.device)
    if is_main():  # embed once on rank 0; the other ranks read the cache
        sets = {name: embed_split(encoder, features, src, cfg, "mean", desc=f"{out.name}: embed {name}")
                for name, src in (("train", train), ("val", _labelled(cfg, "val")), ("test", _labelled(cfg, "test")))}
        np.savez(cache, **{f"{n}_{part}": arr for n, (_, x, y) in sets.items() for part, arr in (("x", x), ("y", y))})
    barrier()
    data = np.load(cache)
    mu, sd = data["train_x"].mean(0), data["train_x"].std(0) + 1e-6
    xs = {n: torch.from_numpy((data[f"{n}_x"] - mu) / sd).float() for n in ("train", "val", "test")}
    ys = {n: torch.from_numpy(data[f"{n}_y"]).long() for n in ("train", "val", "test")}
    model = LinearProbe(xs["train"].shape[1], n_classes)
    n = len(ys["train"])
    steps = len(tensor_batches(n, c.batch_size, cfg.run.seed, 0))
    trainer = Trainer(model, cfg.engine, c.probe_optim, c.batch_size, steps * c.probe_epochs, out / "ckpt",
                      cfg.hash(), desc=f"probe {out.name}")
    best = {"val_acc": -1.0, "best_epoch": -1, "state": None}

    def score(split: str) -> float:
        with torch.no_grad():
            x, y = to_device((xs[split], ys[split]), trainer.device)
            return float((trainer.module.fc(x).argmax(1) == y).float().mean())

    def on_epoch_end(epoch):
        acc = score("val")
        if acc > best["val_acc"]:
            best.update(val_acc=acc, best_epoch=epoch, state=copy.deepcopy(trainer.module.state_dict()))
        return {"val_acc": acc}

    def batches(epoch, start):
        index = tensor_batches(n, c.batch_size, cfg.run.seed, epoch)[start:]
        return [(xs["train"][i], ys["train"][i]) for i in index]

    progress = trainer.fit(batches, steps, c.probe_epochs, c.batch_size, on_epoch_end)
    trainer.module.load_state_dict(best.pop("state"))  # the test split is read once, for the selected model
    return {**best, "test_acc": score("test")}, progress


def _labelled(cfg: Config, split: str) -> ShardSource:
    return ShardSource(split_dir(cfg, split))


@torch.no_grad()
def accuracy(model: Classifier, split: str, cfg: Config) -> float:
    model.eval()
    source = _labelled(cfg, split)
    stream = EvaluationStream(source, eval_transform(cfg.audio, cfg.data.task_seconds), seed=0, shuffle=False,
                              workers=cfg.data.num_workers)
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device, read once
    total = 0
    for batch in make_loader(stream, cfg.data.eval_batch_size):
        wave, label = to_device((batch.wave, batch.label), device)
        correct += (model.logits(wave).argmax(1) == label).sum()
        total += len(label)
    model.train()
    return int(correct) / max(total, 1)

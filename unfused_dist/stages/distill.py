"""Stage 3, unsupervised fine-tuning: a fresh (smaller) student learns the pseudo-labels by
self-distillation, with shallow heads on its intermediate blocks (METHOD.md)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..artefacts import is_done, read_done, reset
from ..audio.augment import Augmenter
from ..run_layout import RunLayout
from ..config import Config, DistillConfig
from ..data.source import ShardSource
from ..models.encoder import AudioNTT
from ..models.heads import shallow_head
from ..objectives.distill import DistillWeights, distillation_loss
from ..data.transforms import train_transform
from ..engine.module import TrainModule
from ..engine.precision import fp32
from ..errors import MissingArtefactError, UnfusedError
from .common import Features, norm_stats, split_dir, train_encoder
from .pseudolabel import shards_digest


class DistillModule(TrainModule):
    """The student, its classifier and shallow heads, learning the pseudo-labels (augmented as in SSL)."""

    def __init__(self, encoder: AudioNTT, features: Features, k: int, cfg: DistillConfig, seed: int):
        super().__init__()
        self.encoder, self.features = encoder, features
        self.classifier = nn.Linear(encoder.dim, k)
        self.heads = nn.ModuleList([shallow_head(d, k) for d in encoder.block_dims])
        self.weights = DistillWeights(cfg.head_ce, cfg.kl, cfg.cosine)
        self.augment = Augmenter(cfg.mixup_ratio, seed)

    def forward(self, wave: torch.Tensor, label: torch.Tensor):
        x = self.augment(self.features(wave))
        out = self.encoder(x)
        z = self.classifier(out.embedding)
        q = [h(b) for h, b in zip(self.heads, out.blocks)]
        with fp32(x):
            loss = distillation_loss(z.float(), [h.float() for h in q], label, self.weights)
        return loss, {"acc_pseudo": (z.argmax(1) == label).float().mean()}

    def rank_state(self) -> dict:
        """The augmentation RNG and mixup memory bank: without them a resumed distillation is not exact."""
        return self.augment.state()

    def load_rank_state(self, state: dict) -> None:
        self.augment.load_state(state, self.classifier.weight.device)


def pseudo_labels(stage: Path, target: ShardSource) -> Path:
    """This run's label shards dir, once its meta.json is shown to be what this run's pseudolabel stage
    wrote (same K and centroids) for the target's shards as they are now: label shards made before the
    target was rebuilt, or written since by another run or another fit, are refused. The pipeline skips a
    finished stage, so each refusal says to delete the stage's done.json: that redoes it."""
    if not is_done(stage):
        raise MissingArtefactError(f"{stage}: the pseudolabel stage has not finished; run it first "
                                   "(`unfused run pseudolabel`, or the whole pipeline) with this config")
    redo = f"delete {stage / 'done.json'} and run the pseudolabel stage again"
    report = _read_json(stage / "report.json", redo)
    made_for = report.get("audio_shards_sha256")  # None in reports written before it was recorded
    if made_for is not None and made_for != shards_digest(target):
        raise UnfusedError(f"{target.split_dir}: the shards changed since the pseudolabel stage labelled them (a "
                           f"rebuild?); {redo} (only the changed shards are embedded again)")
    labels = Path(read_done(stage)["labels_dir"])
    meta = _read_json(labels / "meta.json", redo)
    theirs, ours = [(d.get("k"), d.get("centroids_sha256")) for d in (meta, report)]
    if theirs != ours:
        raise UnfusedError(f"{labels / 'meta.json'}: K {theirs[0]}, centroids {str(theirs[1])[:12]} differ from this "
                           f"run's pseudolabel report (K {ours[0]}, centroids {str(ours[1])[:12]}): the label "
                           f"shards were overwritten since; {redo}")
    return labels


def _read_json(path: Path, redo: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnfusedError(f"{path}: unreadable ({e}); {redo}") from None


def run(cfg: Config) -> None:
    layout = RunLayout.of(cfg)
    labels = pseudo_labels(layout.stage("pseudolabel"), ShardSource(split_dir(cfg, "train")))
    out = layout.stage("distill")
    reset(out)
    c = cfg.distill
    source = ShardSource(split_dir(cfg, "train"), labels_dir=labels)
    mean, std = norm_stats(ShardSource(split_dir(cfg, "train")), cfg.audio, cfg.audio.norm_clips)
    torch.manual_seed(cfg.run.seed + 1)
    module = DistillModule(AudioNTT(n_fc=c.n_fc, n_mels=cfg.audio.n_mels), Features(cfg.audio, mean, std),
                           cfg.pseudolabel.k, c, cfg.run.seed)
    train_encoder(cfg, module, module.encoder, source, train_transform(cfg.audio, "cls"), c, out, (mean, std))

"""Stage 3, unsupervised fine-tuning: a fresh (smaller) student learns the pseudo-labels by
self-distillation, with shallow heads on its intermediate blocks (METHOD.md)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..artefacts import read_done, reset
from ..audio.augment import LogMixupExp, random_resize_crop
from ..config import Config, DistillConfig
from ..data.loader import ShardSource
from ..models.encoder import AudioNTT
from ..models.heads import shallow_head
from ..objectives.distill import DistillWeights, distillation_loss
from ..data.transforms import train_transform
from .common import Features, norm_stats, split_dir, train_encoder


class DistillModule(nn.Module):
    def __init__(self, encoder: AudioNTT, features: Features, k: int, cfg: DistillConfig, seed: int):
        super().__init__()
        self.encoder, self.features = encoder, features
        self.classifier = nn.Linear(encoder.dim, k)
        self.heads = nn.ModuleList([shallow_head(d, k) for d in encoder.block_dims])
        self.weights = DistillWeights(cfg.head_ce, cfg.kl, cfg.cosine)
        self.gen = torch.Generator().manual_seed(seed)
        self.mixup = LogMixupExp(cfg.mixup_ratio, generator=self.gen)

    def forward(self, wave: torch.Tensor, y: torch.Tensor):
        x = random_resize_crop(self.mixup(self.features(wave)), generator=self.gen)
        out = self.encoder(x)
        z = self.classifier(out.embedding)
        q = [h(b) for h, b in zip(self.heads, out.blocks)]
        loss = distillation_loss(z, q, y, self.weights)
        return loss, {"acc_pseudo": (z.argmax(1) == y).float().mean()}


def run(cfg: Config) -> None:
    out = cfg.run.path / "distill"
    reset(out)
    c = cfg.distill
    labels = Path(read_done(cfg.run.path / "pseudolabel")["labels_dir"])
    source = ShardSource(split_dir(cfg, "train"), labels_dir=labels)
    mean, std = norm_stats(ShardSource(split_dir(cfg, "train")), cfg.audio, cfg.pretrain.norm_clips)
    torch.manual_seed(cfg.run.seed + 1)
    module = DistillModule(AudioNTT(n_fc=c.n_fc, n_mels=cfg.audio.n_mels), Features(cfg.audio, mean, std),
                           cfg.pseudolabel.k, c, cfg.run.seed)
    train_encoder(cfg, module, module.encoder, source, train_transform(cfg.audio, "cls"), c, out, (mean, std))

"""Stage 1: SLICER-style SSL pre-training of the teacher encoder on the unlabelled pool."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..artefacts import reset
from ..audio.augment import Augmenter
from ..run_layout import RunLayout
from ..config import Config, ConfigError, PretrainConfig
from ..data.source import ShardSource
from ..models.encoder import AudioNTT
from ..models.heads import cluster_head
from ..objectives.ssl import slicer_loss
from ..data.transforms import train_transform
from ..engine.module import TrainModule
from ..engine.precision import fp32
from .common import Features, norm_stats, train_encoder


class SSLModule(TrainModule):
    """Online encoder + heads, and a momentum (EMA) copy that gives the contrastive keys."""

    def __init__(self, encoder: AudioNTT, features: Features, cfg: PretrainConfig, seed: int):
        super().__init__()
        self.cfg, self.features = cfg, features
        self.encoder = encoder
        self.proj = nn.Linear(encoder.dim, cfg.proj_dim)
        self.cluster = cluster_head(encoder.dim, cfg.n_clusters)
        self.momentum = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "proj": copy.deepcopy(self.proj),
                                       "cluster": copy.deepcopy(self.cluster)}).requires_grad_(False)
        self.augment = Augmenter(cfg.mixup_ratio, seed)

    def _heads(self, enc, proj, cluster, x):
        e = enc(x).embedding
        return proj(e), cluster(e).softmax(dim=1)

    def forward(self, wave: torch.Tensor):
        x = self.features(wave)
        views = [self.augment(x), self.augment(x)]
        online = [self._heads(self.encoder, self.proj, self.cluster, v) for v in views]
        with torch.no_grad():
            m = self.momentum
            keys = [self._heads(m["encoder"], m["proj"], m["cluster"], v) for v in views]
        c = self.cfg
        with fp32(x):  # the losses' logs and normalisations in fp32 (mixed precision runs)
            return slicer_loss(*_float(online[0], online[1], keys[0], keys[1]), c.temperature,
                               c.cluster_temperature, c.cluster_weight)

    def rank_state(self) -> dict:
        """Per-rank state the engine checkpoints: the augmentation RNG and the mixup memory bank."""
        return self.augment.state()

    def load_rank_state(self, state: dict) -> None:
        self.augment.load_state(state, self.proj.weight.device)

    @torch.no_grad()
    def after_step(self) -> None:
        """The momentum encoder's EMA, in fp32 (the weights stay fp32 under mixed precision), one foreach
        update over all its parameters; buffers (BatchNorm statistics) are copied."""
        names = ("encoder", "proj", "cluster")
        target = [p for n in names for p in self.momentum[n].parameters()]
        online = [p.detach() for n in names for p in getattr(self, n).parameters()]
        torch._foreach_mul_(target, self.cfg.ema)
        torch._foreach_add_(target, online, alpha=1 - self.cfg.ema)
        for n in names:
            for bm, bo in zip(self.momentum[n].buffers(), getattr(self, n).buffers()):
                bm.copy_(bo)


def _float(*pairs):
    return [tuple(t.float() for t in pair) for pair in pairs]


def run(cfg: Config) -> None:
    if cfg.engine.zero_stage == 3:  # before reset(): a refused command must not clear a half-finished stage
        raise ConfigError("engine.zero_stage=3 partitions parameters, which the SSL momentum encoder update "
                          "cannot read; use zero_stage 0, 1 or 2 for pretrain")
    out = RunLayout.of(cfg).stage("pretrain")
    reset(out)
    c = cfg.pretrain
    source = ShardSource(cfg.data.pool)
    mean, std = norm_stats(source, cfg.audio, cfg.audio.norm_clips)
    torch.manual_seed(cfg.run.seed)
    encoder = AudioNTT(n_fc=c.n_fc, n_mels=cfg.audio.n_mels)
    module = SSLModule(encoder, Features(cfg.audio, mean, std), c, cfg.run.seed)
    train_encoder(cfg, module, encoder, source, train_transform(cfg.audio, None), c, out, (mean, std))

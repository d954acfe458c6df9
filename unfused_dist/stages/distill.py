"""Stage 3, unsupervised fine-tuning: a fresh (smaller) student learns the pseudo-labels by
self-distillation, with shallow heads on its intermediate blocks (METHOD.md)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..artefacts import mark_done, read_done, reset
from ..audio.augment import LogMixupExp, random_resize_crop
from ..config import Config, DistillConfig
from ..data.loader import ShardSource, ShardStream, make_loader
from ..engine.distributed import init_distributed, is_main
from ..engine.export import export_encoder, full_state_dict
from ..engine.trainer import Trainer, write_history
from ..models.encoder import AudioNTT
from ..models.heads import shallow_head
from ..objectives.distill import DistillWeights, distillation_loss
from .common import Features, norm_stats, split_dir, train_transform


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
    rank, world = init_distributed()
    stream = ShardStream(source, train_transform(cfg.audio, "cls"), cfg.run.seed, shuffle=True, rank=rank,
                         world=world, shuffle_buffer=cfg.data.shuffle_buffer)
    steps = stream.batches_per_epoch(c.batch_size, cfg.data.num_workers)
    epochs = c.epochs if not c.max_steps else -(-c.max_steps // steps)
    trainer = Trainer(module, cfg.engine, c.optim, c.batch_size, steps * epochs, out / "ckpt", cfg.hash(),
                      desc="distill")

    def batches(epoch):
        stream.set_epoch(epoch)
        return make_loader(stream, c.batch_size, cfg.data.num_workers, drop_last=True)

    progress = trainer.fit(batches, steps, epochs, c.batch_size)
    state = full_state_dict(module.encoder, cfg.engine.zero_stage)
    if is_main():
        export_encoder(module.encoder, out, state=state, meta={"stage": "distill", "norm_mean": mean, "norm_std": std})
        write_history(progress, out / "history.json")
        mark_done(out, {"steps": progress.global_step, "world_size": world})

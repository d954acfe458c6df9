"""AudioNTT2020 encoder (BYOL-A) in its 2-FC and 3-FC forms, and the heads the stages put on it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncoderOutput:
    frames: torch.Tensor  # (B, T/8, 2048): per-frame features of the last FC layer
    blocks: list[torch.Tensor]  # conv block k's map flattened per frame and mean-pooled over time

    @property
    def embedding(self) -> torch.Tensor:
        """Clip embedding: mean + max over time (BYOL-A), (B, 2048)."""
        return self.frames.mean(dim=1) + self.frames.amax(dim=1)

    @property
    def mean(self) -> torch.Tensor:
        return self.frames.mean(dim=1)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))


class AudioNTT(nn.Module):
    """Input (B, 1, n_mels, T) normalised log-mel. n_fc=2 -> 5,321,856 params, n_fc=3 -> 9,518,208."""

    def __init__(self, n_fc: int = 2, n_mels: int = 64, d: int = 2048, channels: int = 64):
        super().__init__()
        if n_fc not in (2, 3):
            raise ValueError(f"n_fc must be 2 or 3, got {n_fc}")
        self.n_fc, self.n_mels, self.dim = n_fc, n_mels, d
        self.blocks = nn.ModuleList([_conv_block(1, channels), _conv_block(channels, channels),
                                     _conv_block(channels, channels)])
        layers: list[nn.Module] = [nn.Linear(channels * (n_mels // 8), d), nn.ReLU(), nn.Dropout(0.3),
                                   nn.Linear(d, d), nn.ReLU()]
        if n_fc == 3:
            layers += [nn.Dropout(0.2), nn.Linear(d, d), nn.ReLU()]
        self.fc = nn.Sequential(*layers)
        # Widths of the pooled block outputs x1, x2, x3 that the distillation heads read.
        self.block_dims = [channels * (n_mels // 2 ** (k + 1)) for k in range(3)]

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        pooled = []
        for block in self.blocks:
            x = block(x)
            b, c, f, t = x.shape
            pooled.append(x.permute(0, 3, 1, 2).reshape(b, t, c * f).mean(dim=1))
        b, c, f, t = x.shape
        frames = self.fc(x.permute(0, 3, 1, 2).reshape(b, t, c * f))
        return EncoderOutput(frames=frames, blocks=pooled)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

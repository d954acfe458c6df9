"""Log-mel frontend (torchaudio's pure-PyTorch transforms) and crops on raw 16 kHz waveforms."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio
from torch import nn


@dataclass
class FrontendConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 60.0
    f_max: float = 7800.0
    crop_seconds: float = 0.95  # training and evaluation crop: 15,200 samples -> 96 frames
    eps: float = 1e-5
    # clips from which each encoder's log-mel mean/std (stored with it) is estimated, for every stage that
    # trains an encoder from scratch (pre-training, distillation, the scratch row)
    norm_clips: int = 512

    @property
    def crop_samples(self) -> int:
        return int(round(self.crop_seconds * self.sample_rate))


class LogMel(nn.Module):
    """(B, samples) waveform -> (B, 1, n_mels, frames) natural-log mel power spectrogram."""

    def __init__(self, cfg: FrontendConfig):
        super().__init__()
        self.eps = cfg.eps
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.n_fft, hop_length=cfg.hop_length,
            f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0, center=True)

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return (self.mel(wave) + self.eps).log().unsqueeze(1)


class Normalizer(nn.Module):
    """Scalar mean/std of log-mel over a dataset, precomputed and stored with the encoder [ours]."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def random_crop(wave: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of n samples; shorter clips are padded symmetrically with zeros."""
    if len(wave) <= n:
        return pad_to(wave, n)
    start = int(rng.integers(0, len(wave) - n + 1))
    return wave[start:start + n]


def centre_crop(wave: np.ndarray, n: int) -> np.ndarray:
    if len(wave) <= n:
        return pad_to(wave, n)
    start = (len(wave) - n) // 2
    return wave[start:start + n]


def pad_to(wave: np.ndarray, n: int) -> np.ndarray:
    missing = n - len(wave)
    left = missing // 2
    return np.pad(wave, (left, missing - left)).astype(np.float32, copy=False)

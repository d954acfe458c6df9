"""Spectrogram augmentations of BYOL-A used by SSL pre-training and distillation (METHOD.md).

Draws come from one CPU generator (the same numbers on every device, cheap to checkpoint) and are moved to
the spectrogram's device; the memory bank lives on that device."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class LogMixupExp:
    """Mix each log-mel with one from a memory bank of past inputs in the linear domain:
    x' = log((1 - a) e^x + a e^z), a = ratio * U(0, 1). The bank keeps the last `bank_size` clips."""

    def __init__(self, ratio: float = 0.4, bank_size: int = 2048, generator: torch.Generator | None = None):
        self.ratio, self.bank_size, self.gen = ratio, bank_size, generator
        self.bank: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.bank is not None and len(self.bank) > 0:
            idx = torch.randint(len(self.bank), (b,), generator=self.gen).to(self.bank.device)
            z = self.bank[idx]
            a = (self.ratio * torch.rand(b, 1, 1, 1, generator=self.gen)).to(x.device, x.dtype)
            mixed = ((1 - a) * x.exp() + a * z.exp()).log()
        else:
            mixed = x
        fresh = x.detach()
        self.bank = fresh if self.bank is None else torch.cat([self.bank, fresh])[-self.bank_size:]
        return mixed


def random_resize_crop(x: torch.Tensor, generator: torch.Generator | None = None,
                       virtual_scale: float = 1.5, freq_scale=(0.6, 1.5), time_scale=(0.6, 1.5)) -> torch.Tensor:
    """Per clip: place the spectrogram on a zero canvas `virtual_scale` times larger, cut a window whose
    size is drawn from the freq/time scales, and resize it back (bicubic) to the input size."""
    b, c, f, t = x.shape
    vf, vt = int(f * virtual_scale), int(t * virtual_scale)
    canvas = x.new_zeros(b, c, vf, vt)
    of, ot = (vf - f) // 2, (vt - t) // 2
    canvas[..., of:of + f, ot:ot + t] = x
    out = torch.empty_like(x)
    for i in range(b):
        u = torch.rand(4, generator=generator).tolist()
        h = min(max(int(f * (freq_scale[0] + u[0] * (freq_scale[1] - freq_scale[0]))), 1), vf)
        w = min(max(int(t * (time_scale[0] + u[1] * (time_scale[1] - time_scale[0]))), 1), vt)
        i0 = math.floor(u[2] * (vf - h + 1)) if vf > h else 0
        j0 = math.floor(u[3] * (vt - w + 1)) if vt > w else 0
        crop = canvas[i:i + 1, :, i0:i0 + h, j0:j0 + w]
        out[i:i + 1] = F.interpolate(crop, size=(f, t), mode="bicubic", align_corners=True)
    return out


class Augmenter:
    """One rank's augmentation of a log-mel batch: log-mixup-exp, then a random resize crop, both drawn from
    this object's own generator; `state()` / `load_state()` carry the generator and the mixup bank through
    a checkpoint, so a resumed run augments exactly as an uninterrupted one."""

    def __init__(self, mixup_ratio: float, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.mixup = LogMixupExp(mixup_ratio, generator=self.gen)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return random_resize_crop(self.mixup(x), generator=self.gen)

    def state(self) -> dict:
        bank = self.mixup.bank
        return {"gen": self.gen.get_state(), "bank": bank.cpu() if bank is not None else torch.empty(0)}

    def load_state(self, state: dict, device: torch.device) -> None:
        self.gen.set_state(state["gen"])
        bank = state["bank"]
        self.mixup.bank = bank.to(device) if bank.numel() else None

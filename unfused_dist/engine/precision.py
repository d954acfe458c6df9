"""Mixed precision by autocast: weights, optimizer state, BatchNorm statistics and the momentum encoder stay
fp32; matmuls and convolutions run in bf16 inside `autocast`; the log-mel frontend, normalisation and losses
leave it (`fp32`), so their sums and logs keep fp32's range. DeepSpeed itself always runs in fp32 (its bf16
mode would cast the whole module, the mel filterbank and the EMA copy included)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

# Devices autocast knows; others (the `meta` device of the placement tests) run as they are.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast(precision: str, device: torch.device):
    """The forward's context for `engine.precision` on this device."""
    if precision == "bf16" and device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def fp32(x: torch.Tensor):
    """Leave autocast for the code inside (frontend, losses); cast its inputs with `.float()`."""
    if x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return nullcontext()

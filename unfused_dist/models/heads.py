"""Heads: shallow distillation heads, SSL projection heads, classifiers."""
from __future__ import annotations

from torch import nn


def shallow_head(d_in: int, k: int) -> nn.Sequential:
    """Distillation head h_i: (Linear no bias, BN, ReLU) twice, then Linear no bias (METHOD.md)."""
    return nn.Sequential(
        nn.Linear(d_in, k, bias=False), nn.BatchNorm1d(k), nn.ReLU(),
        nn.Linear(k, k, bias=False), nn.BatchNorm1d(k), nn.ReLU(),
        nn.Linear(k, k, bias=False),
    )


def cluster_head(d_in: int, k: int) -> nn.Sequential:
    """SLICER cluster head: d -> d -> K, softmax applied by the loss."""
    return nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, k))

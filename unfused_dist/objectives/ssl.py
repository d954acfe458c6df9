"""SLICER-style SSL objective [ours, METHOD.md]: symmetric instance InfoNCE against a momentum encoder
plus cluster-level contrast, with negatives and cluster statistics gathered across data-parallel ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from ..engine.distributed import rank_world


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    world = rank_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    world = rank_world()[1]
    return x if world == 1 else torch.cat(all_gather_with_grad(x.contiguous()))


def instance_nce(q: torch.Tensor, k_all: torch.Tensor, temperature: float) -> torch.Tensor:
    """q: this rank's (B, D) normalised queries; k_all: (world*B, D) normalised keys from every rank.
    The positive of query i is key rank*B + i; every other key of every rank is a negative."""
    rank = rank_world()[0]
    logits = q @ k_all.t() / temperature
    target = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, target)


def cluster_contrast(p_a: torch.Tensor, p_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cluster-level contrast (Contrastive Clustering): columns of the softmax assignment matrices over the
    GLOBAL batch are the instances; plus the entropy of the cluster marginal to prevent collapse."""
    ca, cb = F.normalize(gather_with_grad(p_a).t(), dim=1), F.normalize(gather_with_grad(p_b).t(), dim=1)
    k = ca.shape[0]
    logits = ca @ cb.t() / temperature
    target = torch.arange(k, device=ca.device)
    contrast = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    entropy = 0.0
    for p in (p_a, p_b):
        marginal = gather_with_grad(p).mean(0)
        entropy = entropy + (marginal * marginal.clamp_min(1e-8).log()).sum() + _log(k)
    return contrast + entropy


def _log(k: int) -> float:
    """log k rounded as fp32 computes it (a host number: no device sync, and the sums stay bit-stable)."""
    return float(torch.tensor(float(k)).log())


def slicer_loss(student_a, student_b, teacher_a, teacher_b, temperature: float, cluster_temperature: float,
                cluster_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each argument is a (projection, cluster_probs) pair for one view. Teacher outputs carry no grad."""
    (za, pa), (zb, pb) = student_a, student_b
    (ta, _), (tb, _) = teacher_a, teacher_b
    ka, kb = gather_no_grad(F.normalize(ta, dim=1)), gather_no_grad(F.normalize(tb, dim=1))
    inst = 0.5 * (instance_nce(F.normalize(za, dim=1), kb, temperature)
                  + instance_nce(F.normalize(zb, dim=1), ka, temperature))
    clus = cluster_contrast(pa, pb, cluster_temperature)
    # the parts are logged as detached tensors: the trainer reads them with the loss, in one transfer
    return inst + cluster_weight * clus, {"instance": inst.detach(), "cluster": clus.detach()}

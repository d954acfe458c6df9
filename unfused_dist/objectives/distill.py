"""Self-distillation loss of UnFuSeD stage 3 (METHOD.md, with the authors' weights)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillWeights:
    head_ce: float = 0.7
    kl: float = 0.3
    cosine: float = 0.003


def distillation_loss(z: torch.Tensor, heads: list[torch.Tensor], y: torch.Tensor,
                      w: DistillWeights = DistillWeights()) -> torch.Tensor:
    """L = CE(z, y) + a sum CE(q_i, y) + b sum KL(softmax z || softmax q_i) + c sum (2 - 2 cos(q_i, z)).
    z is the deepest classifier's logits, heads the shallow heads' logits; z is not detached."""
    loss = F.cross_entropy(z, y)
    log_p_z = F.log_softmax(z, dim=1)
    for q in heads:
        loss = loss + w.head_ce * F.cross_entropy(q, y)
        # KL(P_z || P_q) = sum P_z (log P_z - log P_q); F.kl_div takes log Q as input and P as target.
        loss = loss + w.kl * F.kl_div(F.log_softmax(q, dim=1), log_p_z, reduction="batchmean", log_target=True)
        loss = loss + w.cosine * (2 - 2 * F.cosine_similarity(q, z, dim=1)).mean()
    return loss

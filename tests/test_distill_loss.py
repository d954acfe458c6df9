import math

import torch

from unfused_dist.objectives.distill import DistillWeights, distillation_loss


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_distillation_loss_equals_a_hand_computed_value():
    z = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    q = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
    y = [0, 1]
    expected = 0.0
    for zi, qi, yi in zip(z, q, y):
        pz, pq = _softmax(zi), _softmax(qi)
        ce_z, ce_q = -math.log(pz[yi]), -math.log(pq[yi])
        kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pz, pq))
        cos = sum(a * b for a, b in zip(qi, zi)) / math.sqrt(sum(a * a for a in qi) * sum(b * b for b in zi))
        # one head: CE(z) + 0.7 CE(q) + 0.3 KL(pz || pq) + 0.003 (2 - 2 cos), every term averaged over the batch
        expected += (ce_z + 0.7 * ce_q + 0.3 * kl + 0.003 * (2 - 2 * cos)) / 2
    got = distillation_loss(torch.tensor(z), [torch.tensor(q)], torch.tensor(y), DistillWeights())
    assert abs(float(got) - expected) < 1e-6


def test_each_head_adds_its_terms():
    torch.manual_seed(0)
    z, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    q = [torch.randn(4, 5) for _ in range(3)]
    w = DistillWeights()
    total = distillation_loss(z, q, y, w)
    parts = [distillation_loss(z, [qi], y, w) - distillation_loss(z, [], y, w) for qi in q]
    assert torch.allclose(total, distillation_loss(z, [], y, w) + sum(parts), atol=1e-6)

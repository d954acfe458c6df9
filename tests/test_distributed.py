"""Two real processes (gloo) against one: the engine averages gradients and the SSL loss sees every
rank's negatives, so data-parallel training equals single-process training on the whole batch."""
import os

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from unfused_dist.config import EngineConfig, OptimConfig
from unfused_dist.engine.module import TrainModule

torch.set_num_threads(1)


def _env(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


class Regression(TrainModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, y):
        return ((self.net(x) - y) ** 2).mean(), {}


def _engine_worker(rank, world, port, out, zero_stage):
    _env(rank, world, port)
    from unfused_dist.engine.trainer import Trainer

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
    per = len(x) // world
    trainer = Trainer(Regression(), EngineConfig(zero_stage=zero_stage, save_every_steps=0),
                      OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant"),
                      micro_batch=per, total_steps=3, ckpt_dir=out / f"ckpt{world}", config_hash="t", desc="t")
    mine = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])]
    trainer.fit(lambda epoch, start: mine[start:], steps_per_epoch=1, epochs=3, clips_per_step=per)
    if rank == 0:
        torch.save({k: v.clone() for k, v in trainer.module.state_dict().items()}, out / f"w{world}.pt")


def _spawn(fn, world, port, *args):
    mp.start_processes(fn, args=(world, port, *args), nprocs=world, start_method="spawn", join=True)


def test_two_rank_engine_steps_equal_one_rank_on_the_full_batch(tmp_path, free_port):
    for zero_stage in (1, 2):
        out = tmp_path / f"z{zero_stage}"
        out.mkdir()
        _spawn(_engine_worker, 1, free_port, out, zero_stage)
        _spawn(_engine_worker, 2, free_port + 1, out, zero_stage)
        one = torch.load(out / "w1.pt", weights_only=True)
        two = torch.load(out / "w2.pt", weights_only=True)
        start = Regression().state_dict()
        for k in one:
            assert not torch.allclose(one[k], start[k])  # training moved the weights
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def _ssl_worker(rank, world, port, out):
    _env(rank, world, port)
    import torch.distributed as dist

    from unfused_dist.objectives.ssl import slicer_loss

    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(8, 5, generator=gen) for _ in range(4)] + [torch.randn(8, 4, generator=gen).softmax(1)
                                                                     for _ in range(2)]
    per = 8 // world
    za, zb, ta, tb, pa, pb = [t[rank * per:(rank + 1) * per].clone().requires_grad_(i in (0, 1, 4, 5))
                              for i, t in enumerate(full)]
    loss, _ = slicer_loss((za, pa), (zb, pb), (ta, None), (tb, None), 0.1, 1.0, 1.0)
    loss.backward()
    grads = torch.cat([g.grad for g in (za, zb, pa, pb)], 1)
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        np.savez(out / f"ssl{world}.npz", loss=float(sum(losses) / world), grads=torch.cat(gathered).numpy())
    dist.destroy_process_group()


def test_ssl_loss_uses_negatives_from_every_rank(tmp_path, free_port):
    _spawn(_ssl_worker, 1, free_port, tmp_path)
    _spawn(_ssl_worker, 2, free_port + 1, tmp_path)
    one, two = np.load(tmp_path / "ssl1.npz"), np.load(tmp_path / "ssl2.npz")
    # Mean of the per-rank losses is the single-process loss over the whole batch ...
    assert abs(float(one["loss"]) - float(two["loss"])) < 1e-5
    # ... and a DeepSpeed-style average of the rank gradients is the single-process gradient.
    np.testing.assert_allclose(two["grads"] / 2, one["grads"], rtol=1e-4, atol=1e-6)

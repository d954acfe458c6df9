"""GPU-readiness without a GPU. Every stage module, the augmentations, the losses and the k-means search run
forward and backward with parameters and inputs on the `meta` device, placed by the trainer's own code (a
tensor left on the CPU raises there, as on CUDA); the device is chosen in one place and a job given GPUs
on a torch without CUDA is refused in one line; a module that asserts its inputs are on its parameters'
device trains through the real Trainer; bf16 is autocast with an fp32 frontend, losses and momentum
encoder (the EMA moves as in fp32)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from unfused_dist.audio.augment import Augmenter, LogMixupExp, random_resize_crop
from unfused_dist.audio.frontend import FrontendConfig
from unfused_dist.cluster.kmeans import nearest
from unfused_dist.config import DistillConfig, EngineConfig, OptimConfig, PretrainConfig
from unfused_dist.engine.device import NO_CUDA, choose_device, gpus_allocated, place, to_device
from unfused_dist.engine.module import TrainModule
from unfused_dist.errors import ConfigError, UnfusedError
from unfused_dist.models.encoder import AudioNTT
from unfused_dist.objectives.distill import distillation_loss
from unfused_dist.objectives.ssl import slicer_loss
from unfused_dist.stages.common import Features
from unfused_dist.stages.distill import DistillModule
from unfused_dist.stages.finetune import Classifier, LinearProbe
from unfused_dist.stages.pretrain import SSLModule

META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]


def _small_encoder() -> AudioNTT:
    return AudioNTT(n_fc=2, d=64, channels=8)


def _features() -> Features:
    return Features(FrontendConfig(), -5.0, 3.0)


def _stage_modules() -> dict[str, tuple[nn.Module, tuple]]:
    """Each stage's training module (built on the CPU, as the stages build them) and a CPU batch for it."""
    torch.manual_seed(0)
    wave, y = torch.randn(4, 4000), torch.randint(3, (4,))
    return {
        "ssl": (SSLModule(_small_encoder(), _features(), PretrainConfig(), seed=0), (wave,)),
        "distill": (DistillModule(_small_encoder(), _features(), 3, DistillConfig(), seed=0), (wave, y)),
        "classifier": (Classifier(_small_encoder(), _features(), 3), (wave, y)),
        "probe": (LinearProbe(64, 3), (torch.randn(4, 64), y)),
    }


@pytest.mark.parametrize("name", ["ssl", "distill", "classifier", "probe"])
def test_every_stage_module_trains_with_parameters_and_inputs_on_the_meta_device(name):
    module, batch = _stage_modules()[name]
    place(module, META)
    assert all(p.device == META for p in module.parameters())
    for _ in range(2):  # twice: the mixup memory bank is filled by the first batch and drawn from by the second
        loss, logs = module(*to_device(batch, META))
        loss.backward()
        module.after_step()
        assert loss.device == META and all(torch.as_tensor(v).device == META for v in logs.values())
    assert all(p.grad is not None and p.grad.device == META for p in module.parameters() if p.requires_grad)


def test_augmentations_losses_and_the_kmeans_search_run_on_the_meta_device():
    x = torch.randn(4, 1, 64, 24, device=META, requires_grad=True)
    mixup = LogMixupExp(0.4, generator=torch.Generator().manual_seed(0))
    mixup(x)
    y = random_resize_crop(mixup(x), generator=torch.Generator().manual_seed(1))  # draws from the bank
    y.sum().backward()
    assert y.device == META and x.grad.device == META
    on_cpu = Augmenter(0.4, seed=0)
    on_cpu(torch.randn(4, 1, 64, 24))
    aug = Augmenter(0.4, seed=5)
    aug.load_state(on_cpu.state(), META)  # a checkpoint's bank (saved from the CPU) lands on the module's device
    assert aug.mixup.bank.device == META and aug(x.detach()).device == META

    z, labels = torch.randn(4, 5, device=META, requires_grad=True), torch.zeros(4, dtype=torch.long, device=META)
    distillation_loss(z, [z * 2], labels).backward()
    pairs = [(torch.randn(4, 8, device=META, requires_grad=True), torch.rand(4, 3, device=META, requires_grad=True))
             for _ in range(4)]
    loss, logs = slicer_loss(*pairs, 0.1, 1.0, 1.0)
    loss.backward()
    assert loss.device == META and logs["instance"].device == META

    idx, dist = nearest(torch.randn(10, 8, device=META), torch.randn(3, 8, device=META))
    assert idx.device == META and idx.shape == (10,) and dist.shape == (10,)


def test_the_nearest_centroid_search_finds_the_nearest():
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(50, 8, generator=gen), torch.randn(6, 8, generator=gen)
    idx, dist = nearest(x, c)
    want = torch.cdist(x, c).argmin(1)
    assert torch.equal(idx, want)
    torch.testing.assert_close(dist, ((x - c[want]) ** 2).sum(1), rtol=1e-4, atol=1e-4)


def test_batches_move_with_their_structure_and_leave_other_values_alone():
    batch = (torch.ones(2), [torch.zeros(1), "key"], {"y": torch.ones(1)}, ["k1", "k2"])
    moved = to_device(batch, META)
    assert moved[0].device == META and moved[1][0].device == META and moved[1][1] == "key"
    assert moved[2]["y"].device == META and moved[3] == ["k1", "k2"]


@pytest.mark.parametrize("env, allocated", [
    ({}, False), ({"CUDA_VISIBLE_DEVICES": ""}, False), ({"CUDA_VISIBLE_DEVICES": "-1"}, False),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, True), ({"SLURM_GPUS_ON_NODE": "4"}, True), ({"SLURM_GPUS_ON_NODE": "0"}, False),
])
def test_a_job_given_gpus_is_recognised(env, allocated):
    assert gpus_allocated(env) is allocated


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a torch without CUDA")
def test_the_device_is_chosen_in_one_place_and_gpus_without_cuda_are_refused(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(UnfusedError, match=NO_CUDA):
        choose_device("cuda")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "1")
    with pytest.raises(UnfusedError, match="this job was given GPUs but " + NO_CUDA):
        choose_device("auto")
    assert choose_device("cpu") == torch.device("cpu")  # on purpose: allowed
    with pytest.raises(ConfigError, match="run.device is 'tpu'"):
        choose_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a torch without CUDA")
def test_a_stage_given_gpus_on_a_torch_without_cuda_stops_with_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    r = subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pretrain", "-c", "configs/ci.yaml",
                        f"run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and NO_CUDA in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- through the real Trainer and DeepSpeed engine (a process of its own: it owns a process group) ------

class DeviceStrict(TrainModule):
    """Asserts that every input is on its parameters' device, and on the trainer's rank device."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.seen = 0

    def forward(self, x, y):
        from unfused_dist.engine.device import rank_device
        where = next(self.parameters()).device
        assert x.device == where and y.device == where == rank_device(), (x.device, y.device, where)
        self.seen += 1
        return F.cross_entropy(self.net(x), y), {"inputs_on": torch.tensor(1.0, device=x.device)}


def _one_process() -> None:
    """A process group of one on a free port (init_distributed picks it when MASTER_PORT is unset)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.pop("MASTER_PORT", None)


def _strict_worker(rank, out):
    _one_process()
    from unfused_dist.engine.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 8, generator=gen), torch.randint(3, (8,), generator=gen)) for _ in range(4)]
    module = DeviceStrict()
    trainer = Trainer(module, EngineConfig(zero_stage=1, save_every_steps=2, save_every_minutes=0),
                      OptimConfig(name="adamw", lr=1e-2, schedule="constant"), 8, 8, out / "ckpt", "t", "strict")
    progress = trainer.fit(lambda epoch, start: batches[start:], 4, 2, 8)
    torch.save({"seen": module.seen, "steps": progress.global_step,
                "logged": [h["inputs_on"] for h in progress.history]}, out / "result.pt")


def test_a_module_that_checks_its_inputs_devices_trains_through_the_real_engine(tmp_path):
    mp.start_processes(_strict_worker, args=(tmp_path,), nprocs=1, start_method="spawn", join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["seen"] == result["steps"] == 8 and result["logged"] == [1.0] * 8


def _bf16_worker(rank, out, precision):
    _one_process()
    from unfused_dist.engine.trainer import Trainer

    torch.manual_seed(0)
    cfg = PretrainConfig(ema=0.99)
    module = SSLModule(_small_encoder(), _features(), cfg, seed=0)
    names = ("encoder", "proj", "cluster")
    expected = [p.detach().double().clone() for n in names for p in module.momentum[n].parameters()]
    dtypes: set = set()
    module.encoder.fc[0].register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype)))
    module.features.register_forward_hook(lambda m, i, o: dtypes.add("features " + str(o.dtype)))
    after = module.after_step

    def recording_after_step():  # the fp64 EMA of the online weights as they are after each step
        online = [p.detach().double() for n in names for p in getattr(module, n).parameters()]
        for e, o in zip(expected, online):
            e.mul_(cfg.ema).add_(o, alpha=1 - cfg.ema)
        after()
    module.after_step = recording_after_step
    start = [p.detach().double().clone() for n in names for p in module.momentum[n].parameters()]
    gen = torch.Generator().manual_seed(1)
    batches = [(0.1 * torch.randn(8, 4000, generator=gen),) for _ in range(6)]
    trainer = Trainer(module, EngineConfig(zero_stage=1, precision=precision, save_every_steps=0,
                                           save_every_minutes=0),
                      OptimConfig(name="adamw", lr=1e-3, schedule="constant"), 8, 6, out / "ckpt", "t", "bf16")
    trainer.fit(lambda epoch, start: batches[start:], 6, 1, 8)
    got = [p.detach().double() for n in names for p in module.momentum[n].parameters()]
    moved_want = torch.cat([(e - s).flatten() for e, s in zip(expected, start)])
    moved_got = torch.cat([(g - s).flatten() for g, s in zip(got, start)])
    torch.save({"error": float((moved_got - moved_want).norm() / moved_want.norm()), "dtypes": sorted(dtypes),
                "momentum_dtypes": sorted({str(p.dtype) for p in module.momentum.parameters()}),
                "loss": trainer.progress.history[-1]["loss"]}, out / f"{precision}.pt")


def test_bf16_is_autocast_with_an_fp32_frontend_and_the_momentum_encoder_moves_as_an_fp32_ema(tmp_path):
    """Under DeepSpeed's own bf16 mode (the module cast to bf16) an EMA step of 1 % of a difference is mostly
    below bf16's rounding step, so the momentum weights barely move: the relative error of their movement
    is then near 1. Autocast keeps them fp32: the error is rounding only."""
    mp.start_processes(_bf16_worker, args=(tmp_path, "bf16"), nprocs=1, start_method="spawn", join=True)
    result = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert "torch.bfloat16" in result["dtypes"], result  # the encoder's matmuls ran in bf16
    assert "features torch.float32" in result["dtypes"]  # the log-mel frontend did not
    assert result["momentum_dtypes"] == ["torch.float32"]
    assert result["error"] < 1e-4, result
    assert torch.isfinite(torch.tensor(result["loss"]))

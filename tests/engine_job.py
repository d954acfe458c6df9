"""A small real training job for the engine tests, run under torchrun: real shards streamed by 2 DataLoader
workers per rank, a DeepSpeed engine at the ZeRO stage asked for, random crops and dropout (so RNG states
matter), checkpoints every few steps. It logs the sample keys of every batch it trains on and the step of
every save it starts, and can kill its whole process group (SIGKILL) at a chosen step or inside a chosen
save, send itself SIGTERM, or make a loss NaN at a chosen step, so the tests hit exact steps without
timing races."""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unfused_dist.config import EngineConfig, OptimConfig
from unfused_dist.data.loader import EpochLoader
from unfused_dist.data.source import ShardSource
from unfused_dist.data.stream import TrainingStream
from unfused_dist.engine.export import full_state_dict
from unfused_dist.engine.module import TrainModule
from unfused_dist.engine.trainer import Trainer, write_history

torch.set_num_threads(1)


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 4))

    def forward(self, x, y):
        x = x + 0.01 * torch.randn(x.shape).to(x.device)  # torch's global RNG: a resume must restore it
        return F.cross_entropy(self.net(x), y), {}


def transform(sample, rng: np.random.Generator):
    wave, label, key = crop(sample, rng)
    return wave.reshape(24, 64).mean(0), label, key


def crop(sample, rng: np.random.Generator):
    audio = sample.audio(16000)
    start = int(rng.integers(0, len(audio) - 1536))  # a random crop, seeded by the sample's place
    return audio[start:start + 1536], int(sample.key[1:]) % 4, sample.key


def distill_module() -> TrainModule:
    """The real distillation module (augmentation generator, mixup memory bank, BatchNorm, shallow heads)
    around a narrow AudioNTT, learning 4 classes from the raw crops."""
    from unfused_dist.audio.frontend import FrontendConfig
    from unfused_dist.config import DistillConfig
    from unfused_dist.models.encoder import AudioNTT
    from unfused_dist.stages.common import Features
    from unfused_dist.stages.distill import DistillModule

    torch.manual_seed(0)
    return DistillModule(AudioNTT(n_fc=2, d=64, channels=8), Features(FrontendConfig(), -5.0, 3.0), 4,
                         DistillConfig(), seed=0)


def main() -> None:
    from unfused_dist.log import setup

    setup()  # the trainer's messages (resumed, stopping, resharded) on stdout, as under `unfused run`
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--name", default="run", help="name of this invocation's key log")
    p.add_argument("--kill-at", type=int, default=-1, help="rank 0 SIGKILLs the whole job before this step")
    p.add_argument("--sigterm-at", type=int, default=-1, help="the last rank SIGTERMs itself before this step")
    p.add_argument("--reshard", action="store_true")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--keep", type=int, default=2, help="engine.keep_checkpoints")
    p.add_argument("--kill-in-save", type=int, default=-1,
                   help="rank 0 SIGKILLs the whole job inside this invocation's n-th save (1-based), after "
                        "DeepSpeed wrote its files")
    p.add_argument("--nan-at", type=int, default=-1, help="the last rank's inputs are NaN from this step on")
    p.add_argument("--config-hash", default="job")
    p.add_argument("--module", choices=("net", "distill"), default="net")
    args = p.parse_args()
    out = Path(args.out)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    stream = TrainingStream(ShardSource(args.data), crop if args.module == "distill" else transform, seed=3, shuffle=True, rank=rank, world=world,
                            workers=2, batch_size=4, shuffle_buffer=8)
    steps = stream.batches_per_epoch()
    engine = EngineConfig(zero_stage=args.zero, save_every_steps=args.save_every, save_every_minutes=0,
                          keep_checkpoints=args.keep, grad_accum=args.grad_accum)
    optim = OptimConfig(name="adamw", lr=0.05, weight_decay=0.01, warmup_steps=3, schedule="cosine")
    trainer = Trainer(distill_module() if args.module == "distill" else Net(), engine, optim, 4, steps * args.epochs, out / "ckpt", args.config_hash, "job",
                      reshard=args.reshard)
    log = open(out / f"keys-{args.name}-rank{rank}.jsonl", "a")
    _log_saves(trainer, out / f"saves-{args.name}.txt", rank, args.kill_in_save)

    class Logged(EpochLoader):
        """The stream's batches, each logged with its keys; the kills and the NaN the test asked for."""

        def batches(self, epoch, start):
            for i, (x, y, keys) in enumerate(super().batches(epoch, start), start=start):
                g = epoch * steps + i
                if g == args.kill_at and rank == 0:
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                if g == args.sigterm_at and rank == world - 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                log.write(json.dumps({"step": g, "keys": keys}) + "\n")
                log.flush()
                if 0 <= args.nan_at <= g and rank == world - 1:
                    x = x * float("nan")
                yield x, y

    progress = trainer.fit(Logged(stream), steps, args.epochs, 4)
    state = full_state_dict(trainer.module, args.zero)  # collective under ZeRO-3
    if rank == 0:
        torch.save(state, out / "final.pt")
        write_history(progress, out / "history.json")


def _log_saves(trainer: Trainer, path: Path, rank: int, kill_in: int) -> None:
    """Rank 0 appends the step of every save it starts to `path`; SIGKILLs the job inside save `kill_in`."""
    save, write = trainer.checkpoints.save, trainer.engine.save_checkpoint
    calls = []

    def logged(engine, step, *a, **k):
        calls.append(step)
        if rank == 0:
            with open(path, "a") as f:
                f.write(f"{step}\n")
            with open(path.with_name(path.name.replace("saves-", "windows-")), "a") as f:
                # micro-steps into the engine's accumulation window: 0 unless the save is the run's last
                f.write(f"{trainer.engine.micro_steps % trainer.cfg.grad_accum}\n")
        return save(engine, step, *a, **k)

    def dying(*a, **k):
        result = write(*a, **k)
        if len(calls) == kill_in and rank == 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return result
    trainer.checkpoints.save, trainer.engine.save_checkpoint = logged, dying


if __name__ == "__main__":
    main()

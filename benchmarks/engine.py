"""The training engine's overhead and the data wait of a real pre-training run.

1. Step time of the same model (the 2-FC AudioNTT student + a linear head on log-mel of 0.95 s clips), the
   same batches and the same optimizer (AdamW, warm-up + cosine), 1 process on the CPU:
   - through the engine (unfused_dist.engine.Trainer: DeepSpeed ZeRO-1, fp32, our schedule, history,
     per-step save/stop check; checkpoints off, as between two saves), against
   - a plain PyTorch loop (forward, backward, optimizer.step, scheduler.step).
   Rounds alternate (plain, engine, plain, engine, ...) so drift in the machine's speed hits both; the
   reported figure is the median step time over all measured steps. Target: engine / plain <= 1.05.
2. The data-wait share of a real pre-training run (`unfused run pretrain` on the ci corpus, SSL with the
   momentum encoder, 1 process, 2 DataLoader workers): the sum of the time each step waited for its batch
   over the sum of data wait + step time, from the run's history.json, first 3 steps excluded (worker
   start-up). Target: < 5 %. Needs `make data` (data/ci); skipped with a message otherwise.

    .venv/bin/python benchmarks/engine.py [--steps 30] [--rounds 3] [--batch 32] [--pretrain-steps 40]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _model():
    from unfused_dist.audio.frontend import FrontendConfig
    from unfused_dist.models.encoder import AudioNTT
    from unfused_dist.stages.common import Features
    from unfused_dist.stages.finetune import Classifier

    torch.manual_seed(0)
    audio = FrontendConfig()
    return Classifier(AudioNTT(n_fc=2, n_mels=audio.n_mels), Features(audio, 0.0, 1.0), 10)


def _batches(n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(0.1 * torch.randn(batch, 15200, generator=gen), torch.randint(10, (batch,), generator=gen))
            for _ in range(n)]


def _optim_cfg():
    from unfused_dist.config import OptimConfig
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2, warmup_steps=5, schedule="cosine")


def plain_steps(batches) -> list[float]:
    from unfused_dist.engine.schedule import build_optimizer, build_scheduler

    model = _model().train()
    opt = build_optimizer(model.parameters(), _optim_cfg())
    sched = build_scheduler(opt, len(batches), _optim_cfg())
    times = []
    for wave, y in batches:
        t0 = time.perf_counter()
        loss, _ = model(wave, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss.item()  # the engine reads the loss every step too
        times.append(time.perf_counter() - t0)
    return times


def engine_steps(batches, ckpt: Path, zero: int) -> list[float]:
    from unfused_dist.config import EngineConfig
    from unfused_dist.engine.trainer import Trainer

    trainer = Trainer(_model(), EngineConfig(zero_stage=zero, save_every_steps=0, save_every_minutes=0), _optim_cfg(),
                      micro_batch=len(batches[0][1]), total_steps=len(batches), ckpt_dir=ckpt, config_hash="bench",
                      desc="engine")
    trainer.checkpoints.save = lambda *a, **k: None  # checkpoints are not step time (the final one is skipped)
    progress = trainer.fit(lambda epoch, start: batches[start:], len(batches), 1, len(batches[0][1]))
    return [h["step_s"] + h["data_s"] for h in progress.history]


def compare(args) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    batches = _batches(args.steps + args.warmup, args.batch)
    plain, engine = [], {z: [] for z in args.zero}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        for r in range(args.rounds):
            plain += plain_steps(batches)[args.warmup:]
            for z in args.zero:
                engine[z] += engine_steps(batches, Path(tmp) / f"ckpt{r}-{z}", z)[args.warmup:]
    p = statistics.median(plain)
    print(f"\nstep time, batch {args.batch} x 0.95 s, 2-FC AudioNTT + linear head, AdamW, 1 process, "
          f"{torch.get_num_threads()} threads, {len(plain)} steps each (median):")
    print(f"  plain PyTorch loop        {p * 1000:8.1f} ms")
    for z, times in engine.items():
        e = statistics.median(times)
        ratio = e / p
        print(f"  unfused engine, ZeRO-{z}   {e * 1000:8.1f} ms   engine / plain {ratio:.3f}   "
              f"target <= 1.05: {'PASS' if ratio <= 1.05 else 'BELOW'}")


def data_wait(args) -> float | None:
    import json

    if not (ROOT / "data/ci/shards/pool/train/manifest.json").exists():
        print("\ndata wait: data/ci is missing (run `make data`); skipped")
        return None
    with tempfile.TemporaryDirectory(prefix="bench-wait-") as tmp:
        cmd = [sys.executable, "-m", "unfused_dist.cli", "run", "pretrain", "-c", str(ROOT / "configs/ci.yaml"),
               f"run.dir={tmp}/run", "run.nproc=1", "data.num_workers=2", f"pretrain.max_steps={args.pretrain_steps}",
               "engine.save_every_steps=0", "engine.save_every_minutes=0"]
        print(f"\ndata wait: {' '.join(cmd[1:])}", flush=True)
        # a fresh process group: not the one this process set up for the engine runs above
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        history = json.loads(Path(tmp, "run/pretrain/history.json").read_text())[3:]
    wait = sum(h["data_s"] for h in history)
    total = wait + sum(h["step_s"] for h in history)
    share = wait / total
    print(f"  {len(history)} SSL steps (batch 32, 2 workers): data wait {wait:.2f} s of {total:.1f} s = "
          f"{100 * share:.2f} %   target < 5 %: {'PASS' if share < 0.05 else 'BELOW'}")
    return share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="measured steps per round and method")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1], help="ZeRO stages to time the engine at")
    p.add_argument("--pretrain-steps", type=int, default=40)
    p.add_argument("--skip-data-wait", action="store_true")
    args = p.parse_args()
    compare(args)
    if not args.skip_data_wait:
        data_wait(args)


if __name__ == "__main__":
    main()

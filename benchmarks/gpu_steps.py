"""SSL and distillation step throughput of the real training path on this process's device.

A synthetic labelled corpus (noisy tones, `--clips` clips of 2 s, FLAC tar shards built by the real builder)
is large enough for `--batch` clips per step with `--workers` loader workers, whatever data is at hand.
For each stage body (pretrain: the 3-FC teacher with SSL and its momentum encoder; distill: the 2-FC
student with shallow heads on the corpus's labels as pseudo-labels) the real `train_encoder` runs `--steps`
steps, then its history.json gives: clips/s (the median step, after `--warmup` steps), the data-wait share
(the time steps waited for their batch, over wait + step time) and the peak device memory. One line per
stage, and all of it in `--json`. scripts/gpu_check.sh calls it; `--batch 8 --steps 3` runs on a CPU.

    python benchmarks/gpu_steps.py [--batch 256] [--steps 30] [--precision bf16] [--workers 8] [--json F]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_corpus(root: Path, clips: int, classes: int, seconds: float = 2.0) -> Path:
    """`clips` noisy tones (one frequency per class) built into root/shards/train; returns that split dir."""
    import soundfile as sf

    from shards_tools.build import build

    rng = np.random.default_rng(0)
    (root / "raw").mkdir(parents=True)
    t = np.arange(int(16000 * seconds)) / 16000
    rows = []
    for i in range(clips):
        label = i % classes
        x = 0.3 * np.sin(2 * np.pi * 150 * 1.07 ** label * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(root / "raw" / f"c{i:05d}.flac", x.astype("float32"), 16000)
        rows.append((f"raw/c{i:05d}.flac", f"class{label:02d}", "train"))
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    build(root / "manifest.csv", root / "shards", shard_samples=64, progress=False)
    return root / "shards" / "train"


def measure(stage: str, split: Path, out: Path, batch: int, steps: int, warmup: int, precision: str,
            workers: int, classes: int) -> dict:
    from unfused_dist.config import load_config
    from unfused_dist.data.source import ShardSource
    from unfused_dist.data.transforms import train_transform
    from unfused_dist.engine.device import rank_device
    from unfused_dist.models.encoder import AudioNTT
    from unfused_dist.stages.common import Features, train_encoder
    from unfused_dist.stages.distill import DistillModule
    from unfused_dist.stages.pretrain import SSLModule

    cfg = load_config(None, [f"run.dir={out}", "run.nproc=1", f"engine.precision={precision}",
                             f"data.num_workers={workers}", "engine.save_every_steps=0", "engine.save_every_minutes=0",
                             "metrics.enabled=false",
                             f"{stage}.batch_size={batch}", f"{stage}.max_steps={steps}", f"{stage}.epochs=1000"])
    source, features = ShardSource(split), Features(cfg.audio, -5.0, 4.0)
    torch.manual_seed(0)
    if stage == "pretrain":
        encoder = AudioNTT(n_fc=cfg.pretrain.n_fc, n_mels=cfg.audio.n_mels)
        module, transform, c = SSLModule(encoder, features, cfg.pretrain, 0), train_transform(cfg.audio, None), cfg.pretrain
    else:
        encoder = AudioNTT(n_fc=cfg.distill.n_fc, n_mels=cfg.audio.n_mels)
        module = DistillModule(encoder, features, classes, cfg.distill, 0)
        transform, c = train_transform(cfg.audio, "label"), cfg.distill
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_encoder(cfg, module, encoder, source, transform, c, out / stage, (-5.0, 4.0))
    history = json.loads((out / stage / "history.json").read_text())[warmup:]
    step, wait = [h["step_s"] for h in history], [h["data_s"] for h in history]
    device = rank_device()
    return {"stage": stage, "batch": batch, "steps": len(history) + warmup, "precision": precision,
            "workers": workers, "clips_s": batch / statistics.median(s + w for s, w in zip(step, wait)),
            "data_wait_share": sum(wait) / max(sum(wait) + sum(step), 1e-9),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out (worker start-up, kernel tuning)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--workers", type=int, default=8, help="data.num_workers")
    p.add_argument("--device", default="auto", help="run.device")
    p.add_argument("--clips", type=int, default=0, help="synthetic corpus size (default: enough for every worker)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from unfused_dist.engine.distributed import init_distributed

    init_distributed(args.device)
    classes = 32
    clips = args.clips or 2 * args.batch * max(args.workers, 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_steps_") as tmp:
        split = synthetic_corpus(Path(tmp) / "corpus", clips, classes)
        for stage in ("pretrain", "distill"):
            r = measure(stage, split, Path(tmp) / "run", args.batch, args.steps, min(args.warmup, args.steps - 1),
                        args.precision, args.workers, classes)
            mem = f"{r['peak_gpu_memory_gib']:.1f} GiB" if r["peak_gpu_memory_gib"] is not None else "n/a (CPU)"
            print(f"[gpu_steps] {stage}: batch {r['batch']}, {r['precision']}, {r['workers']} workers, on {r['device']}: "
                  f"{r['clips_s']:.0f} clips/s, data wait {100 * r['data_wait_share']:.1f} %, peak memory {mem}",
                  flush=True)
            results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

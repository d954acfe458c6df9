"""Unlabelled pre-training pool (AudioSet-like): real game music cut into fixed segments, plus the train
split of every labelled task (referenced, not copied), so SSL sees music and speech like its targets."""
from __future__ import annotations

import os
from pathlib import Path

from . import debs
from .common import SR, audio_windows, list_files, load_window, read_manifest, run_jobs, slug, write_audio

WINDOW_S = 30.0  # decode unit: one seek + decode per window is far cheaper than one per segment
EXTRA = ("task", "origin", "start_s")


def cut_window(job) -> list[dict]:
    pkg, root, rel, start, seg_s, task_dir = job
    x = load_window(root / rel, start, WINDOW_S)
    n = int(seg_s * SR)
    rows = []
    for k in range(len(x) // n):
        t = start + k * seg_s
        out = f"audio/{pkg}/{slug(Path(rel).stem)}_{int(t * 1000):08d}.flac"
        write_audio(task_dir / out, x[k * n: (k + 1) * n])
        rows.append({"path": out, "label": "", "split": "train", "source": pkg, "task": "music",
                     "origin": rel, "start_s": f"{t:.1f}"})
    return rows


def build(task_dir: Path, cfg: dict, cache: Path, workers: int, tasks: list[str]):
    jobs = []
    for pkg, budget in cfg["pool_seconds"].items():
        root = debs.fetch(pkg, cache)
        files = [f for f in list_files(root, ".ogg") + list_files(root, ".wav") if "/doc/" not in str(f)]
        if not files:
            raise debs.SourceError(f"package `{pkg}` holds no .ogg/.wav audio")
        for rel, start in audio_windows(files, root, pkg, budget, WINDOW_S):
            jobs.append((pkg, root, rel, start, cfg["segment_seconds"], task_dir))
    rows = [r for chunk in run_jobs(cut_window, jobs, workers, "pool") for r in chunk]
    for task in tasks:  # relative paths keep the whole output directory relocatable
        task_csv = task_dir.parent / task / "manifest.csv"
        for r in read_manifest(task_csv):
            if r["split"] == "train":
                rel = os.path.relpath(task_csv.parent / r["path"], task_dir)
                rows.append({"path": rel, "label": "", "split": "train", "source": r["source"],
                             "task": task, "origin": r["path"], "start_s": ""})
    return rows, list(EXTRA), list(cfg["pool_seconds"])

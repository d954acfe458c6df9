"""The stages in order on this machine. Each stage runs as its own process (as it would as a SLURM job),
training stages under torchrun when run.nproc > 1; a stage whose done.json exists is skipped."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .artefacts import is_done
from .config import Config
from .errors import UnfusedError

TRAINING = {"pretrain", "distill"}


def stage_names(cfg: Config) -> list[str]:
    return ["pretrain", "pseudolabel", "distill", *[f"finetune-{r}" for r in cfg.finetune.rows], "evaluate"]


def stage_dir(cfg: Config, name: str) -> Path | None:
    """Where a stage's done.json lives (None: the stage always runs, e.g. the cheap report)."""
    if name.startswith("finetune-"):
        return cfg.run.path / "finetune" / name.split("-", 1)[1]
    return None if name == "evaluate" else cfg.run.path / name


def run_stage(cfg: Config, name: str) -> None:
    """Run one stage in this process (under torchrun, in every rank)."""
    from .stages import distill, evaluate, finetune, pretrain, pseudolabel

    if name.startswith("finetune-"):
        finetune.run(cfg, name.split("-", 1)[1])
        return
    runners = {"pretrain": pretrain.run, "pseudolabel": pseudolabel.run, "distill": distill.run,
               "evaluate": evaluate.run}
    if name not in runners:
        raise UnfusedError(f"unknown stage '{name}'; stages: {', '.join(stage_names(cfg))}, or 'pipeline'")
    runners[name](cfg)


def stage_command(cfg: Config, name: str, config_path: Path) -> list[str]:
    cli = ["-m", "unfused_dist.cli", "run", name, "-c", str(config_path)]
    trains = name in TRAINING or (name.startswith("finetune-") and not name.endswith("_probe"))
    if cfg.run.nproc > 1 and trains:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.run.nproc}",
                *cli]
    return [sys.executable, *cli]


def check_inputs(cfg: Config) -> None:
    """Fail in a second, not after an hour of pre-training: every dataset the stages read must exist,
    and the target must be labelled with at least two classes."""
    from .data.manifest import DatasetManifest

    DatasetManifest.load(cfg.data.pool)
    for split in ("train", "val", "test"):
        labels = DatasetManifest.load(Path(cfg.data.target) / split).labels or []
        if len(labels) < 2:
            raise UnfusedError(f"{Path(cfg.data.target) / split}: the target dataset needs labels (found "
                               f"{len(labels)} classes); build it from a manifest with a label column")


def run_pipeline(cfg: Config, config_path: Path) -> None:
    t_start = time.time()
    summary = []
    for name in stage_names(cfg):
        d = stage_dir(cfg, name)
        if d is not None and is_done(d):
            print(f"[pipeline] {name}: done already ({d / 'done.json'}), skipped")
            summary.append((name, "skipped", 0.0))
            continue
        cmd = stage_command(cfg, name, config_path)
        print(f"[pipeline] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise UnfusedError(f"stage '{name}' failed (exit {rc}); fix the error above and re-run the same "
                               "command: finished stages are skipped")
        summary.append((name, "ran", time.time() - t0))
    print("[pipeline] summary: " + ", ".join(f"{n} {s}{f' {t:.0f}s' if t else ''}" for n, s, t in summary)
          + f"; total {time.time() - t_start:.0f}s; run dir {cfg.run.path}")

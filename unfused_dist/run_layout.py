"""Every path under a run directory, in one place. Stages, launchers and reports ask a RunLayout where
things are; none joins run paths itself. (Inside its own directory a stage names its own files.)

    RUN/config.yaml                       the run's config, as every stage reads it
    RUN/<stage out>/                      per stage (stage_table.py): done.json, history.json, ckpt/, ...
    RUN/pseudolabel/embeddings/           the teacher's embeddings, one .npy per shard
    RUN/results.{json,md,png}, losses.png the report (evaluate)
    RUN/slurm/<job>/<id>/                 submitit's job folders; RUN/launch.json what was launched
    RUN/metrics/targets/                  Prometheus file_sd targets (unless metrics.targets_dir)
    <target train split>/labels/<run name>-<hash of RUN>/   the label shards (the data contract's place)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .stage_table import STAGES, StageTable, table_of

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class RunLayout:
    root: Path
    table: StageTable = STAGES  # where each stage's directory is

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        return cls(cfg.run.path, table_of(cfg))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def stage(self, name: str) -> Path | None:
        """Stage `name`'s directory (None for a stage without one, such as evaluate)."""
        out = self.table.stage(name).out
        return None if out is None else self.root / out

    def row(self, row: str) -> Path:
        return self.root / self.table.stage(f"finetune-{row}").out

    def ckpt(self, stage: str) -> Path:
        return self.stage(stage) / "ckpt"

    def history(self, stage: str) -> Path:
        return self.stage(stage) / "history.json"

    @property
    def embeddings(self) -> Path:
        return self.stage("pseudolabel") / "embeddings"

    @property
    def pseudolabel_report(self) -> Path:
        return self.stage("pseudolabel") / "report.json"

    def results(self, suffix: str) -> Path:
        """results.json, results.md, results.png."""
        return self.root / f"results.{suffix}"

    @property
    def losses_plot(self) -> Path:
        return self.root / "losses.png"

    def slurm(self, job: str) -> Path:
        return self.root / "slurm" / job

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"

    @property
    def launch_file(self) -> Path:
        return self.root / "launch.json"

    @property
    def launch_lock(self) -> Path:
        return self.root / ".launch.lock"  # held while a launch checks the queue and submits

    def metrics_targets(self, targets_dir: str = "") -> Path:
        return Path(targets_dir) if targets_dir else self.root / "metrics" / "targets"

    def labels(self, train_split: Path) -> Path:
        """labels/<RUN>/ inside the target's training split, as the data contract says. <RUN> is the run
        folder's name plus a short hash of its absolute path: two runs whose folders share a name (a/run,
        b/run) on one dataset must never write, or read, each other's label shards."""
        run = self.root.resolve()
        return Path(train_split) / "labels" / f"{run.name}-{hashlib.sha256(str(run).encode()).hexdigest()[:8]}"

    @property
    def key(self) -> str:
        """8 hex digits of the resolved run directory: the same for every job (and restart) of a run."""
        return hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]

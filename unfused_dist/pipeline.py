"""The stages in order on this machine. Each stage runs as its own process (as it would as a SLURM job),
training stages under torchrun when run.nproc > 1; a stage whose done.json exists is skipped."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .artefacts import atomic_write_text, is_done
from .config import Config
from .errors import UnfusedError
from .run_layout import RunLayout
from .stage_table import table_of
from .log import logger

log = logger("pipeline")

# Written in a stage dir by a stage that saved a checkpoint and stopped on a signal (Preempted): under
# torchrun the exit code cannot tell that apart from a crash, since torchrun itself exits 1 on SIGTERM.
STOPPED = "stopped.json"


def stage_names(cfg: Config) -> list[str]:
    return table_of(cfg).names(cfg)


def stage_dir(cfg: Config, name: str) -> Path | None:
    """Where a stage's done.json lives (None: the stage always runs, e.g. the cheap report)."""
    return RunLayout.of(cfg).stage(name)


def run_stage(cfg: Config, name: str, reshard: bool = False) -> None:
    """Run one stage in this process (under torchrun, in every rank)."""
    from .engine.distributed import launch_rank
    from .engine.preemption import Preempted

    runner = table_of(cfg).stage(name).load()
    if reshard:  # this command only: the run dir's config.yaml keeps engine.reshard as it was
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, reshard=True))
    if launch_rank().world > 1:
        from .engine.distributed import init_distributed
        # The rank's device is chosen here, before any collective and before any stage code asks is_main()
        # (otherwise every rank would think it is rank 0). A single process starts its process group where a
        # stage first needs one, with the same run.device (an in-process caller, e.g. a test that runs a
        # stage and then launches jobs, keeps an environment without a rendezvous port in it).
        init_distributed(cfg.run.device)
    try:
        runner(cfg)
    except Preempted as stop:
        d = stage_dir(cfg, name)
        if d is not None and launch_rank().rank == 0:
            atomic_write_text(d / STOPPED, json.dumps({"step": stop.step, "signal": stop.signal}))
        raise


def stage_command(cfg: Config, name: str, config_path: Path, reshard: bool = False) -> list[str]:
    cli = ["-m", "unfused_dist.cli", "run", name, "-c", str(config_path), *(["--reshard"] if reshard else [])]
    if cfg.run.nproc > 1 and table_of(cfg).stage(name).ranked:
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


def run_pipeline(cfg: Config, config_path: Path, reshard: bool = False) -> None:
    t_start = time.time()
    summary = []
    for name in stage_names(cfg):
        d = stage_dir(cfg, name)
        if d is not None and is_done(d):
            log.info(f"{name}: done already ({d / 'done.json'}), skipped")
            summary.append((name, "skipped", 0.0))
            continue
        cmd = stage_command(cfg, name, config_path, reshard)
        log.info(f"{name}: {' '.join(cmd[1:])}")
        t0 = time.time()
        if d is not None:
            (d / STOPPED).unlink(missing_ok=True)  # only this attempt's stop counts
        rc, signalled = _run_forwarding_signals(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"})
        if _stopped_after_saving(d, rc):
            log.info(f"{name}: stopped by {signalled or 'a signal'} after saving a checkpoint; "
                     "run the same command again to resume")
            return
        if rc != 0 and signalled:
            raise UnfusedError(f"stage '{name}' was stopped by {signalled} before it saved a checkpoint (exit {rc}); "
                               "run the same command again: it resumes from the stage's last checkpoint, if any")
        if rc != 0:
            raise UnfusedError(f"stage '{name}' failed (exit {rc}); fix the error above and re-run the same "
                               "command: finished stages are skipped")
        if signalled:  # the stage finished as the signal came: start no other
            log.info(f"{name}: finished; stopping on {signalled} before the next stage; run the same "
                     "command again to go on")
            return
        summary.append((name, "ran", time.time() - t0))
    log.info("summary: " + ", ".join(f"{n} {s}{f' {t:.0f}s' if t else ''}" for n, s, t in summary)
             + f"; total {time.time() - t_start:.0f}s; run dir {cfg.run.path}")


def _stopped_after_saving(d: Path | None, rc: int) -> bool:
    """A stage that saved a checkpoint on a signal raises Preempted: it leaves STOPPED, and a process of its
    own exits 0 without done.json. A stage killed before it could save exits non-zero without STOPPED."""
    if d is None:
        return False
    return (d / STOPPED).is_file() or (rc == 0 and not is_done(d))


def _run_forwarding_signals(cmd: list[str], env: dict) -> tuple[int, str | None]:
    """Run a stage; SIGTERM/SIGUSR2 sent to the pipeline go to the stage as SIGTERM (torchrun passes that
    on to every rank), which saves a checkpoint and stops. Returns (exit code, signal name or None)."""
    received: list[str] = []
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        received.append(signal.Signals(signum).name)
        child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        rc = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return rc, (received[0] if received else None)

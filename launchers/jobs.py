"""What runs inside a SLURM (or local submitit) job: one stage, or one part of an array, of a run whose
directory and config were fixed at launch, so a requeued job finds its checkpoint.

Signals: on SIGTERM (preemption, `scontrol requeue`, scancel) the engine saves and every rank exits; SLURM
requeues the job itself when that was a preemption or a requeue. On SIGUSR2 (sent `signal_seconds` before
the time limit) the engine saves, then rank 0 hands the signal back to submitit, which requeues the job.
"""
from __future__ import annotations

import os
import signal

import submitit


class StageJob(submitit.helpers.Checkpointable):
    """Callable pickled by submitit: `StageJob()(config_path, job, part, parts)`. Checkpointable, so
    submitit requeues it (with the same arguments) after a time-out signal."""

    def __call__(self, config_path: str, job: str, part: int | None = None, parts: int | None = None) -> str:
        from unfused_dist.config import load_config
        from unfused_dist.engine.preemption import Preempted
        from unfused_dist.log import setup

        setup()  # the library's messages into the job's .out / .err files
        cfg = load_config(config_path)
        spec = slurm_job(cfg, job)
        if spec.ranked:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the SLURM (or local) job environment
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        import torch

        if os.environ.get("SLURM_CPUS_PER_TASK"):  # as many compute threads as the job was given CPUs
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        try:
            run_job(cfg, job, part, parts)
        except Preempted as stop:
            if stop.signal == "SIGUSR2":  # time limit ahead: submitit's handler checkpoints + requeues
                signal.raise_signal(signal.SIGUSR2)
            raise SystemExit(0) from None
        return f"{job} done" + (f" (part {part + 1}/{parts})" if parts else "")


def slurm_job(cfg, job: str):
    """The stage table's declaration of SLURM job `job`."""
    from unfused_dist.stage_table import table_of

    table = table_of(cfg)
    for stage in table.stages:
        for declared in stage.slurm_jobs():
            if declared.name == job:
                return declared
    table.stage(job)  # raises: unknown
    raise AssertionError(job)


def run_job(cfg, job: str, part: int | None, parts: int | None) -> None:
    """A job that is a whole stage runs as one (run_stage); a part of a stage calls its own function,
    an array task with its part of the shards (each array task is a process group of its own)."""
    from unfused_dist.pipeline import run_stage
    from unfused_dist.stage_table import resolve, table_of

    if job in [s.name for s in table_of(cfg).stages]:
        run_stage(cfg, job)
    elif parts:
        resolve(slurm_job(cfg, job).runner)(cfg, part, parts)
    else:
        resolve(slurm_job(cfg, job).runner)(cfg)

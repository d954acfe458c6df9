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
        if job_kind(job) in MULTI_RANK:
            # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from the SLURM (or local) job environment
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        import torch

        from unfused_dist.config import load_config
        from unfused_dist.engine.preemption import Preempted

        if os.environ.get("SLURM_CPUS_PER_TASK"):  # as many compute threads as the job was given CPUs
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))

        cfg = load_config(config_path)
        try:
            run_job(cfg, job, part, parts)
        except Preempted as stop:
            if stop.signal == "SIGUSR2":  # time limit ahead: submitit's handler checkpoints + requeues
                signal.raise_signal(signal.SIGUSR2)
            raise SystemExit(0) from None
        return f"{job} done" + (f" (part {part + 1}/{parts})" if parts else "")


# Jobs whose tasks form one torch.distributed process group.
MULTI_RANK = {"pretrain", "distill", "pseudolabel-fit", "finetune"}


def run_job(cfg, job: str, part: int | None, parts: int | None) -> None:
    from unfused_dist.pipeline import run_stage
    from unfused_dist.stages import pseudolabel

    if job == "pseudolabel-embed":
        pseudolabel.embed(cfg, part, parts)  # each array task is a process group of its own
    elif job == "pseudolabel-fit":
        pseudolabel.fit(cfg)
    elif job == "pseudolabel-assign":
        pseudolabel.assign(cfg, part, parts)
    elif job == "pseudolabel-finish":
        pseudolabel.finish(cfg)
    else:
        run_stage(cfg, job)


def job_kind(job: str) -> str:
    """The resources section a job uses: finetune-<row> -> finetune."""
    return "finetune" if job.startswith("finetune-") else job

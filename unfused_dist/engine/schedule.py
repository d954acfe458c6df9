"""Optimizers and the learning-rate schedule. The schedule is ours (not DeepSpeed's) so its position is the
optimizer step count, saved in every checkpoint and continued after a resume."""
from __future__ import annotations

import math

import torch

from ..config import EngineConfig, OptimConfig
from ..log import logger


def build_optimizer(params, cfg: OptimConfig, engine: EngineConfig | None = None) -> torch.optim.Optimizer:
    """Torch optimizers on the CPU (DeepSpeed's own JIT-compile for ~70 s each); on a GPU, DeepSpeed's
    fused Adam (CPUAdam when the optimizer is offloaded), falling back to torch's fused kernels when
    DeepSpeed's ops cannot be built there."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name not in ("adam", "adamw"):
        raise ValueError(f"optim.name '{cfg.name}' is not one of sgd, adam, adamw")
    if torch.cuda.is_available():
        fused = _deepspeed_adam(params, cfg, offload=engine is not None and engine.offload == "cpu")
        if fused is not None:
            return fused
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=torch.cuda.is_available() or None)


def _deepspeed_adam(params, cfg: OptimConfig, offload: bool):
    try:
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    adamw_mode=cfg.name == "adamw")
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, adam_w_mode=cfg.name == "adamw")
    except Exception as e:  # noqa: BLE001 - no compiler/CUDA toolkit on the node: still train
        logger("optim").warning(f"DeepSpeed's fused Adam is not available ({type(e).__name__}: {e}); using torch's")
        return None


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up over cfg.warmup_steps, then cosine to 0 at `total` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule '{cfg.schedule}' is not one of cosine, constant")
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, total_steps: int, cfg: OptimConfig, start=0):
    """`start`: the optimizer steps already taken (a resharded resume), so the schedule goes on from there;
    an int, or a function read at every step (a resharded resume learns its start only in fit, see
    restart_schedule). A plain resume needs no `start`: DeepSpeed restores the scheduler's own step count."""
    origin = start if callable(start) else (lambda: start)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s + origin(), total_steps, cfg))


def restart_schedule(scheduler) -> None:
    """Re-apply the learning rate of a schedule that has not stepped yet, after its `start` changed."""
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs

"""Engine config -> DeepSpeed config, with the combinations that cannot work refused up front."""
from __future__ import annotations

import torch

from ..config import ConfigError, EngineConfig


def deepspeed_config(cfg: EngineConfig, micro_batch: int, world: int) -> dict:
    check(cfg)
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * cfg.grad_accum * world,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # DeepSpeed runs in fp32 whatever engine.precision says: bf16 is autocast around the forward
        # (precision.py), so weights, optimizer, frontend, BatchNorm statistics and the EMA stay fp32.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our torch optimizers are fine under ZeRO 1-3
        "zero_force_ds_cpu_optimizer": False,  # offload with a torch optimizer (slower than CPUAdam, no build)
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def check(cfg: EngineConfig) -> None:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage is {cfg.zero_stage}; use 0, 1, 2 or 3")
    if cfg.precision == "fp16":
        raise ConfigError("engine.precision=fp16 is not supported (it would need loss scaling and an fp32 frontend); "
                          "use bf16: as fast on A100/H100-class GPUs, with fp32's range")
    if cfg.offload == "cpu" and cfg.zero_stage == 0:
        raise ConfigError("engine.offload=cpu needs engine.zero_stage 1, 2 or 3 (offload moves ZeRO partitions)")
    if cfg.grad_accum < 1:
        raise ConfigError(f"engine.grad_accum is {cfg.grad_accum}; use 1 or more")

"""Process-group set-up for one or many processes (torchrun / SLURM env vars), CPU (gloo) or GPU (nccl)."""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Initialise DeepSpeed's process group from RANK/WORLD_SIZE (1 process when they are absent)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not dist.is_initialized():
        import deepspeed
        if not torch.cuda.is_available():
            # On the CPU DeepSpeed JIT-compiles a shared-memory op (~70 s) that gloo does not need.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_object(obj):
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def average_buffers(module: torch.nn.Module) -> None:
    """BatchNorm running statistics differ per rank (each sees its own data): average them so every rank,
    and the exported encoder, holds the same values."""
    world = rank_world()[1]
    if world == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)

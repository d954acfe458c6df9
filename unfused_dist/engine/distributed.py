"""Process-group set-up for one or many processes (torchrun / SLURM env vars), CPU (gloo) or GPU (nccl)."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .device import backend_for, bind, choose_device, rank_device


@dataclass(frozen=True)
class LaunchRank:
    rank: int
    local_rank: int
    world: int


def launch_rank() -> LaunchRank:
    """What the launcher (torchrun, or SLURM through submitit) made this process, before any process group
    exists: RANK, LOCAL_RANK and WORLD_SIZE from the environment (0, 0, 1 where absent). The one place
    those variables are read; once a group exists, rank_world() answers."""
    env = os.environ
    return LaunchRank(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Initialise DeepSpeed's process group from RANK/WORLD_SIZE (1 process when they are absent), on this
    rank's device (`run.device`, see device.py): the first call decides; later calls return rank and world."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        if os.environ["WORLD_SIZE"] == "1" and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A process group of one agrees on nothing with anyone: a free port, whatever a launcher exported
            # (submitit derives one from the job id, which another job's connection on the node may hold).
            # Not under torchrun, whose agent already serves the store at MASTER_PORT.
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("MASTER_PORT", "29500")
        chosen = choose_device(device, launch_rank().local_rank)
        bind(chosen)  # before the process group: NCCL binds each rank to the current device
        import deepspeed
        if chosen.type == "cpu":
            # On the CPU DeepSpeed JIT-compiles a shared-memory op (~70 s) that gloo does not need.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend_for(chosen), verbose=False)
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def all_reduce_max(flags: list[float]) -> list[float]:
    """Element-wise max over ranks of a few flags (one tiny all-reduce; NCCL reduces GPU tensors only)."""
    if rank_world()[1] == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.float32, device=rank_device())  # NCCL reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_reduce_sum(a: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of a float array (float64 on the wire: k-means sums must not drift)."""
    if rank_world()[1] == 1:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(rank_device())  # NCCL: GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


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

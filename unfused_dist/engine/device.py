"""Where this process computes: one device per rank, chosen once (`run.device`), before the first collective.

`auto` is cuda:LOCAL_RANK when torch sees CUDA, else the CPU; `cuda` insists on a GPU; `cpu` stays on the
CPU even on a GPU node. A job that was given GPUs (SLURM, or CUDA_VISIBLE_DEVICES) on a torch without CUDA
is refused: training it on the CPU would take days and look like it works.

Everything else asks `rank_device()`, which reads the choice back from the process group's backend (nccl:
the current CUDA device; gloo: the CPU), so the fact lives in one place: the process group.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..config_rules import CHOICES
from ..errors import ConfigError, UnfusedError

DEVICES = CHOICES[RunConfig]["device"]
NO_CUDA = "torch has no CUDA: install a CUDA torch; see README 'Running on GPUs'"


def gpus_allocated(env: dict[str, str] | None = None) -> bool:
    """Whether the scheduler (or the user) gave this job GPUs."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return True
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    return on_node.isdigit() and int(on_node) > 0


def choose_device(setting: str = "auto", local_rank: int = 0) -> torch.device:
    """The device for the process of `local_rank` on its node (pure: sets nothing). Raises with one line when
    it cannot be had."""
    if setting not in DEVICES:
        raise ConfigError(f"run.device is '{setting}'; use one of {', '.join(DEVICES)}")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if setting == "cuda" or gpus_allocated():
            why = "run.device=cuda" if setting == "cuda" else "this job was given GPUs"
            raise UnfusedError(f"{why} but {NO_CUDA} (or set run.device=cpu to train on the CPU on purpose)")
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UnfusedError(f"LOCAL_RANK {local_rank} but this node shows {torch.cuda.device_count()} GPU(s): start at "
                           "most one process per GPU (run.nproc, or SLURM's tasks per node)")
    return torch.device("cuda", local_rank)


def bind(device: torch.device) -> None:
    """Make `device` this process's own before any collective (NCCL would otherwise put every rank of a node
    on cuda:0), and keep DeepSpeed on the CPU when the CPU was chosen on a GPU node."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for the fp32 matmuls and convolutions of fp32 runs (bf16 runs use autocast anyway).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device() -> torch.device:
    """This rank's device, as chosen when the process group started (the CPU before that)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A module's parameters and buffers on `device` (the trainer does this before it builds the optimizer;
    the stages before they embed or evaluate)."""
    return module.to(device)


def to_device(batch, device: torch.device):
    """A batch (tensor, or a tuple/list/dict of them and of other values such as keys) on `device`.
    On CUDA the copy is asynchronous from page-locked memory, so the next batch's host work overlaps it."""
    if torch.is_tensor(batch):
        if batch.device == device:
            return batch
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if hasattr(batch, "_make"):  # a NamedTuple batch kind
        return batch._make(to_device(b, device) for b in batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch

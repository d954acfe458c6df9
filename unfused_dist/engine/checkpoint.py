"""Checkpoints that survive crashes: DeepSpeed's files plus our own, a manifest written last, keep-last-K,
and a fallback past a corrupt or partial newest checkpoint.

    CKPT_DIR/step00000120/            one directory (DeepSpeed "tag") per save
        mp_rank_00_model_states.pt    DeepSpeed: module, scheduler, client_state (rank 0's view)
        *_optim_states.pt             DeepSpeed: each rank's ZeRO partition
        rank00000.pt ...              ours: each rank's RNG states and module-owned state (weights_only)
        history.json                  ours: the per-step log (loss, learning rate, throughput) so far
        unfused.json                  ours, written by rank 0 after every rank finished: world size, step,
                                      and the size of every file above. No unfused.json = not complete.
    CKPT_DIR/latest                   the newest complete tag (DeepSpeed's pointer; moved last)
    CKPT_DIR/partial-stepNNNNNNNN/    a save in progress: renamed to its tag once complete, so a crash
                                      mid-save never touches a complete checkpoint

The directory must be shared by all ranks (as DeepSpeed requires for multi-node resume).
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..artefacts import atomic_write_text
from ..errors import UnfusedError
from .distributed import all_gather_object, barrier, is_main, rank_world
from ..log import logger


class ResumeError(UnfusedError, RuntimeError):
    """A checkpoint that cannot be resumed from as asked."""


META = "unfused.json"
HISTORY = "history.json"
TAG_PREFIX = "step"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's name for it (no model parallelism)
PARTIAL_PREFIX = "partial-"  # not TAG_PREFIX: tags() never sees a save in progress


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 2):
        self.dir, self.keep = Path(directory), max(1, keep)

    def tags(self) -> list[str]:
        """Every tag directory, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p.name for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)),
                      reverse=True)

    def save(self, engine, step: int, client_state: dict, rank_state: dict, meta: dict) -> str:
        """Collective: every rank calls it. Everything is written under a partial name; after every rank
        has finished, rank 0 writes the manifest, renames it to its tag and moves `latest`, so a crash at
        any moment leaves the previous checkpoints as they were."""
        tag, partial = tag_for(step), PARTIAL_PREFIX + tag_for(step)
        if is_main():
            for stale in self.dir.glob(PARTIAL_PREFIX + "*"):  # saves a crashed run left unfinished
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.dir), tag=partial, client_state=client_state, save_latest=False)
        torch.save(rank_state, self.dir / partial / rank_file(rank_world()[0]))
        if is_main():  # readable without DeepSpeed, e.g. by a resharded resume
            atomic_write_text(self.dir / partial / HISTORY, json.dumps(client_state.get("history", [])))
        barrier()
        if is_main():
            files = {str(p.relative_to(self.dir / partial)): p.stat().st_size
                     for p in sorted((self.dir / partial).rglob("*")) if p.is_file()}
            atomic_write_text(self.dir / partial / META, json.dumps({**meta, "tag": tag, "files": files}))
            self._publish(partial, tag)
            self._prune()
        barrier()
        return tag

    def _publish(self, partial: str, tag: str) -> None:
        """Give a complete save its tag. A directory already there is one the trainer does not resume
        from (a save a crash cut short, or one skipped as damaged): only now, with its replacement
        complete, does it go."""
        shutil.rmtree(self.dir / tag, ignore_errors=True)
        (self.dir / partial).rename(self.dir / tag)
        atomic_write_text(self.dir / "latest", tag)

    def retag(self, tag: str, step: int) -> str:
        """Rank 0, after a resharded resume loaded `tag`: the new layout numbers its steps afresh, so the
        old layout's checkpoints would sort as newer than its own. Keep only `tag`, renamed to `step`
        (where the new layout restarts), so a crash before the next save reshards from it again."""
        for other in self.tags():
            if other != tag:
                shutil.rmtree(self.dir / other, ignore_errors=True)
        new = tag_for(step)
        if new != tag:
            (self.dir / tag).rename(self.dir / new)
        atomic_write_text(self.dir / "latest", new)
        return new

    def newest_complete(self) -> tuple[str, dict] | None:
        """The newest tag that every rank finds complete and intact, warning about each newer one skipped."""
        mine = []
        for tag in self.tags():
            problem = self.problem(tag)
            if problem is None:
                mine.append(tag)
            elif is_main():
                logger("checkpoint").warning(f"skipping {self.dir / tag}: {problem}; falling back to an older "
                                             "checkpoint")
        # every rank must load the same tag: the newest one all of them can read
        common = set.intersection(*(set(t) for t in all_gather_object(mine)))
        if not common:
            return None
        tag = max(common)
        return tag, json.loads((self.dir / tag / META).read_text())

    def problem(self, tag: str) -> str | None:
        """Why `tag` cannot be resumed from, or None."""
        try:
            meta = json.loads((self.dir / tag / META).read_text())
        except FileNotFoundError:
            return f"incomplete (no {META}: the save did not finish)"
        except (OSError, ValueError) as e:
            return f"unreadable {META} ({e})"
        for name, size in meta.get("files", {}).items():
            path = self.dir / tag / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} were written (truncated or changed)"
        return None

    def history(self, tag: str) -> list[dict]:
        return json.loads((self.dir / tag / HISTORY).read_text())

    def fp32_weights(self, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
        """The module's consolidated fp32 weights, whatever the number of processes that saved them."""
        where = self.dir / tag
        if zero_stage > 0:  # trainable weights from every rank's fp32 partitions; the rest from the module file
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            for path in sorted(where.glob("*.pt")):  # zero_to_fp32 unpickles freely: only data may reach it
                load_weights_only(path, mmap=True)
            return get_fp32_state_dict_from_zero_checkpoint(str(self.dir), tag=tag)
        # stage 0: every rank holds the whole module, saved as is (in fp32: mixed precision is autocast, so the
        # module's own weights are the fp32 master weights) in the model states file
        return load_weights_only(where / MODEL_STATES)["module"]

    def load_rank_state(self, tag: str, rank: int) -> dict:
        return load_weights_only(self.dir / tag / rank_file(rank))

    def _prune(self) -> None:
        """Keep the `keep` newest complete checkpoints; anything older goes (complete or not)."""
        complete = [t for t in self.tags() if self.problem(t) is None]
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[self.keep - 1]
        for tag in self.tags():
            if tag < oldest_kept:
                shutil.rmtree(self.dir / tag, ignore_errors=True)


# --- each rank's RNG states (python, numpy, torch), saved in its own file --------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    """random.setstate wants the nested tuples back (a save/load round trip may give lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _deepspeed_data_classes() -> list:
    """The only non-tensor classes DeepSpeed pickles into its checkpoint files (0.19: found by loading
    ZeRO 0-3 checkpoints weights-only); plain data, nothing that runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True (tensors, containers, numbers, strings and DeepSpeed's few data
    classes): a checkpoint directory writable by others can hand us data, never code. mmap: only check
    what a file holds, without reading its tensors into memory (torch can map only zip-format files)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), str(e)[:200])
        raise ResumeError(f"{path}: refused to load: it holds more than weights ({found}); a checkpoint "
                          "written by this framework never does: move the checkpoint away (or, if you trust it "
                          "and DeepSpeed stores a new data class, add it to _deepspeed_data_classes)") from None


def load_deepspeed_weights_only(engine) -> None:
    """DeepSpeed's checkpoint engine unpickles with weights_only=False (any code in a pickle runs): make the
    engine's resume go through load_weights_only instead."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine.load = load_weights_only

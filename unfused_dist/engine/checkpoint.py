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

The directory must be shared by all ranks (as DeepSpeed requires for multi-node resume).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from ..artefacts import atomic_write_text
from .distributed import all_gather_object, barrier, is_main, rank_world

META = "unfused.json"
HISTORY = "history.json"
TAG_PREFIX = "step"


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
        """Collective: every rank calls it. The manifest and `latest` are written only after every rank
        has finished writing, so a crash at any moment leaves the previous checkpoint the newest complete one."""
        tag = tag_for(step)
        if is_main():
            shutil.rmtree(self.dir / tag, ignore_errors=True)  # a partial save from a run that crashed
        barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, self.dir / tag / rank_file(rank_world()[0]))
        if is_main():  # readable without DeepSpeed, e.g. by a resharded resume
            atomic_write_text(self.dir / tag / HISTORY, json.dumps(client_state.get("history", [])))
        barrier()
        if is_main():
            files = {str(p.relative_to(self.dir / tag)): p.stat().st_size
                     for p in sorted((self.dir / tag).rglob("*")) if p.is_file()}
            atomic_write_text(self.dir / tag / META, json.dumps({**meta, "tag": tag, "files": files}))
            atomic_write_text(self.dir / "latest", tag)
            self._prune()
        barrier()
        return tag

    def newest_complete(self) -> tuple[str, dict] | None:
        """The newest tag that every rank finds complete and intact, warning about each newer one skipped."""
        mine = []
        for tag in self.tags():
            problem = self.problem(tag)
            if problem is None:
                mine.append(tag)
            elif is_main():
                print(f"[checkpoint] WARNING: skipping {self.dir / tag}: {problem}; falling back to an older "
                      "checkpoint", file=sys.stderr, flush=True)
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

    def load_rank_state(self, tag: str, rank: int) -> dict:
        return torch.load(self.dir / tag / rank_file(rank), weights_only=True)

    def _prune(self) -> None:
        """Keep the `keep` newest complete checkpoints; anything older goes (complete or not)."""
        complete = [t for t in self.tags() if self.problem(t) is None]
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[self.keep - 1]
        for tag in self.tags():
            if tag < oldest_kept:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

"""The frozen teacher's embeddings, dumped shard by shard: each rank (or SLURM array task) embeds its own
audio shards and writes, per shard, `<shard>.npy` (float16, clips x dim) and then `<shard>.json` (keys in
shard order, true label ids, count) as its completion mark. A shard whose mark exists is never redone.

    RUN/pseudolabel/embeddings/teacher.json          which teacher (sha256) and layer the dump belongs to
    RUN/pseudolabel/embeddings/audio-000123.npy|json
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..artefacts import atomic_write_text
from ..data.loader import ShardSource, ShardStream, ShardSubset, make_loader
from ..errors import UnfusedError

TEACHER = "teacher.json"


def prepare(directory: Path, identity: dict) -> None:
    """Keep a dump made by the same teacher and layer; anything else is stale and goes."""
    path = directory / TEACHER
    if path.exists() and json.loads(path.read_text()) != identity:
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(identity))


def is_dumped(directory: Path, shard: str, count: int) -> bool:
    try:
        return json.loads((directory / f"{shard}.json").read_text())["count"] == count
    except (OSError, ValueError, KeyError):
        return False


def dump(embed, source: ShardSource, shards: list[int], directory: Path, transform, workers: int,
         batch_size: int, progress: bool, desc: str) -> int:
    """Embed the given shards that are not dumped yet; returns how many were done now. `embed(wave)` maps a
    batch of waveforms to (batch, dim) embeddings; `transform` gives (wave, label id, key, shard path)."""
    names = [source.manifest.shards[i].name for i in shards]
    todo = [i for i, name in zip(shards, names) if not is_dumped(directory, name, source.counts[i])]
    if not todo:
        return 0
    subset = ShardSubset(source, todo)
    stream = ShardStream(subset, transform, seed=0, shuffle=False, workers=workers)
    pending: dict[str, dict] = {}  # shard path -> rows so far (a worker delivers a shard's clips in order)
    expected = {str(source.split_dir / source.manifest.shards[i].name): source.counts[i] for i in todo}
    with tqdm(total=sum(subset.counts), desc=desc, unit="clip", disable=not progress, dynamic_ncols=True) as bar, \
            torch.inference_mode():
        for wave, labels, keys, paths in make_loader(stream, batch_size):
            emb = embed(wave).float().cpu().numpy().astype(np.float16)
            for row, label, key, path in zip(emb, labels.tolist(), keys, paths):
                part = pending.setdefault(path, {"rows": [], "labels": [], "keys": []})
                part["rows"].append(row)
                part["labels"].append(label)
                part["keys"].append(key)
                if len(part["keys"]) == expected[path]:
                    _write(directory, Path(path).name, pending.pop(path))
            bar.update(len(keys))
    if pending:  # clips skipped as undecodable: the shard cannot get aligned labels
        path, part = next(iter(pending.items()))
        raise UnfusedError(f"{path}: {len(part['keys'])} of {expected[path]} clips could be embedded; every clip "
                           "needs a pseudo-label: run `unfused-shards verify` and rebuild the shard")
    return len(todo)


def _write(directory: Path, shard: str, part: dict) -> None:
    rows = np.stack(part["rows"])
    tmp = directory / f".{shard}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, rows)
    tmp.replace(directory / f"{shard}.npy")
    atomic_write_text(directory / f"{shard}.json",  # last: marks the shard done
                      json.dumps({"count": len(rows), "dim": rows.shape[1], "keys": part["keys"],
                                  "labels": part["labels"]}))


class EmbeddingStore:
    """Read access to a finished dump: per-shard rows, and seeded samples drawn across all shards."""

    def __init__(self, directory: Path, source: ShardSource):
        self.dir, self.source = Path(directory), source
        self.names = [s.name for s in source.manifest.shards]
        missing = [n for n, c in zip(self.names, source.counts) if not is_dumped(self.dir, n, c)]
        if missing:
            raise UnfusedError(f"{self.dir}: {len(missing)} shard(s) not embedded yet (first: {missing[0]}); "
                               "run the embedding step for every part first")
        self.offsets = np.concatenate([[0], np.cumsum(source.counts)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def rows(self, i: int) -> np.ndarray:
        return np.load(self.dir / f"{self.names[i]}.npy").astype(np.float32)

    def info(self, i: int) -> dict:
        return json.loads((self.dir / f"{self.names[i]}.json").read_text())

    def sample(self, n: int, seed: int, shards: list[int] | None = None) -> np.ndarray:
        """min(n, total) rows chosen uniformly over ALL shards by (seed); only those falling in `shards`
        (default: all) are returned, so ranks holding disjoint shards get disjoint parts of one sample."""
        n = min(n, self.total) if n > 0 else self.total
        chosen = np.sort(np.random.default_rng(seed).choice(self.total, n, replace=False))
        parts = []
        for i in (range(len(self.names)) if shards is None else shards):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            local = chosen[(chosen >= lo) & (chosen < hi)] - lo
            if len(local):
                parts.append(np.load(self.dir / f"{self.names[i]}.npy", mmap_mode="r")[local].astype(np.float32))
        dim = self.info(0)["dim"] if self.names else 0
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

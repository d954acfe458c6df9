"""The frozen teacher's embeddings, dumped shard by shard: each rank (or SLURM array task) embeds its own
audio shards and writes, per shard, `<shard>.npy` (float16, clips x dim) and then `<shard>.json` (the audio
shard's sha256, keys in shard order, true label ids, count) as its completion mark. A shard whose mark
matches the manifest's sha256 and count is never redone; any other (the dataset was rebuilt since) is.

    RUN/pseudolabel/embeddings/teacher.json          which teacher (sha256), layer and crop the dump belongs to
    RUN/pseudolabel/embeddings/audio-000123.npy|json
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..artefacts import atomic_write_text, exclusive_lock
from ..data.loader import make_loader
from ..data.source import ShardSource, ShardSubset
from ..data.stream import EvaluationStream
from ..errors import UnfusedError

TEACHER = "teacher.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: anything larger becomes inf when stored


def prepare(directory: Path, identity: dict) -> None:
    """Keep a dump made by the same teacher, layer and crop; anything else is stale and goes.

    Every SLURM array task of the embedding step calls this, often at the same moment. The check and the
    cleanup therefore run under an exclusive lock on a sibling file, so that exactly one task removes a stale
    dump and the others then find the fresh identity and keep it (without the lock, two tasks removed the
    same folder at once, or one removed the fresh folder the other had just started filling)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory.parent / f".{directory.name}.lock",
                        unlocked="start embedding tasks one at a time if a stale dump must be replaced"):
        if _read_identity(directory) != identity:
            _discard(directory)
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(directory / TEACHER, json.dumps(identity))


def _read_identity(directory: Path) -> dict | None:
    try:
        return json.loads((directory / TEACHER).read_text())
    except (OSError, ValueError):
        return None


def _discard(directory: Path) -> None:
    """Move the folder aside under a unique name (one atomic rename), then delete it: a deletion killed
    half-way leaves a hidden leftover, never a folder that looks like a dump but holds stale shards."""
    if not directory.exists():
        return
    aside = directory.with_name(f".{directory.name}.stale-{uuid.uuid4().hex[:12]}")
    os.rename(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def is_dumped(directory: Path, shard: str, count: int, sha256: str) -> bool:
    """Whether `shard` was embedded from exactly the audio shard the manifest lists now (its sha256)."""
    try:
        mark = json.loads((directory / f"{shard}.json").read_text())
        return mark["count"] == count and mark["audio_sha256"] == sha256
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_dumped(directory: Path, source: ShardSource, i: int) -> bool:
    info = source.manifest.shards[i]
    return is_dumped(directory, info.name, source.counts[i], info.sha256)


def dump(embed, source: ShardSource, shards: list[int], directory: Path, transform, workers: int,
         batch_size: int, progress: bool, desc: str) -> int:
    """Embed the given shards that are not dumped yet; returns how many were done now. `embed(wave)` maps a
    batch of waveforms to (batch, dim) embeddings; `transform` gives (wave, label id, key, shard path)."""
    todo = [i for i in shards if not _is_dumped(directory, source, i)]
    if not todo:
        return 0
    subset = ShardSubset(source, todo)
    stream = EvaluationStream(subset, transform, seed=0, shuffle=False, workers=workers)
    pending: dict[str, dict] = {}  # shard path -> rows so far (a worker delivers a shard's clips in order)
    expected = {str(source.path(i)): (source.counts[i], source.manifest.shards[i].sha256) for i in todo}
    with tqdm(total=sum(subset.counts), desc=desc, unit="clip", disable=not progress, dynamic_ncols=True) as bar, \
            torch.inference_mode():
        for batch in make_loader(stream, batch_size):
            keys, paths = batch.key, batch.shard
            emb = to_float16(embed(batch.wave).float().cpu().numpy(), keys, paths)
            for row, label, key, path in zip(emb, batch.label.tolist(), keys, paths):
                part = pending.setdefault(path, {"rows": [], "labels": [], "keys": []})
                part["rows"].append(row)
                part["labels"].append(label)
                part["keys"].append(key)
                if len(part["keys"]) == expected[path][0]:
                    _write(directory, Path(path).name, expected[path][1], pending.pop(path))
            bar.update(len(keys))
    if pending:  # clips skipped as undecodable: the shard cannot get aligned labels
        path, part = next(iter(pending.items()))
        raise UnfusedError(f"{path}: {len(part['keys'])} of {expected[path][0]} clips could be embedded; every "
                           "clip needs a pseudo-label: run `unfused-shards verify` and rebuild the shard")
    return len(todo)


def to_float16(emb: np.ndarray, keys, paths) -> np.ndarray:
    """The batch as float16, refusing what float16 cannot hold: a NaN, an inf, or a value beyond +-65504 (which
    the cast would turn into inf) would later break the PCA or k-means far from its cause."""
    bad = ~(np.isfinite(emb) & (np.abs(emb) <= FLOAT16_MAX))
    if bad.any():
        j, d = (int(a[0]) for a in np.nonzero(bad))
        raise UnfusedError(f"{paths[j]}: clip '{keys[j]}' has a non-finite or out-of-float16-range embedding "
                           f"({emb[j, d]} in dimension {d}); the teacher has probably diverged: check the pretrain "
                           "stage's loss and re-train it")
    return emb.astype(np.float16)


def _write(directory: Path, shard: str, audio_sha256: str, part: dict) -> None:
    rows = np.stack(part["rows"])
    tmp = directory / f".{shard}.npy.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, rows)
    tmp.replace(directory / f"{shard}.npy")
    atomic_write_text(directory / f"{shard}.json",  # last: marks the shard done
                      json.dumps({"count": len(rows), "dim": rows.shape[1], "audio_sha256": audio_sha256,
                                  "keys": part["keys"], "labels": part["labels"]}))


class EmbeddingStore:
    """Read access to a finished dump: per-shard rows, and seeded samples drawn across all shards."""

    def __init__(self, directory: Path, source: ShardSource):
        self.dir, self.source = Path(directory), source
        self.names = [s.name for s in source.manifest.shards]
        missing = [n for i, n in enumerate(self.names) if not _is_dumped(self.dir, source, i)]
        if missing:
            raise UnfusedError(f"{self.dir}: {len(missing)} shard(s) not embedded from the current audio shards "
                               f"(first: {missing[0]}); run the embedding step for every part first")
        self.offsets = np.concatenate([[0], np.cumsum(source.counts)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def rows(self, i: int) -> np.ndarray:
        return self._checked(i, np.arange(self.source.counts[i]),
                             np.load(self.dir / f"{self.names[i]}.npy", allow_pickle=False).astype(np.float32))

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
                rows = np.load(self.dir / f"{self.names[i]}.npy", mmap_mode="r", allow_pickle=False)[local]
                parts.append(self._checked(i, local, rows.astype(np.float32)))
        dim = self.info(0)["dim"] if self.names else 0
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    def _checked(self, i: int, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows read back must be finite: a dump written before the writer checked them, or altered since,
        could hold an inf or NaN, which k-means would turn into label -1 or a failed whitening."""
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            key = self.info(i)["keys"][int(positions[np.flatnonzero(bad)[0]])]
            path = self.dir / f"{self.names[i]}.npy"
            raise UnfusedError(f"{path}: clip '{key}' has a non-finite embedding; delete {path.name} and its .json "
                               "and re-run the pseudolabel stage (if it recurs, the teacher has diverged)")
        return rows

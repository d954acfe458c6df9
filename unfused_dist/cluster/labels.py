"""Pseudo-label shards: one tar per audio shard, the same keys in the same order (<key>.cls + <key>.json)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ..data.loader import label_shard_name
from ..data.manifest import DatasetManifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_label_shards(split_dir: Path, out_dir: Path, keys: list[str], labels: np.ndarray,
                       distances: np.ndarray) -> list[Path]:
    """`keys` are in shard order (as embedded); each label shard is written to a temp name then renamed."""
    manifest = DatasetManifest.load(split_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, pos = [], 0
    for shard in manifest.shards:
        end = pos + shard.num_samples
        if end > len(keys) or (shard.num_samples and (keys[pos], keys[end - 1]) != (shard.first_key, shard.last_key)):
            raise ValueError(f"{split_dir / shard.name}: embedded keys do not match the manifest's first/last "
                             "key; re-run `unfused-shards verify` on the dataset")
        path = out_dir / label_shard_name(shard.name)
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for j in range(shard.num_samples):
                key = keys[pos + j]
                _add(tar, f"{key}.cls", str(int(labels[pos + j])).encode())
                _add(tar, f"{key}.json", json.dumps({"distance": float(distances[pos + j])}).encode())
        os.replace(tmp, path)
        pos = end
        written.append(path)
    if pos != len(keys):
        raise ValueError(f"{split_dir}: {len(keys)} embedded clips but the manifest lists {pos}")
    return written

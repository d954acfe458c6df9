"""Pseudo-label shards: one tar per audio shard, the same keys in the same order (<key>.cls + <key>.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.loader import label_shard_name
from ..data.manifest import DatasetManifest
from ..data.shardwriter import TarShard


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
        with TarShard(path) as tar:
            for j in range(pos, end):
                tar.add(keys[j], [("cls", str(int(labels[j])).encode()),
                                  ("json", json.dumps({"distance": float(distances[j])}).encode())])
        pos = end
        written.append(path)
    if pos != len(keys):
        raise ValueError(f"{split_dir}: {len(keys)} embedded clips but the manifest lists {pos}")
    return written

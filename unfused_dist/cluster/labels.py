"""Pseudo-label shards: one tar per audio shard, the same keys in the same order (<key>.cls + <key>.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.source import label_shard_name
from ..data.manifest import DatasetManifest, ShardInfo
from ..data.shardwriter import TarShard
from ..errors import UnfusedError


def write_label_shard(audio: ShardInfo, out_dir: Path, keys: list[str], labels: np.ndarray,
                      distances: np.ndarray) -> Path:
    """The label shard of one audio shard; `keys` must be that shard's keys in order (checked against the
    manifest's count and first/last key). Written under a temporary name, then renamed."""
    if len(keys) != audio.num_samples or (keys and (keys[0], keys[-1]) != (audio.first_key, audio.last_key)):
        # the embeddings were made from another version of this shard (the dataset was rebuilt since)
        raise UnfusedError(f"{audio.name}: {len(keys)} embedded keys ({keys[:1]}..{keys[-1:]}) do not match the "
                           f"manifest's {audio.num_samples} ({audio.first_key}..{audio.last_key}); re-run the "
                           "pseudolabel stage for this run")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / label_shard_name(audio.name)
    with TarShard(path) as tar:
        for key, label, dist in zip(keys, labels, distances):
            tar.add(key, [("cls", str(int(label)).encode()), ("json", json.dumps({"distance": float(dist)}).encode())])
    return path


def write_label_shards(split_dir: Path, out_dir: Path, keys: list[str], labels: np.ndarray,
                       distances: np.ndarray) -> list[Path]:
    """All label shards of a split from arrays in shard order (each shard's part goes to write_label_shard)."""
    manifest = DatasetManifest.load(split_dir)
    if len(keys) != manifest.num_samples:
        raise UnfusedError(f"{split_dir}: {len(keys)} embedded clips but the manifest lists {manifest.num_samples}; "
                           "re-run the pseudolabel stage for this run")
    written, pos = [], 0
    for shard in manifest.shards:
        end = pos + shard.num_samples
        written.append(write_label_shard(shard, out_dir, keys[pos:end], labels[pos:end], distances[pos:end]))
        pos = end
    return written

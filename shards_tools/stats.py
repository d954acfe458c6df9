"""Per-split statistics read from the shards' JSON members (audio is not decoded)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shards_tools.verify import iter_samples, parse_meta
from unfused_dist.data.manifest import DatasetManifest, find_split_dirs


@dataclass
class SplitStats:
    split: str
    clips: int = 0
    seconds: float = 0.0
    min_s: float = float("inf")
    max_s: float = 0.0
    labels: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        mean = self.seconds / self.clips if self.clips else 0.0
        lo = self.min_s if self.clips else 0.0
        out = [f"{self.split}: {self.clips} clips, {self.seconds / 3600:.3f} h, "
               f"duration min/mean/max {lo:.2f}/{mean:.2f}/{self.max_s:.2f} s"]
        if self.labels:
            out.append(f"  {len(self.labels)} labels: "
                       + ", ".join(f"{lab} {n}" for lab, n in sorted(self.labels.items())))
        return out


def split_stats(directory: str | Path) -> SplitStats:
    directory = Path(directory)
    manifest = DatasetManifest.load(directory)
    st = SplitStats(manifest.split)
    for path in manifest.shard_paths(directory):
        for key, group in iter_samples(path):
            meta = parse_meta(path.name, key, group["json"])
            dur = float(meta["duration"])
            st.clips += 1
            st.seconds += dur
            st.min_s, st.max_s = min(st.min_s, dur), max(st.max_s, dur)
            if meta.get("label") is not None:
                st.labels[meta["label"]] += 1
    return st


def stats(path: str | Path) -> list[SplitStats]:
    return [split_stats(d) for d in find_split_dirs(path)]

"""Per-split statistics read from the shards' JSON members (audio is not decoded): clips, hours, a
duration histogram, label counts, the sample rates the audio came from, and how mixed the shards are
(distinct labels and source folders per shard against a random order: mixing.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shards_tools.mixing import Mix, add_sample, split_mixes
from shards_tools.verify import iter_samples, parse_meta
from unfused_dist.data.manifest import DatasetManifest, find_split_dirs

# Histogram bin edges in seconds: speech-command clips to long recordings on one line each.
BIN_EDGES = (0.5, 1, 2, 5, 10, 30, 60, 300)
_BAR_WIDTH = 30


@dataclass
class SplitStats:
    split: str
    clips: int = 0
    seconds: float = 0.0
    min_s: float = float("inf")
    max_s: float = 0.0
    labels: Counter = field(default_factory=Counter)
    durations: Counter = field(default_factory=Counter)  # bin index -> clips
    origin_rates: Counter = field(default_factory=Counter)  # source sample rate -> clips
    mixes: list[Mix] = field(default_factory=split_mixes)  # labels and source folders per shard

    def new_shard(self) -> None:
        for mix in self.mixes:
            mix.new_shard()

    def add(self, meta: dict) -> None:
        dur = float(meta["duration"])
        self.clips += 1
        self.seconds += dur
        self.min_s, self.max_s = min(self.min_s, dur), max(self.max_s, dur)
        self.durations[sum(dur >= edge for edge in BIN_EDGES)] += 1
        if meta.get("orig_sample_rate") is not None:
            self.origin_rates[int(meta["orig_sample_rate"])] += 1
        if meta.get("label") is not None:
            self.labels[meta["label"]] += 1
        add_sample(self.mixes, meta)

    def lines(self) -> list[str]:
        mean = self.seconds / self.clips if self.clips else 0.0
        lo = self.min_s if self.clips else 0.0
        out = [f"{self.split}: {self.clips} clips, {self.seconds / 3600:.3f} h, "
               f"duration min/mean/max {lo:.2f}/{mean:.2f}/{self.max_s:.2f} s"]
        top = max(self.durations.values(), default=1)
        edges = ("0",) + tuple(f"{e:g}" for e in BIN_EDGES) + ("inf",)
        for b in sorted(self.durations):
            n = self.durations[b]
            out.append(f"  {edges[b]:>4}-{edges[b + 1]:<4} s {n:>8}  {'#' * max(1, round(_BAR_WIDTH * n / top))}")
        if self.origin_rates:
            out.append("  source sample rates: "
                       + ", ".join(f"{sr} Hz {n}" for sr, n in sorted(self.origin_rates.items())))
        if self.labels:
            out.append(f"  {len(self.labels)} labels: "
                       + ", ".join(f"{lab} {n}" for lab, n in sorted(self.labels.items())))
        out += [f"  {mix.line()}" for mix in self.mixes if mix.informative()]
        return out


def split_stats(directory: str | Path) -> SplitStats:
    directory = Path(directory)
    manifest = DatasetManifest.load(directory)
    st = SplitStats(manifest.split)
    for path in manifest.shard_paths(directory):
        st.new_shard()
        for key, group in iter_samples(path, (manifest.codec, "json")):
            st.add(parse_meta(path.name, key, group["json"]))
    return st


def stats(path: str | Path) -> list[SplitStats]:
    return [split_stats(d) for d in find_split_dirs(path)]

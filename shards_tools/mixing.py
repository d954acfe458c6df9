"""How mixed a split's shards are: the distinct labels (or source folders) per shard, against what the same
shards would hold if their samples had been dealt in a random order.

Training reads shards in contiguous runs, so its batches can only be as mixed as the shards (a split built
from a folder per class, in the source's order, gives shards of one or two classes each). For a shard of n
samples drawn at random from a split of N samples where group g has c_g of them, the expected number of
distinct groups is sum_g [1 - C(N - c_g, n) / C(N, n)]; the split's score is its shards' distinct groups
summed, over that expectation summed: about 1 for a random order, far below for a sorted one.
"""
from __future__ import annotations

import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field

SORTED_BELOW = 0.75  # a score under this: the split is sorted by that grouping (a random order gives ~0.95-1.05)


def expected_distinct(group_sizes: list[int], n: int) -> float:
    """Expected distinct groups among n samples drawn without replacement from groups of these sizes."""
    total = sum(group_sizes)
    n = min(n, total)
    return sum(1.0 - _none_drawn(total, c, n) for c in group_sizes)


def _none_drawn(total: int, size: int, n: int) -> float:
    """C(total - size, n) / C(total, n): the chance that n draws miss a group of `size`."""
    if total - size < n:
        return 0.0
    return math.exp(math.lgamma(total - size + 1) + math.lgamma(total - n + 1)
                    - math.lgamma(total - size - n + 1) - math.lgamma(total + 1))


@dataclass
class Mix:
    """Per-shard groups of one kind (labels, or source folders) of one split, added shard by shard."""
    what: str  # "labels" or "source folders"
    per_shard: list[Counter] = field(default_factory=list)

    def new_shard(self) -> None:
        self.per_shard.append(Counter())

    def add(self, group: str | None) -> None:
        if group is not None:
            self.per_shard[-1][group] += 1

    def observed_expected(self) -> tuple[float, float]:
        """Distinct groups per shard (mean), and what a random order of the same samples would give."""
        shards = [c for c in self.per_shard if c]
        totals = sum(shards, Counter())
        if not shards:
            return 0.0, 0.0
        observed = sum(len(c) for c in shards) / len(shards)
        expected = sum(expected_distinct(list(totals.values()), sum(c.values())) for c in shards) / len(shards)
        return observed, expected

    def informative(self) -> bool:
        """Whether a random order would give a shard more than one group: else there is nothing to mix."""
        return self.observed_expected()[1] > 1.05

    def score(self) -> float:
        observed, expected = self.observed_expected()
        return observed / expected if expected else 1.0

    def is_sorted(self) -> bool:
        return self.informative() and self.score() < SORTED_BELOW

    def warning(self) -> str:
        observed, expected = self.observed_expected()
        return (f"shards sorted by {self.what[:-1]} ({observed:.1f} distinct {self.what} per shard where a random "
                f"order gives {expected:.1f}): each training batch then draws on few of them; rebuild with "
                "`unfused-shards build` without --keep-order (its default order mixes the shards)")

    def line(self) -> str:
        observed, expected = self.observed_expected()
        verdict = ("sorted: `unfused-shards build` without --keep-order mixes it" if self.is_sorted()
                   else "mixed" if self.score() >= 0.9 else "partly sorted")
        return (f"{self.what} per shard: {observed:.1f} distinct, {expected:.1f} for a random order "
                f"({self.score():.2f}, {verdict})")


def source_folder(meta: dict) -> str | None:
    """The folder a sample's file came from (as the source wrote it): classes, speakers or sessions often
    live one per folder. A segment's folder is its recording's."""
    source = meta.get("source")
    return posixpath.dirname(source.replace("\\", "/")) if isinstance(source, str) else None


def split_mixes() -> list[Mix]:
    """The groupings a split's mix is judged by."""
    return [Mix("labels"), Mix("source folders")]


def add_sample(mixes: list[Mix], meta: dict) -> None:
    labels, folders = mixes
    labels.add(meta.get("label") if isinstance(meta.get("label"), str) else None)
    folders.add(source_folder(meta))

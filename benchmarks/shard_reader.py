"""The shard stream's per-sample costs, each against a named baseline measured in the same run.

  (1) reading: the project's tar reader (`shards.iter_shard`: samples with their member bytes) against
      Python's `tarfile` reading the same shards (`extractfile(member).read()` for every member);
  (2) header checksums: `shards._byte_sum_mod` (zlib.adler32, in C) against Python's `sum()` over the
      header's bytes, the check the reader made before;
  (3) shuffling: the loader's `buffer_shuffle` (random draws 1,024 at a time) against the same buffer
      shuffle drawing one `Generator.integers` per item, as the loader did before.

The shards come from `unfused-shards build` over synthesized 1 s clips (default 2,000, 200 a shard, FLAC),
read from the page cache after a first pass. Each figure is the best of --repeat passes of process CPU time.
No targets: it prints each ratio (baseline time / ours) for the record in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import tarfile
import time
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np

from _common import Workspace, ratio, table
from loader import SEED, SHUFFLE_BUFFER, build_shards, synthesize_clips

from unfused_dist.data.order import buffer_shuffle  # noqa: E402
from unfused_dist.data.shards import _byte_sum_mod, iter_shard  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000, help="clips to synthesize (default 2000)")
    p.add_argument("--repeat", type=int, default=10, help="passes per measurement, best kept (default 10)")
    p.add_argument("--work", help="scratch folder (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep clips and shards")
    args = p.parse_args(argv)
    if min(args.clips, args.repeat) <= 0:
        p.error("--clips and --repeat must be positive")
    return args


def cpu_us_per_item(fn: Callable[[], int], repeat: int) -> float:
    """Best of `repeat` calls of fn (which returns how many items it handled), in CPU us per item."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        n = fn()
        best = min(best, (time.process_time() - t0) / n)
    return best * 1e6


def read_ours(shards: list[Path]) -> int:
    return sum(len(s.members) for path in shards for s in iter_shard(path))


def read_tarfile(shards: list[Path]) -> int:
    n = 0
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                tar.extractfile(member).read()
                n += 1
    return n


def headers(shards: list[Path]) -> list[bytes]:
    """Every member header of the shards (tarfile's own parse finds them)."""
    out = []
    for path in shards:
        data = path.read_bytes()
        with tarfile.open(path) as tar:
            out += [data[m.offset:m.offset + 512] for m in tar]
    return out


def check_ours(blocks: list[bytes]) -> int:
    return sum(1 for h in blocks if _byte_sum_mod(h) >= 0)


def check_sum(blocks: list[bytes]) -> int:
    return sum(1 for h in blocks if sum(h[:148]) + 256 + sum(h[156:]) >= 0)


def shuffle_ours(n: int) -> int:
    return sum(1 for _ in buffer_shuffle(range(n), SHUFFLE_BUFFER, np.random.default_rng(SEED)))


def shuffle_per_item_draw(n: int, size: int = SHUFFLE_BUFFER, initial: int = 64) -> int:
    """The same buffer shuffle, one Generator.integers call per item out (the loader's code before)."""
    rng, items, buf, out = np.random.default_rng(SEED), iter(range(n)), [], 0

    def pop() -> None:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        buf.pop()

    for item in items:
        buf.append(item)
        if len(buf) < size:
            buf.extend(islice(items, 1))
        if len(buf) >= min(initial, size):
            pop()
            out += 1
    while buf:
        pop()
        out += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Workspace(args.work, args.keep, "bench-reader-") as ws:
        clips = ws.path("clips")
        synthesize_clips(clips, args.clips, 1.0, ["flac"])
        split = build_shards(clips / "flac", ws.path("shards"), "flac", 2, codec_flag=True)
        shards = sorted(split.glob("audio-*.tar"))
        read_ours(shards)  # into the page cache
        blocks = headers(shards)
        items = 100 * args.clips
        rows = []
        for what, unit, ours, base, name in [
            ("read", "member", lambda: read_ours(shards), lambda: read_tarfile(shards), "tarfile"),
            ("header checksum", "header", lambda: check_ours(blocks), lambda: check_sum(blocks), "sum() over bytes"),
            ("shuffle", "item", lambda: shuffle_ours(items), lambda: shuffle_per_item_draw(items),
             "one integers() per item"),
        ]:
            us, base_us = cpu_us_per_item(ours, args.repeat), cpu_us_per_item(base, args.repeat)
            rows.append([what, f"{us:.2f} us/{unit}", f"{base_us:.2f} us/{unit}", name, ratio(base_us / us)])
        print(f"{len(shards)} FLAC shards, {args.clips} clips of 1 s, {len(blocks)} members; best of {args.repeat}, "
              "CPU time\n")
        print(table(["part", "ours", "baseline", "baseline is", "baseline / ours"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

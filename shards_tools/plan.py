"""Plan a split's shards before anything is encoded: which source file (or segment of one) goes into
which shard. The plan is a pure function of the source, its files' sizes and modification times and
the build options, so that

- every shard can be written by its own process, in any order, and still come out byte-identical;
- an interrupted build, run again with the same command, recognises the shards it already wrote (each
  shard's fingerprint covers exactly what went into it) and writes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from shards_tools.sources import SourceItem
from unfused_dist.audio.io import probe
from unfused_dist.data.manifest import shard_name

# Bytes per second of 16-bit mono audio that a shard member takes, relative to raw PCM. Only used to
# plan --shard-mb before encoding; speech and music FLAC typically land between 0.45 and 0.75.
CODEC_RATIO = {"flac": 0.6, "wav": 1.0}
_MEMBER_OVERHEAD = 2048  # tar headers + JSON sidecar + codec header, per sample


@dataclass(frozen=True)
class Survey:
    """What the planner needs to know of one source file, read without decoding it."""
    stat: tuple[int, int] | None  # (size, mtime_ns); None when the file cannot be stat'ed
    frames: int | None = None  # from the header, when libsndfile can read it
    rate: int | None = None


def survey(item: SourceItem, with_header: bool) -> Survey:
    """Worker: stat (always, for the fingerprint) and header probe (for segments and --shard-mb)."""
    if item.error:
        return Survey(None)
    try:
        st = os.stat(item.path)
    except (OSError, ValueError):  # ValueError: a NUL in the path; the worker's decode gives the reason
        return Survey(None)
    frames_rate = probe(item.path) if with_header and st.st_size else None
    return Survey((st.st_size, st.st_mtime_ns), *(frames_rate or (None, None)))


@dataclass(frozen=True)
class Entry:
    """One sample to write: a whole file (stop None) or native frames [start, stop) of it."""
    order: int  # the item's position in the source, so rejections are reported in source order
    item: SourceItem
    key: str
    stat: tuple[int, int] | None
    start: int = 0
    stop: int | None = None
    est_seconds: float | None = None

    @property
    def is_segment(self) -> bool:
        return self.stop is not None


def segment_entries(order: int, item: SourceItem, info: Survey, segment_seconds: float | None) -> list[Entry]:
    """Cut a long file into segments of `segment_seconds`. The tail joins the last segment when it is
    shorter than half a segment (so no audio is dropped and no sliver becomes a sample); a file that
    would give one segment stays whole, under its own key."""
    seconds = info.frames / info.rate if info.frames else None
    whole = Entry(order, item, item.key, info.stat, est_seconds=seconds)
    if not segment_seconds or seconds is None or seconds <= segment_seconds:
        return [whole]
    step = max(1, round(segment_seconds * info.rate))
    starts = list(range(0, info.frames, step))
    if len(starts) > 1 and info.frames - starts[-1] < step / 2:
        starts.pop()
    if len(starts) == 1:
        return [whole]
    stops = starts[1:] + [info.frames]
    return [Entry(order, item, f"{item.key}__seg{i:05d}", info.stat, a, b, (b - a) / info.rate)
            for i, (a, b) in enumerate(zip(starts, stops))]


def mixed_order(entries: list[Entry], seed: int) -> list[Entry]:
    """The entries in a seeded random order: sorted by a hash of (seed, key). Shards cut from it are each a
    random sample of the split, whatever the source's order (a folder per class, a manifest sorted by
    speaker, the segments of one long recording), at any corpus size. It depends only on the keys and the
    seed, so a build is reproducible, and the same source listed in another order gives the same shards."""
    def rank(e: Entry) -> bytes:
        return hashlib.blake2b(f"{seed}:{e.key}".encode(), digest_size=8).digest()
    return sorted(entries, key=rank)


@dataclass(frozen=True)
class ShardPlan:
    name: str
    entries: tuple[Entry, ...]
    fingerprint: str


def plan_shards(entries: list[Entry], shard_samples: int, max_bytes: int | None, sample_rate: int,
                codec: str) -> list[ShardPlan]:
    """Deal entries into shards in order: a new shard after `shard_samples` entries or before the
    estimated size would pass `max_bytes`. A shard whose files are all rejected stays empty: it keeps
    its number (so later shards keep theirs) and gets no tar."""
    bytes_per_second = sample_rate * 2 * CODEC_RATIO[codec]
    groups: list[list[Entry]] = []
    size = 0.0
    for e in entries:
        est = _MEMBER_OVERHEAD + (e.est_seconds * bytes_per_second if e.est_seconds is not None
                                  else (e.stat[0] if e.stat else 0))
        if not groups or len(groups[-1]) >= shard_samples or (max_bytes and groups[-1] and size + est > max_bytes):
            groups.append([])
            size = 0.0
        groups[-1].append(e)
        size += est
    params = {"sample_rate": sample_rate, "codec": codec, "version": 2}
    return [ShardPlan(shard_name(i), tuple(g), fingerprint(g, params)) for i, g in enumerate(groups)]


def fingerprint(entries: list[Entry], params: dict) -> str:
    """What a shard's bytes depend on: the options, and each sample's file, key, label, range, and the path as
    the source wrote it (its JSON records it: `./a.wav` and `a.wav` give different shards)."""
    rows = [[e.item.path, e.item.source, e.key, e.item.label, e.start, e.stop, e.stat] for e in entries]
    return hashlib.sha256(json.dumps([params, rows]).encode()).hexdigest()

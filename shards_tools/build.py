"""Build WebDataset audio shards (16 kHz mono FLAC + JSON) from a folder or CSV manifest, one dir per split.

Bad inputs never stop a build: each one becomes a line in OUT/<split>/rejected.jsonl and is counted.
Decoding runs in a process pool, but results are consumed in source order (imap), so the shards are a
pure function of the source: rebuilding gives byte-identical tars.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from shards_tools.shardwriter import ShardWriter
from shards_tools.sources import Source, SourceItem, read_source
from unfused_dist.audio.io import TARGET_SR, AudioDecodeError, encode_flac, load_file, resample
from unfused_dist.data.manifest import MANIFEST_NAME, SHARD_GLOB, BuildInfo, DatasetManifest

REJECTED_NAME = "rejected.jsonl"
CODEC = "flac"


@dataclass(frozen=True)
class Encoded:
    flac: bytes
    meta: bytes
    seconds: float


@dataclass
class SplitSummary:
    split: str
    directory: Path
    clips: int
    seconds: float
    shards: int
    rejected: int
    bytes: int

    def line(self) -> str:
        return (
            f"{self.split}: {self.clips} clips, {self.seconds / 3600:.3f} h, {self.shards} shards, "
            f"{self.rejected} rejected, {self.bytes / 1e6:.1f} MB -> {self.directory}"
        )


def encode_item(item: SourceItem, sample_rate: int = TARGET_SR) -> Encoded | str:
    """Worker: file -> Encoded, or a short rejection reason. Never raises: one bad file must not kill
    the pool (and with it the build)."""
    if item.error:
        return item.error
    try:
        x, sr = load_file(item.path)
        y = resample(x, sr, sample_rate)
        if y.size == 0:
            return "zero-length after resampling"
        seconds = y.size / sample_rate
        meta = {"id": item.key, "duration": seconds, "label": item.label, "source": item.source,
                "orig_sample_rate": sr}
        return Encoded(encode_flac(y, sample_rate), json.dumps(meta, sort_keys=True).encode(), seconds)
    except AudioDecodeError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - anything unexpected is still just one rejected file
        return f"error: {type(e).__name__}: {str(e)[:120]}"


def build(
    src: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    shard_samples: int = 1000,
    shard_mb: float | None = None,
    sample_rate: int = TARGET_SR,
    labels_from_dirs: bool = False,
    command: str = "",
    progress: bool = True,
) -> list[SplitSummary]:
    """Build OUT/<split>/ for every split in SRC; returns one summary per split (in source order).
    Raises SourceError (from sources.py) when SRC itself is unusable."""
    source = read_source(src, labels_from_dirs=labels_from_dirs)
    out = Path(out)
    workers = max(1, workers or os.cpu_count() or 1)
    max_bytes = int(shard_mb * 1e6) if shard_mb else None
    encode = partial(encode_item, sample_rate=sample_rate)
    pool = Pool(workers) if workers > 1 else None
    try:
        summaries = []
        for split in source.splits():
            items = [i for i in source.items if i.split == split]
            # chunks amortise IPC; small enough that the progress bar and ordering stay smooth
            chunk = max(1, min(16, len(items) // (workers * 4)))
            results = pool.imap(encode, items, chunksize=chunk) if pool else map(encode, items)
            summaries.append(
                _build_split(source, split, items, results, out / split, sample_rate, shard_samples,
                             max_bytes, command or f"shards_tools.build.build({str(src)!r})", progress)
            )
        return summaries
    finally:
        if pool:
            pool.terminate()
            pool.join()


def _build_split(source: Source, split: str, items: list[SourceItem], results, directory: Path,
                 sample_rate: int, shard_samples: int, max_bytes: int | None, command: str,
                 progress: bool) -> SplitSummary:
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory)
    writer = ShardWriter(directory, max_samples=shard_samples, max_bytes=max_bytes)
    rejected: list[dict] = []
    seconds = 0.0
    bar = tqdm(total=len(items), desc=split, unit="file", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for item, result in zip(items, results):
            if isinstance(result, Encoded):
                writer.add(item.key, [("flac", result.flac), ("json", result.meta)], result.seconds)
                seconds += result.seconds
            else:
                rejected.append({"path": item.source, "reason": result, "split": split})
            bar.update(1)
            bar.set_postfix_str(f"{seconds / 3600:.3f} h audio, {len(rejected)} rejected", refresh=False)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if rejected:
        lines = "".join(json.dumps(r) + "\n" for r in rejected)
        (directory / REJECTED_NAME).write_text(lines)
    manifest = DatasetManifest(
        split=split,
        sample_rate=sample_rate,
        codec=CODEC,
        num_samples=sum(s.num_samples for s in shards),
        total_seconds=round(sum(s.seconds for s in shards), 6),
        labels=source.labels,
        shards=shards,
        build=BuildInfo(
            command=command,
            source=os.path.abspath(source.origin),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            rejected=len(rejected),
        ),
    )
    manifest.save(directory)  # last: its presence marks the split complete
    return SplitSummary(split, directory, manifest.num_samples, manifest.total_seconds, len(shards),
                        len(rejected), writer.total_bytes)


def _remove_stale(directory: Path) -> None:
    """Clear a previous build's outputs (manifest first, so a crash mid-way never leaves a manifest
    describing shards that are gone). Only our own file names are touched; labels/ is kept."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    (directory / REJECTED_NAME).unlink(missing_ok=True)
    for p in list(directory.glob(SHARD_GLOB)) + list(directory.glob(".audio-*.tar.tmp")):
        p.unlink()

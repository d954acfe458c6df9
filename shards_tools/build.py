"""Build WebDataset audio shards (mono FLAC or WAV + JSON, one rate) from a folder, CSV or JSONL manifest,
one dir per split.

How a build runs (per split):
1. survey every file (stat, and the header when segmenting or sizing shards in MB) and plan the shards
   (plan.py): which sample goes where is fixed before anything is decoded. By default the samples are dealt
   in a seeded random order, so that no shard is a run of one class or one source (a folder per class,
   a manifest sorted by speaker): training reads shards in contiguous runs, and its batches can only be as
   mixed as the shards are;
2. each shard not already on disk is written by one worker process: decode, resample, encode, tar under
   a temporary name, rename, then a small record `.build/<shard>.json` (fingerprint, counts, sha256,
   rejections). A shard whose record matches the plan is kept as it is, so running the same command
   again after an interrupted build writes only the missing shards;
3. the manifest is written last, from the records; its presence marks the split complete.

Bad inputs never stop a build: each becomes a line (path, reason, split) in OUT/<split>/rejected.jsonl and in
OUT/rejected.jsonl (every split of this build), and is counted. Neither file exists when nothing was rejected.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import SimpleQueue
from pathlib import Path

from tqdm import tqdm

from shards_tools.plan import Entry, ShardPlan, mixed_order, plan_shards, segment_entries, survey
from shards_tools.sources import Source, SourceError, builder_label_orders, read_source
from unfused_dist.artefacts import atomic_write_text
from unfused_dist.audio.io import CODECS, TARGET_SR, AudioDecodeError, encode_audio, load_file, load_frames, resample
from unfused_dist.data.manifest import (MANIFEST_NAME, SHARD_GLOB, BuildInfo, DatasetManifest, ManifestError, ShardInfo,
                                        find_split_dirs)
from unfused_dist.data.shardwriter import TarShard

REJECTED_NAME = "rejected.jsonl"
RECORDS_DIR = ".build"
# Rejections that say nothing of the file's content: a shard holding one is written again by the next run
_RETRIED_REASONS = ("missing file", "unreadable:")


@dataclass(frozen=True)
class Options:
    sample_rate: int = TARGET_SR
    codec: str = "flac"
    shard_samples: int = 1000
    shard_mb: float | None = None
    segment_seconds: float | None = None
    keep_order: bool = False  # False: inputs go to shards in a seeded random order (plan.mixed_order)
    seed: int = 0


@dataclass
class SplitSummary:
    split: str
    directory: Path
    clips: int
    seconds: float
    shards: int
    reused: int
    rejected: int
    bytes: int

    def line(self) -> str:
        kept = f" ({self.reused} already built)" if self.reused else ""
        return (f"{self.split}: {self.clips} clips, {self.seconds / 3600:.3f} h, {self.shards} shards{kept}, "
                f"{self.rejected} rejected, {self.bytes / 1e6:.1f} MB -> {self.directory}")


def build(src: str | Path, out: str | Path, *, workers: int | None = None, shard_samples: int = 1000,
          shard_mb: float | None = None, segment_seconds: float | None = None, sample_rate: int = TARGET_SR,
          codec: str = "flac", labels_from_dirs: bool = False, keep_order: bool = False, seed: int = 0,
          command: str = "", progress: bool = True) -> list[SplitSummary]:
    """Build OUT/<split>/ for every split in SRC; returns one summary per split (in source order).
    Samples go to shards in a random order seeded by `seed` (keep_order: the source's order).
    Raises SourceError when SRC itself is unusable or another build holds OUT/<split>."""
    if codec not in CODECS:
        raise SourceError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    source = read_source(src, labels_from_dirs=labels_from_dirs)
    _check_out(Path(out), source.splits())
    source.labels = _kept_label_order(Path(out), source.labels)
    opts = Options(sample_rate, codec, shard_samples, shard_mb, segment_seconds, keep_order, seed)
    command = command or f"shards_tools.build.build({str(src)!r})"
    with _Workers(workers or os.cpu_count() or 1) as pool:
        summaries = [_build_split(source, split, Path(out) / split, opts, pool, command, progress)
                     for split in source.splits()]
    _write_lines(Path(out) / REJECTED_NAME, [line for s in summaries if (p := s.directory / REJECTED_NAME).exists()
                                             for line in p.read_text().splitlines(keepends=True)])
    return summaries


def _check_out(out: Path, splits: list[str]) -> None:
    """OUT must be a folder we can write, holding no split of another dataset: a split left from a build of
    another source would pass for part of this one (its labels, its clips) in every later stage."""
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out}: exists and is not a folder; give a folder (new or from an earlier build) for OUT")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SourceError(f"{out}: cannot create it ({e.strerror}); choose a folder you can write") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SourceError(f"{out}: not writable; choose a folder you can write")
    foreign = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in splits
                     and ((d / MANIFEST_NAME).exists() or (d / RECORDS_DIR).exists()))
    if foreign:
        raise SourceError(f"{out}: holds split(s) {', '.join(foreign)} that SRC does not have (another dataset's "
                          "build?); remove them or build into another folder")


def _kept_label_order(out: Path, labels: list[str] | None) -> list[str] | None:
    """An earlier build's vocabulary order when it holds exactly these labels, so class ids stay what models
    trained on it know (builds before 2026-11-25 sorted integer labels as text: '10' before '2')."""
    for directory in find_split_dirs(out) if labels else []:
        try:
            old = DatasetManifest.load(directory).labels
        except ManifestError:
            continue
        if old and old != labels and old in builder_label_orders(labels):
            return old
    return labels


def _build_split(source: Source, split: str, directory: Path, opts: Options, pool: _Workers, command: str,
                 progress: bool) -> SplitSummary:
    records_dir = directory / RECORDS_DIR
    try:
        records_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(records_dir, os.W_OK | os.X_OK) or not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise SourceError(f"{directory}: cannot write the split here ({e.strerror or e}); make it a folder you can "
                          "write, or choose another OUT") from None
    with _exclusive(records_dir / "lock", directory):
        # manifest first: from here until the end the split is visibly incomplete
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        for tmp in directory.glob(".audio-*.tmp"):
            tmp.unlink()
        items = [i for i in source.items if i.split == split]
        entries, rejected = _plan_entries(items, opts, pool)
        if not opts.keep_order:
            entries = mixed_order(entries, opts.seed)
        plans = plan_shards(entries, opts.shard_samples, int(opts.shard_mb * 1e6) if opts.shard_mb else None,
                            opts.sample_rate, opts.codec)
        records = {p.name: r for p in plans if (r := _load_record(directory, p)) is not None}
        todo = [p for p in plans if p.name not in records]
        write = partial(write_shard, directory=directory, opts=opts)
        total = sum(len(p.entries) for p in todo)
        with _Progress(split, total, pool.queue, progress) as bar:
            for record in pool.imap_unordered(write, todo):
                records[record["name"]] = record
                bar.rejected += len(record["rejected"])
        records = [records[p.name] for p in plans]
        rejected += [r for rec in records for r in rec["rejected"]]
        rejected.sort(key=lambda r: r["order"])
        # one line per file and reason: a file cut into segments is refused once, not once per segment
        rejected = list({(r["order"], r["reason"]): r for r in rejected}.values())
        shards = [ShardInfo(**rec["shard"]) for rec in records if rec["shard"]]
        _remove_stale(directory, {s.name for s in shards}, {p.name for p in plans})
        _write_rejected(directory / REJECTED_NAME, rejected, split)
        manifest = DatasetManifest(
            split=split, sample_rate=opts.sample_rate, codec=opts.codec,
            num_samples=sum(s.num_samples for s in shards),
            total_seconds=round(sum(s.seconds for s in shards), 6),
            labels=source.labels, shards=shards,
            build=BuildInfo(command=command, source=os.path.abspath(source.origin),
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            rejected=len(rejected), order="source" if opts.keep_order else "shuffled",
                            seed=None if opts.keep_order else opts.seed))
        manifest.save(directory)
    return SplitSummary(split, directory, manifest.num_samples, manifest.total_seconds, len(shards),
                        len(plans) - len(todo), len(rejected), sum(r["size"] for r in records))


def _plan_entries(items, opts: Options, pool: _Workers) -> tuple[list[Entry], list[dict]]:
    """Entries to write, in source order, and the items rejected before decoding (duplicates...)."""
    with_header = bool(opts.segment_seconds or opts.shard_mb)
    surveys = pool.imap(partial(survey, with_header=with_header), items, chunksize=64)
    entries, rejected, seen = [], [], {}
    for order, (item, info) in enumerate(zip(items, surveys)):
        if item.error:
            rejected.append(_rejection(order, item.source, item.error))
            continue
        for e in segment_entries(order, item, info, opts.segment_seconds):
            if e.key in seen:  # a segment key can meet a real file's key: a/b.wav cut vs a/b__seg00000.wav
                rejected.append(_rejection(order, item.source, f"duplicate key {e.key} (already used by "
                                                               f"{seen[e.key]})"))
                continue
            seen[e.key] = item.source
            entries.append(e)
    return entries, rejected


def _rejection(order: int, path: str, reason: str) -> dict:
    return {"order": order, "path": path, "reason": reason}


# ---- the worker side: one shard per task -------------------------------------------------------------

_report = None  # set in each worker: sends (clips, seconds) to the progress bar
_REPORT_EVERY = 16


def write_shard(plan: ShardPlan, directory: Path, opts: Options) -> dict:
    """Worker: write one shard and its record; returns the record. Never raises for a bad input."""
    rejected, seconds, keys = [], 0.0, []
    unreported = [0, 0.0]  # progress goes out every few clips: a message per clip costs the parent CPU
    with TarShard(directory / plan.name) as tar:
        for e in plan.entries:
            result = encode_entry(e, opts)
            if isinstance(result, str):
                rejected.append(_rejection(e.order, e.item.source, result))
            else:
                audio, meta, secs = result
                tar.add(e.key, [(opts.codec, audio), ("json", meta)])
                seconds += secs
                keys.append(e.key)
                unreported[1] += secs
            unreported[0] += 1
            if unreported[0] >= _REPORT_EVERY:
                _report(*unreported)
                unreported = [0, 0.0]
        _report(*unreported)
        if keys:
            tar.close()
            shard = ShardInfo(plan.name, len(keys), round(seconds, 6), tar.sha256, keys[0], keys[-1]).__dict__
        else:
            tar.abort()
            shard = None
    if shard is None:
        (directory / plan.name).unlink(missing_ok=True)
    record = {"name": plan.name, "fingerprint": plan.fingerprint, "shard": shard,
              "size": tar.size if shard else 0, "rejected": rejected}
    atomic_write_text(directory / RECORDS_DIR / f"{plan.name}.json", json.dumps(record))
    return record


def encode_entry(e: Entry, opts: Options) -> tuple[bytes, bytes, float] | str:
    """One sample -> (audio bytes, JSON bytes, seconds), or a short rejection reason."""
    try:
        x, sr = load_frames(e.item.path, e.start, e.stop) if e.is_segment else load_file(e.item.path)
        y = resample(x, sr, opts.sample_rate)
        if y.size == 0:
            return "zero-length after resampling"
        seconds = y.size / opts.sample_rate
        meta = {"id": e.key, "duration": seconds, "label": e.item.label, "source": e.item.source,
                "orig_sample_rate": sr}
        if e.is_segment:
            meta["offset"] = e.start / sr
        return encode_audio(y, opts.sample_rate, opts.codec), json.dumps(meta, sort_keys=True).encode(), seconds
    except AudioDecodeError as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - anything unexpected is still just one rejected file
        return f"error: {type(err).__name__}: {str(err)[:120]}"


def _load_record(directory: Path, plan: ShardPlan) -> dict | None:
    """The record of a shard written earlier from exactly this plan, if its tar is still intact and none of
    its files was refused for a reason the user may have fixed since without touching the file (permissions,
    a missing file put back): a fingerprint sees neither."""
    try:
        record = json.loads((directory / RECORDS_DIR / f"{plan.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != plan.fingerprint:
        return None
    if any(r["reason"].startswith(_RETRIED_REASONS) for r in record["rejected"]):
        return None
    if record["shard"] is not None:
        tar = directory / plan.name
        if not tar.is_file() or tar.stat().st_size != record["size"]:
            return None
    return record


def _remove_stale(directory: Path, shards: set[str], planned: set[str]) -> None:
    """Shards and records of an earlier, different build of this split (e.g. more shards then)."""
    for p in directory.glob(SHARD_GLOB):
        if p.name not in shards:
            p.unlink()
    for p in (directory / RECORDS_DIR).glob("audio-*.json"):
        if p.name.removesuffix(".json") not in planned:
            p.unlink()


def _write_rejected(path: Path, rejected: list[dict], split: str) -> None:
    _write_lines(path, [json.dumps({"path": r["path"], "reason": r["reason"], "split": split}) + "\n"
                        for r in rejected])


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write the lines atomically; no lines: no file (so an old build's rejections never linger)."""
    if lines:
        atomic_write_text(path, "".join(lines))
    else:
        path.unlink(missing_ok=True)


_HELD_LOCKS: set[int] = set()  # file descriptors of the split locks this process holds


class _exclusive:
    """Hold an exclusive lock on a split dir, so two builds never write the same shards. A worker forked
    while a lock is held closes its copy (_init_worker): a worker outliving a killed build by a moment
    must not keep the split locked against the run that resumes it."""

    def __init__(self, lock: Path, directory: Path) -> None:
        self.lock, self.directory = lock, directory

    def __enter__(self):
        self.fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SourceError(f"{self.directory}: another `unfused-shards build` is writing this split; "
                              "wait for it to finish (or stop it) and run the command again") from None
        _HELD_LOCKS.add(self.fd)

    def __exit__(self, *exc) -> None:
        _HELD_LOCKS.discard(self.fd)
        os.close(self.fd)


# ---- processes and progress -----------------------------------------------------------------------

def _init_worker(queue) -> None:
    global _report
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()
    _report = lambda clips, seconds: queue.put((clips, seconds))  # noqa: E731
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the build process dies, so a killed build leaves no orphan still
    writing a shard that the next run would write too."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


class WorkerDied(SourceError):
    """A worker process ended without a result (killed: out of memory, or a decoder crash)."""


class _Workers:
    """A process pool (or, with one worker, this process) whose workers report progress on a queue.

    A concurrent.futures pool, not multiprocessing.Pool: when a worker dies (the OOM killer, a decoder that
    crashes on a file), multiprocessing.Pool waits for its result for ever; this one fails the tasks still
    out, and the build stops with WorkerDied. The shards finished by then keep their records, so running
    the same command again writes only the rest."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self.queue = SimpleQueue()  # put() writes at once: progress is in the pipe before the result
        self._pool = None

    def __enter__(self) -> _Workers:
        if self.n > 1:
            self._pool = ProcessPoolExecutor(self.n, initializer=_init_worker, initargs=(self.queue,))
        else:
            global _report
            _report = lambda clips, seconds: self.queue.put((clips, seconds))  # noqa: E731
        return self

    def imap(self, fn, items, chunksize: int = 1):
        if not self._pool:
            return map(fn, items)
        return self._unbroken(self._pool.map(fn, items, chunksize=chunksize), "surveying the source files")

    def imap_unordered(self, fn, items):
        if not self._pool:
            return map(fn, items)
        futures = [self._pool.submit(fn, item) for item in items]
        return self._unbroken((f.result() for f in as_completed(futures)), "writing shards")

    @staticmethod
    def _unbroken(results, doing: str):
        try:
            yield from results
        except BrokenProcessPool:
            raise WorkerDied(f"a worker process died while {doing} (killed, e.g. out of memory, or crashed in a "
                             "decoder); the shards finished so far are kept: run the same command again to write "
                             "the rest (with fewer --workers if memory ran out)") from None

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool:
            if exc_type is not None:  # Ctrl-C or an error: stop now, not after the shards being written
                for proc in list(getattr(self._pool, "_processes", {}).values()):  # no public kill before 3.14
                    proc.kill()
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.queue.close()


class _Progress:
    """A bar of clips written, with audio-hours and audio-hours/s, fed from the workers' queue."""

    def __init__(self, split: str, total: int, queue, enabled: bool) -> None:
        self.queue, self.rejected, self.hours = queue, 0, 0.0
        self.bar = tqdm(total=total, desc=f"build {split}", unit="clip", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def __enter__(self) -> _Progress:
        self.start = time.monotonic()
        self._thread.start()
        return self

    def _drain(self) -> None:
        while (msg := self._next()) is not None:
            clips, seconds = msg
            self.hours += seconds / 3600
            self.bar.update(clips)
            rate = self.hours / max(time.monotonic() - self.start, 1e-6)
            self.bar.set_postfix_str(f"{self.hours:.3f} h audio, {rate:.3f} h/s, {self.rejected} rejected",
                                     refresh=False)

    def _next(self):
        try:
            return self.queue.get()
        except (EOFError, OSError):  # the queue was closed under us: the build is ending on an error
            return None

    def __exit__(self, exc_type, *exc) -> None:
        # On an error (a worker died, possibly holding the queue's write lock) put() could block for ever:
        # leave the daemon thread to end when _Workers closes the queue.
        if exc_type is None:
            self.queue.put(None)  # after every worker message: imap_unordered has returned all results
            self._thread.join()
        self.bar.close()

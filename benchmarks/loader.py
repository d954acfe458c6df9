"""Training-loader throughput: the project's shard stream against per-file loading and the CPU limit.

The same clips (default: 2000 synthesized 1 s clips, 16 kHz mono, tones + noise, fixed seed) go through the
same per-clip work in every setup, for each shard codec (FLAC and WAV):

  work per clip: decode (the shard reader's RawSample.audio) + random crop of 0.95 s (both from the
  training's own `train_transform`, called as is) + log-mel (the project's LogMel, 64 mels, hop 10 ms).
  NOTE: training computes the log-mel on the whole batch in the training process (Features, in the
  model's forward), not in the DataLoader workers. Here it is computed per clip inside the worker, so
  that the loader does all of the CPU work being compared; `--logmel none` measures decode + crop only
  (what the training's workers actually do).

  (1) shards: `unfused-shards build CLIPS OUT --codec C --shard-samples 200`, read with the project's
      TrainingStream (shuffle, buffer 1000, exact per-lane batches) + make_loader: W DataLoader workers.
  (2) per-file: a map-style torch Dataset over the clips as individual files of the same codec (bytes
      identical to the shard members), DataLoader(W workers, shuffle=True, same batch size). After the
      warm-up epoch every file is in the page cache: this baseline reads no disk, as a dataset that fits
      in RAM would; on a network file system or a cold disk per-file reads cost far more.
  (3) CPU limit: one process, one thread, decoding + transforming the shard members already in memory
      (no tar parsing, no DataLoader, no IPC), clips/s x W: what W workers could do if loading were free.
  (4) W loops at once (a reference, not a target): the same in-memory loop in W processes at the same time,
      each over 1/W of the members. On a virtual or shared machine W busy cores rarely give W x one
      core's speed; (4)/(3) says how much of the gap between (1) and (3) is the machine, not the loader.

Clips/s are over --epochs epochs (default 2) after one untimed warm-up epoch, the setups taking turns epoch
by epoch (a drifting machine speed then skews no ratio). The shards loader is made once and its workers
persist across epochs, as in training; the per-file baseline is a plain DataLoader at torch's defaults
(new workers each epoch, forked: ~10 ms each).
Targets, per codec: shards / CPU limit >= 0.9, shards / per-file >= 1.0. Exit code 0 whatever the ratios.
Also printed: the loaders' own cost (a no-op transform), each shards worker's private memory after the run,
and the wait for an epoch's first batch of shards (the shuffle buffer fills before it yields) against the
mean time per batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from _common import (SINGLE_THREAD_ENV, CpuWitness, Workspace, build_supports_codec, ratio, run, table, tone_noise,
                     venv_bin, verdict)


from unfused_dist.audio.frontend import FrontendConfig, LogMel  # noqa: E402
from unfused_dist.audio.io import encode_audio  # noqa: E402
from unfused_dist.data.loader import make_loader  # noqa: E402
from unfused_dist.data.order import PositionRng  # noqa: E402
from unfused_dist.data.source import ShardSource  # noqa: E402
from unfused_dist.data.stream import TrainingStream  # noqa: E402
from unfused_dist.data.workers import WORKER_CONTEXT  # noqa: E402
from unfused_dist.data.shards import RawSample  # noqa: E402
from unfused_dist.data.transforms import RandomCrop, train_transform  # noqa: E402

SR = 16000
TARGET_VS_LIMIT, TARGET_VS_FILES = 0.9, 1.0
SHARD_SAMPLES, SHUFFLE_BUFFER, SEED = 200, 1000, 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000, help="clips to synthesize (default 2000)")
    p.add_argument("--seconds", type=float, default=1.0, help="clip length in seconds (default 1.0)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch (default 2)")
    p.add_argument("--logmel", choices=("worker", "none"), default="worker",
                   help="worker: log-mel per clip in the worker (default); none: decode + crop only")
    p.add_argument("--work", help="scratch folder (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep clips and shards")
    args = p.parse_args(argv)
    if min(args.clips, args.workers, args.batch_size, args.epochs) <= 0 or args.seconds <= 0:
        p.error("--clips, --seconds, --workers, --batch-size and --epochs must be positive")
    return args


# ---- data -----------------------------------------------------------------------------------------

def synthesize_clips(root: Path, clips: int, seconds: float, codecs: list[str]) -> dict[str, list[Path]]:
    """Each clip written once per codec with the project's encoder, so per-file bytes equal what the
    builder puts in the shards. Clip i has its own seeded generator."""
    paths: dict[str, list[Path]] = {c: [] for c in codecs}
    for i in range(clips):
        x = tone_noise(np.random.default_rng([SEED, i]), seconds, SR)[:, 0]
        for codec in codecs:
            path = root / codec / f"clip{i:05d}.{codec}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_audio(x, SR, codec))
            paths[codec].append(path)
    return paths


def build_shards(clips_dir: Path, out: Path, codec: str, workers: int, codec_flag: bool) -> Path:
    cmd = [venv_bin("unfused-shards"), "build", str(clips_dir), str(out), "--workers", str(workers),
           "--shard-samples", str(SHARD_SAMPLES), "--quiet"] + (["--codec", codec] if codec_flag else [])
    run(cmd, env=SINGLE_THREAD_ENV)
    return out / "train"


def shard_samples(split_dir: Path) -> list[RawSample]:
    """Every sample of a split with its member bytes in memory, in manifest order."""
    source = ShardSource(split_dir)
    return [s for i in range(len(source.counts)) for s in source.iter_shard(i)]


# ---- the per-clip work ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipWork:
    """The training's transform (decode + random 0.95 s crop), plus a per-clip log-mel when asked. A
    dataclass, not a closure: the project's DataLoader workers receive it pickled from a fork server."""
    crop: RandomCrop
    mel: LogMel | None

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> tuple:
        (wave,) = self.crop(sample, rng)
        if self.mel is None:
            return (wave,)
        return (self.mel(torch.from_numpy(wave)[None])[0].numpy(),)  # (1, mels, frames)


def make_transform(logmel: bool) -> tuple[ClipWork, str]:
    cfg = FrontendConfig()
    return (ClipWork(train_transform(cfg, with_label=None), LogMel(cfg) if logmel else None),
            "unfused_dist.data.transforms.train_transform")


class FileClips(Dataset):
    """Map-style per-file dataset: read one file, wrap it as the shard reader's RawSample, transform.
    Each clip's crop generator is the shard stream's kind (PositionRng), at (epoch, index)."""

    def __init__(self, paths: list[Path], codec: str, transform):
        self.paths, self.codec, self.transform, self.epoch = paths, codec, transform, 0
        self._rng: PositionRng | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        sample = RawSample(key=path.stem, shard=str(path), members={self.codec: path.read_bytes()})
        if self._rng is None:  # made in the worker, once per epoch: workers are new each epoch
            self._rng = PositionRng(SEED, self.epoch)
        return self.transform(sample, self._rng.at(i))


# ---- the setups: each is one_epoch(epoch) -> clips delivered ----------------------------------------

def interleaved_rates(setups: dict, epochs: int) -> dict[str, float]:
    """clips/s of each setup over `epochs` timed epochs after one untimed warm-up epoch. The setups take
    turns epoch by epoch, so a drift in the machine's speed (shared hosts drift by tens of percent over
    minutes) hits them all alike instead of skewing the ratios."""
    for one_epoch in setups.values():
        one_epoch(0)
    clips, seconds = dict.fromkeys(setups, 0), dict.fromkeys(setups, 0.0)
    for epoch in range(1, epochs + 1):
        for name, one_epoch in setups.items():
            t0 = time.perf_counter()
            clips[name] += one_epoch(epoch)
            seconds[name] += time.perf_counter() - t0
    return {name: clips[name] / seconds[name] for name in setups}


def drain(loader) -> int:
    return sum(len(batch[0]) for batch in loader)


def shards_epochs(split_dir: Path, transform, args):
    """The project's training path: TrainingStream + make_loader, made once, its workers persisting across
    epochs (as training does)."""
    stream = TrainingStream(ShardSource(split_dir), transform, seed=SEED, shuffle=True, rank=0, world=1,
                            workers=args.workers, batch_size=args.batch_size, shuffle_buffer=SHUFFLE_BUFFER)
    loader = make_loader(stream)
    first_waits, epoch_seconds = [], []

    def one_epoch(epoch: int) -> int:
        stream.set_position(epoch, 0)
        t0, clips = time.perf_counter(), 0
        for batch in loader:
            if not clips:
                first_waits.append(time.perf_counter() - t0)
            clips += len(batch[0])
        epoch_seconds.append(time.perf_counter() - t0)
        return clips
    one_epoch.worker_private_mib = lambda: private_mib(loader)
    # the wait for an epoch's first batch (the shuffle buffer fills first), against the mean time per batch
    one_epoch.first_batch = lambda: (np.mean(first_waits[1:]), np.mean(epoch_seconds[1:]) / stream.batches_per_epoch())
    return one_epoch


def private_mib(loader) -> float | None:
    """Mean private memory (Private_Dirty: pages written since the fork, so no longer shared with the fork
    server) of a persistent loader's workers, MiB; None without Linux's smaps_rollup. Reads the worker pids
    from torch's iterator, which is private API: a benchmark may, the package does not."""
    try:
        sizes = []
        for worker in loader._iterator._workers:
            rollup = Path(f"/proc/{worker.pid}/smaps_rollup").read_text().splitlines()
            sizes += [int(line.split()[1]) / 1024 for line in rollup if line.startswith("Private_Dirty:")]
        return sum(sizes) / len(sizes) if sizes else None
    except (OSError, AttributeError):
        return None


def per_file_epochs(paths: list[Path], codec: str, transform, args):
    dataset = FileClips(paths, codec, transform)

    def one_epoch(epoch: int) -> int:
        dataset.epoch, dataset._rng = epoch, None  # set before the workers fork: each gets this epoch's copy
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=True, generator=torch.Generator().manual_seed(epoch))  # default_collate
        return drain(loader)
    return one_epoch


def cpu_limit_epochs(samples: list[RawSample], transform, workers: int):
    """One thread, as in a DataLoader worker (torch runs workers single-threaded), and one generator for
    the whole pass: the least work the clips need. Counts each clip `workers` times: W such threads."""
    rng = np.random.default_rng(SEED)

    def one_epoch(epoch: int) -> int:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for s in samples:
                transform(s, rng)
        finally:
            torch.set_num_threads(threads)
        return workers * len(samples)
    return one_epoch


class ParallelLimit:
    """(4): W processes, each running the CPU-limit loop over its 1/W of the in-memory samples, started
    together every epoch. Processes come from the loader's fork server (forking this process, which has
    threads, could deadlock)."""

    def __init__(self, samples: list[RawSample], transform, workers: int):
        self.pipes, self.procs = [], []
        for part in np.array_split(np.arange(len(samples)), workers):
            mine, theirs = WORKER_CONTEXT.Pipe()
            proc = WORKER_CONTEXT.Process(target=_limit_loop, args=(theirs, [samples[i] for i in part], transform),
                                          daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)

    def __call__(self, epoch: int) -> int:
        for pipe in self.pipes:
            pipe.send(True)
        return sum(pipe.recv() for pipe in self.pipes)

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(False)
        for proc in self.procs:
            proc.join()


def _limit_loop(pipe, samples: list[RawSample], transform) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    while pipe.recv():
        for s in samples:
            transform(s, rng)
        pipe.send(len(samples))


def noop(sample: RawSample, rng: np.random.Generator):
    return (np.zeros(1, np.float32),)


# ---- main ---------------------------------------------------------------------------------------------

def measure_codec(codec: str, paths: list[Path], ws: Workspace, args, transform, codec_flag: bool) -> dict:
    split = build_shards(paths[0].parent, ws.path(f"shards-{codec}"), codec, args.workers, codec_flag)
    samples = shard_samples(split)
    r = {"codec": codec, "audio_bytes": np.mean([len(s.members[codec]) for s in samples]),
         "shard_bytes": sum(p.stat().st_size for p in split.glob("audio-*.tar")) / len(samples)}
    parallel = ParallelLimit(samples, transform, args.workers)
    shards = shards_epochs(split, transform, args)
    try:
        r.update(interleaved_rates({
            "limit": cpu_limit_epochs(samples, transform, args.workers),
            "parallel": parallel,
            "shards_rate": shards,
            "files": per_file_epochs(paths, codec, transform, args),
            # the loaders' own cost: the same epochs with nothing decoded or transformed
            "shards_noop": shards_epochs(split, noop, args),
            "files_noop": per_file_epochs(paths, codec, noop, args),
        }, args.epochs))
        r["worker_mib"] = shards.worker_private_mib()
        r["first_batch_s"], r["batch_s"] = shards.first_batch()
    finally:
        parallel.close()
    return r


def report(results: list[dict]) -> str:
    rows = [[r["codec"], f"{r['audio_bytes']:,.0f}", f"{r['shard_bytes']:,.0f}", f"{r['shards_rate']:,.0f}",
             f"{r['files']:,.0f}", f"{r['limit']:,.0f}", f"{r['parallel']:,.0f}",
             f"{ratio(r['shards_rate'] / r['limit'])} {verdict(r['shards_rate'] / r['limit'], TARGET_VS_LIMIT)}",
             f"{ratio(r['shards_rate'] / r['files'])} {verdict(r['shards_rate'] / r['files'], TARGET_VS_FILES)}",
             ratio(r['parallel'] / r['limit']), ratio(r['shards_rate'] / r['parallel'])]
            for r in results]
    return table(["codec", "audio B/clip", "shard B/clip", "shards clips/s", "per-file clips/s",
                  "CPU limit clips/s", "W loops at once clips/s", f"shards/limit (>={TARGET_VS_LIMIT})",
                  f"shards/per-file (>={TARGET_VS_FILES})", "W loops/limit", "shards/W loops"],
                 rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codec_flag = build_supports_codec()
    codecs = ["flac", "wav"] if codec_flag else ["flac"]
    with Workspace(args.work, args.keep, "bench-loader-") as ws:
        t0 = time.perf_counter()
        paths = synthesize_clips(ws.path("clips"), args.clips, args.seconds, codecs)
        print(f"{args.clips} clips of {args.seconds:g} s at {SR} Hz (seed {SEED}) in {time.perf_counter() - t0:.1f} s; "
              f"workers {args.workers}, batch {args.batch_size}, {args.epochs} timed epochs after 1 warm-up, "
              f"shard samples {SHARD_SAMPLES}, shuffle buffer {SHUFFLE_BUFFER}, CPU cores {os.cpu_count()}")
        work = ("decode + random 0.95 s crop (train_transform) + log-mel per clip in the worker"
                if args.logmel == "worker" else "decode + random 0.95 s crop (train_transform), no log-mel")
        print(f"per-clip work: {work}")
        if not codec_flag:
            print("unfused-shards build has no --codec here: FLAC shards only")
        transform, origin = make_transform(args.logmel == "worker")
        print(f"decode + crop: {origin}")
        with CpuWitness() as witness:
            results = [measure_codec(c, paths[c], ws, args, transform, codec_flag) for c in codecs]
        print()
        print(report(results))
        print("\nper-file clips come from the page cache after the warm-up epoch (no disk reads); the CPU limit "
              f"is one thread's clips/s on in-memory shard members x {args.workers}; 'W loops at once' runs that loop in "
              f"{args.workers} processes at the same time (a reference for the machine's own scaling, not a target)")
        for r in results:
            print(f"{r['codec']}, no-op transform (the loaders' own cost: worker start-up, reading, "
                  f"shuffling, seeding, batching, IPC): shards {r['shards_noop']:,.0f} clips/s, "
                  f"per-file {r['files_noop']:,.0f} clips/s")
            print(f"{r['codec']}, shards loader: an epoch's first batch after {1e3 * r['first_batch_s']:.0f} ms, "
                  f"{r['first_batch_s'] / r['batch_s']:.1f}x the mean time per batch ({1e3 * r['batch_s']:.0f} ms; "
                  f"the shuffle buffer of {SHUFFLE_BUFFER} fills before it yields, reading members without decoding)")
            if r["worker_mib"] is not None:
                print(f"{r['codec']}, shards loader: {r['worker_mib']:,.0f} MiB private memory per worker after the "
                      "run (Private_Dirty: written since the fork, no longer shared)")
        print(witness.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

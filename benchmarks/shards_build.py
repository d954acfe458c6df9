"""Shard-building throughput: `unfused-shards build` against lhotse's Shar export and against the codec limit.

The same raw corpus (default: 600 synthesized WAV files of 1-4 s, 44.1 or 22.05 kHz, mono or stereo,
tones + noise, fixed seed; or your own folder with --src) is turned into 16 kHz mono 16-bit FLAC three
ways, each with the same number of worker processes (--workers):

  (a) unfused-shards build SRC OUT --workers N --shard-samples S --codec flac --quiet   (subprocess)
  (b) lhotse shar export -a flac -s S -j N --no-shuffle CUTS OUT   (subprocess; lhotse 1.33.0, see
      requirements-bench.txt). CUTS holds one cut per file, resampled to 16 kHz by lhotse's own
      pure-PyTorch resampler (no torchaudio) and read with its libsndfile backend. Writing CUTS is not
      timed. A stereo file's cut keeps channel 0: lhotse's only downmix (MultiCut.to_mono(mono_downmix=True))
      decodes and re-encodes the audio eagerly while the manifest is made, outside the timed export,
      so selecting a channel is the way to give it the same decode + resample + encode work.
  (c) codec limit: a multiprocessing.Pool of N doing only the project's load_file + resample +
      encode_flac for every file: no planning, no tar, no JSON, no manifest.

Every method starts from an output folder that does not exist (the unfused build is resumable and would
otherwise skip its work), after the source files were read once (warm page cache for all three).
Every process runs with one compute thread (OMP_NUM_THREADS=1 ...), so N workers use N cores.

Targets: unfused / lhotse >= 1.5 and unfused / codec limit >= 0.7, as throughput ratios (= inverse time
ratios). Wall-clock times are best of --repeat rounds, the methods taking turns within a round. Exit code 0
whatever the ratios (this is a measurement); nonzero when a method fails or does not produce every file.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf

from _common import (SINGLE_THREAD_ENV, CpuWitness, Workspace, best_of, build_supports_codec, ratio, run,
                     startup_seconds, table, tone_noise, venv_bin, verdict)

TARGET_VS_LHOTSE, TARGET_VS_LIMIT = 1.5, 0.7
RATES, CHANNELS = (44100, 22050), (1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=600, help="files to synthesize (default 600; ignored with --src)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every method (default 2)")
    p.add_argument("--shard-samples", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the best is reported (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthesized corpus (default 0)")
    p.add_argument("--src", help="a folder of audio files to use instead of the synthesized corpus")
    p.add_argument("--work", help="scratch folder (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    args = p.parse_args(argv)
    if min(args.files, args.workers, args.shard_samples, args.repeat) <= 0:
        p.error("--files, --workers, --shard-samples and --repeat must be positive")
    return args


# ---- the corpus -----------------------------------------------------------------------------------

def synthesize_corpus(root: Path, files: int, seed: int) -> None:
    """`files` WAVs of 1-4 s, rates and channel counts mixed, in a few sub-folders (the builder recurses).
    Each file has its own seeded generator, so file i is the same whatever --files is."""
    for i in range(files):
        rng = np.random.default_rng([seed, i])
        sr, channels = RATES[int(rng.integers(len(RATES)))], CHANNELS[int(rng.integers(len(CHANNELS)))]
        path = root / f"group{i % 8}" / f"clip{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone_noise(rng, rng.uniform(1.0, 4.0), sr, channels), sr, subtype="PCM_16")


def corpus_files(src: Path) -> list[tuple[str, str]]:
    """(path, key) of every file the builder will take, from the builder's own source reader, so the
    three methods get exactly the same files."""
    from shards_tools.sources import SourceError, read_source

    try:
        items = read_source(src).items
    except SourceError as e:
        raise SystemExit(f"--src: {e}") from None
    bad = [i.source for i in items if i.error]
    if bad:
        raise SystemExit(f"{src}: the builder rejects {len(bad)} entries before decoding (e.g. {bad[0]}); "
                         "use a folder without duplicate keys")
    return [(i.path, i.key) for i in items]


def describe(files: list[tuple[str, str]]) -> tuple[float, str]:
    """Total seconds of audio (from the headers) and a one-line description of the corpus; reads every
    file once, which also warms the page cache for all three methods."""
    seconds, rates, stereo, size = 0.0, {}, 0, 0
    for path, _ in files:
        size += len(Path(path).read_bytes())
        info = sf.info(path)
        seconds += info.frames / info.samplerate
        rates[info.samplerate] = rates.get(info.samplerate, 0) + 1
        stereo += info.channels > 1
    mix = ", ".join(f"{n} at {r} Hz" for r, n in sorted(rates.items()))
    return seconds, (f"{len(files)} files ({mix}; {stereo} multi-channel), {seconds:.1f} s = {seconds / 3600:.3f} h "
                     f"of audio, {size / 1e6:.1f} MB")


# ---- (a) unfused-shards build -------------------------------------------------------------------------

def unfused_build(src: Path, out: Path, args) -> dict:
    """One build into a fresh folder; exit code 3 (some inputs rejected) still counts as a build."""
    cmd = [venv_bin("unfused-shards"), "build", str(src), str(out), "--workers", str(args.workers),
           "--shard-samples", str(args.shard_samples), "--quiet"]
    if args.codec_flag:  # flac is the default either way; name it when the CLI knows the flag
        cmd += ["--codec", "flac"]
    run(cmd, ok=(0, 3), env=SINGLE_THREAD_ENV)
    manifests = [json.loads(m.read_text()) for m in out.glob("*/manifest.json")]
    tars = [p for p in out.rglob("audio-*.tar")]
    return {"clips": sum(m["num_samples"] for m in manifests), "bytes": sum(p.stat().st_size for p in tars),
            "command": " ".join(cmd)}


# ---- (b) lhotse shar export -------------------------------------------------------------------------

def lhotse_cuts(files: list[tuple[str, str]], path: Path) -> None:
    """One 16 kHz mono cut per file, saved as a CutSet manifest (not timed). See the module docstring for
    why a stereo file gives its channel 0."""
    from lhotse import CutSet, MultiCut, Recording, RecordingSet

    recordings = RecordingSet.from_recordings(Recording.from_file(p, recording_id=k) for p, k in files)
    cuts = [c.to_mono(mono_downmix=False)[0] if isinstance(c, MultiCut) else c
            for c in CutSet.from_manifests(recordings=recordings)]
    CutSet.from_cuts(cuts).resample(16000).to_file(path)


def lhotse_export(cuts: Path, out: Path, args) -> dict:
    cmd = [venv_bin("lhotse"), "shar", "export", "-a", "flac", "-s", str(args.shard_samples), "-j", str(args.workers),
           "--no-shuffle", str(cuts), str(out)]
    # libsndfile for reading and writing, as the project: pinned so that another installed backend
    # (torchcodec, torchaudio's ffmpeg) cannot silently change what is measured
    run(cmd, env={**SINGLE_THREAD_ENV, "LHOTSE_AUDIO_BACKEND": "LibsndfileBackend"})
    tars = sorted(out.glob("recording.*.tar"))
    clips = 0
    for t in tars:
        with tarfile.open(t) as tf:
            clips += sum(1 for m in tf.getnames() if m.endswith(".flac"))
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"clips": clips, "bytes": size, "command": " ".join(cmd)}


def check_lhotse_output(out: Path) -> str:
    """Rate and channels of the first exported clip: proof that lhotse did the same conversion."""
    with tarfile.open(min(out.glob("recording.*.tar"))) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".flac"))
        info = sf.info(io.BytesIO(t.extractfile(member).read()))
    return f"{info.samplerate} Hz, {info.channels} channel(s), {info.subtype}"


# ---- (c) the codec limit ------------------------------------------------------------------------------

def _encode_one(path: str) -> int:
    """Worker: what each sample of a build must cost at least; returns the FLAC size."""
    from unfused_dist.audio.io import TARGET_SR, encode_flac, load_file, resample

    x, sr = load_file(path)
    return len(encode_flac(resample(x, sr, TARGET_SR), TARGET_SR))


def _one_thread() -> None:
    """Pool initializer. The codec work uses no torch, but this process has torch loaded (lhotse imports
    it) and a forked worker inherits it: keep it to one thread. Importing it here would cost seconds."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def codec_limit(files: list[tuple[str, str]], workers: int) -> dict:
    paths = [p for p, _ in files]
    chunk = max(1, len(paths) // (workers * 16))  # small chunks: no worker idles at the end
    with Pool(workers, initializer=_one_thread) as pool:
        sizes = list(pool.imap_unordered(_encode_one, paths, chunksize=chunk))
    command = f"multiprocessing.Pool({workers}).imap_unordered(load_file+resample+encode_flac, chunksize={chunk})"
    return {"clips": len(sizes), "bytes": sum(sizes), "command": command}


def round_robin(methods: dict, repeat: int) -> dict[str, tuple[float, dict]]:
    """Best wall clock of each method over `repeat` rounds, the methods taking turns within a round, so a
    drift in the machine's speed (shared hosts drift by tens of percent over minutes) hits all alike."""
    results: dict[str, tuple[float, dict]] = {}
    for _ in range(repeat):
        for name, fn in methods.items():
            secs, result = best_of(fn, 1)
            if name not in results or secs < results[name][0]:
                results[name] = (secs, result)
    return results


# ---- report -------------------------------------------------------------------------------------------

def report(results: dict[str, tuple[float, dict]], n_files: int, audio_seconds: float) -> str:
    rows = []
    for name, (secs, r) in results.items():
        rows.append([name, f"{secs:.2f}", f"{n_files / secs:.1f}", f"{audio_seconds / 3600 / secs:.4f}",
                     f"{r['bytes'] / 1e6:.1f}"])
    return table(["method", "seconds", "files/s", "audio-h/s", "output MB"], rows)


def require_lhotse() -> None:
    try:
        import lhotse  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"lhotse is needed for the baseline ({e}): .venv/bin/pip install -c constraints.txt "
                         "-r requirements-bench.txt") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_lhotse()  # before minutes of synthesis, not after
    with Workspace(args.work, args.keep, "bench-shards-build-") as ws:
        if args.src:
            src = Path(args.src).resolve()
        else:
            src = ws.path("src")
            t0 = time.perf_counter()
            synthesize_corpus(src, args.files, args.seed)
            print(f"synthesized {args.files} files in {time.perf_counter() - t0:.1f} s (seed {args.seed}) -> {src}")
        args.codec_flag = build_supports_codec()
        files = corpus_files(src)
        audio_seconds, corpus = describe(files)
        print(f"corpus: {corpus}")
        print(f"workers {args.workers}, shard samples {args.shard_samples}, repeat {args.repeat}, "
              f"CPU cores {os.cpu_count()}, one compute thread per process\n")

        cuts = ws.path("cuts.jsonl.gz")
        t0 = time.perf_counter()
        lhotse_cuts(files, cuts)
        with gzip.open(cuts, "rt") as f:
            n_cuts = sum(1 for _ in f)
        print(f"lhotse CutSet manifest ({n_cuts} cuts, 16 kHz mono): {time.perf_counter() - t0:.1f} s, NOT timed")

        with CpuWitness() as witness:
            results = round_robin({
                "unfused-shards build (flac)": lambda: unfused_build(src, ws.path("unfused"), args),
                "lhotse shar export (flac)": lambda: lhotse_export(cuts, ws.path("lhotse"), args),
                "codec limit (Pool, no tar)": lambda: codec_limit(files, args.workers),
            }, args.repeat)
        lhotse_format = check_lhotse_output(ws.root / "lhotse")
        missing = {k: r["clips"] for k, (_, r) in results.items() if r["clips"] != len(files)}

        print(report(results, len(files), audio_seconds))
        t_unfused, t_lhotse, t_limit = (results[k][0] for k in results)
        vs_lhotse, vs_limit = t_lhotse / t_unfused, t_limit / t_unfused
        print(f"\nunfused / lhotse      = {ratio(vs_lhotse)}  (target >= {TARGET_VS_LHOTSE})  "
              f"{verdict(vs_lhotse, TARGET_VS_LHOTSE)}")
        print(f"unfused / codec limit = {ratio(vs_limit)}  (target >= {TARGET_VS_LIMIT})  "
              f"{verdict(vs_limit, TARGET_VS_LIMIT)}")

        # Both CLI timings include the interpreter's start and imports; say how much that is.
        py = sys.executable
        up_unfused = startup_seconds([py, "-c", "import shards_tools.cli, shards_tools.build"])
        up_lhotse = startup_seconds([venv_bin("lhotse"), "shar", "export", "--help"])
        net_unfused = max(t_unfused - up_unfused, 1e-9)
        print(f"\nstart-up inside the CLI timings (interpreter + imports, best of 3): unfused-shards "
              f"{up_unfused:.2f} s, lhotse {up_lhotse:.2f} s. Without them: unfused / lhotse = "
              f"{(t_lhotse - up_lhotse) / net_unfused:.2f}, "
              f"unfused / codec limit = {t_limit / net_unfused:.2f} (the codec limit runs in this process: it has "
              "no interpreter start-up in its time)")
        print(f"lhotse output: {lhotse_format}; audio read and written with LibsndfileBackend, resampled by "
              "lhotse's built-in torch resampler (no torchaudio)")
        for name, (_, r) in results.items():
            print(f"  {name}: {r['command']}")
        print(witness.line())
        if missing:
            print(f"ERROR: not every file was converted: {missing} of {len(files)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers: sizes, seeding, splits, audio I/O, manifests, the worker pool and the .done stamps."""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from unfused_dist.audio.io import resample, to_mono

# Bump when the generated audio or manifests change, so old .done stamps stop matching.
VERSION = 2
SR = 16000
HEADER = ["path", "label", "split", "source"]
SPLITS = ("train", "val", "test")

SIZES = {
    "ci": dict(
        kws_espeak_voices=5, kws_flite_voices=1,
        langid_prompts=40, langid_max_seconds=5.0,  # per language, prompts spoken in all five (the CI target task)
        inst_per_family=(5, 2, 3),  # train, val (training SoundFont), test (held-out SoundFont)
        pool_seconds={"planetblupi-music-ogg": 60, "asterisk-moh-opsound-wav": 30},
        segment_seconds=3.0,
    ),
    "demo": dict(
        kws_espeak_voices=95, kws_flite_voices=5,
        langid_prompts=None, langid_max_seconds=None,  # None: every prompt
        inst_per_family=(150, 30, 50),
        pool_seconds={"planetblupi-music-ogg": 3600, "singularity-music": 1500,
                      "asterisk-moh-opsound-wav": 600},
        segment_seconds=3.0,
    ),
}
# The background-noise bank for KWS comes from packages every size downloads anyway.
NOISE_PACKAGES = ("planetblupi-music-ogg", "asterisk-moh-opsound-wav")


def h64(*parts) -> int:
    """Stable 64-bit hash of an item id; md5 because crc32's linearity clusters similar ids."""
    return int.from_bytes(hashlib.md5("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def rng_for(*parts) -> np.random.Generator:
    """A generator seeded by the item id alone, so results do not depend on processing order."""
    return np.random.default_rng(h64(*parts))


def rank_split(ids: Iterable[str], val_frac: float, test_frac: float, salt: str = "split") -> dict[str, str]:
    """Assign each id to a split by its md5 rank: exact fractions, at least one id per split."""
    ordered = sorted(set(ids), key=lambda i: (h64(salt, i), i))
    n = len(ordered)
    n_val = max(1, round(n * val_frac)) if n >= 3 else 0
    n_test = max(1, round(n * test_frac)) if n >= 3 else 0
    out = {}
    for k, i in enumerate(ordered):
        out[i] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def to_mono_16k(x: np.ndarray, sr: int) -> np.ndarray:
    """soundfile's (frames, channels) or (frames,) -> 16 kHz mono float32, as the shard builder does it."""
    return resample(to_mono(x.T if x.ndim == 2 else x), sr, SR)


def load_window(path: Path, start_s: float, dur_s: float) -> np.ndarray:
    """Decode only [start, start+dur) of a long file (seeking keeps pool building cheap), as 16 kHz mono."""
    with sf.SoundFile(str(path)) as f:
        f.seek(int(start_s * f.samplerate))
        x = f.read(int(dur_s * f.samplerate), dtype="float32", always_2d=True)
        return to_mono_16k(x, f.samplerate)


def write_audio(path: Path, x: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.clip(x, -1.0, 1.0)
    sf.write(str(path), x, sr, subtype="PCM_16", format="FLAC")


def list_files(root: Path, suffix: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())


def audio_windows(files: Sequence[Path], root: Path, pkg: str, budget_s: float, win_s: float = 30.0):
    """Pick ~budget_s of win_s windows spread over a package's files, ranked by md5 of their id."""
    cands = []
    for f in files:
        dur = sf.info(str(f)).duration
        for k in range(int(dur // win_s)):
            cands.append((h64(pkg, f.relative_to(root), k), str(f.relative_to(root)), k * win_s))
    cands.sort()
    take = cands[: max(1, int(round(budget_s / win_s)))]
    return sorted((rel, start) for _, rel, start in take)


def run_jobs(fn: Callable, jobs: list, workers: int, desc: str, initializer=None, initargs=()) -> list:
    """Map fn over jobs in order with a progress bar; workers <= 1 runs inline (easier to debug)."""
    out = []
    bar = tqdm(total=len(jobs), desc=desc, unit="job", leave=False, dynamic_ncols=True)
    if workers <= 1 or len(jobs) <= 1:
        if initializer:
            initializer(*initargs)
        for j in jobs:
            out.append(fn(j))
            bar.update()
    else:
        chunk = max(1, min(32, len(jobs) // (workers * 8)))
        with mp.get_context("fork").Pool(workers, initializer, initargs) as pool:
            for r in pool.imap(fn, jobs, chunksize=chunk):
                out.append(r)
                bar.update()
    bar.close()
    return out


def write_manifest(path: Path, rows: list[dict], extra: Sequence[str] = ()) -> None:
    rows = sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["label"], r["path"]))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER + list(extra), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stamp(size: str) -> dict:
    return {"size": size, "version": VERSION}


def is_done(task_dir: Path, size: str) -> bool:
    done = task_dir / ".done"
    if not (done.is_file() and (task_dir / "manifest.csv").is_file()):
        return False
    try:
        return {k: json.loads(done.read_text()).get(k) for k in ("size", "version")} == stamp(size)
    except ValueError:
        return False


def fresh_dir(task_dir: Path) -> None:
    """Start a task from scratch: a stale or half-built directory must not leak old files into it."""
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)


def mark_done(task_dir: Path, size: str, summary: str, packages: list[str]) -> None:
    info = {**stamp(size), "summary": summary, "packages": sorted(packages)}
    (task_dir / ".done").write_text(json.dumps(info, indent=1) + "\n")


def done_info(task_dir: Path) -> dict:
    return json.loads((task_dir / ".done").read_text())


def summarize(task: str, task_dir: Path, rows: list[dict], seconds_taken: float | None) -> str:
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    labels = {r["label"] for r in rows if r["label"]}
    secs = 0.0
    nbytes = 0
    for r in rows:
        p = (task_dir / r["path"]).resolve()
        secs += sf.info(str(p)).duration
        nbytes += p.stat().st_size
    split_txt = " / ".join(f"{s} {n}" for s, n in counts.items() if n)
    took = f", built in {seconds_taken:.1f} s" if seconds_taken is not None else ""
    labels_txt = f", {len(labels)} labels" if labels else ""
    return (f"{task}: {len(rows)} clips ({split_txt}){labels_txt}, "
            f"{secs / 60:.1f} min audio, {nbytes / 1e6:.1f} MB{took}")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0

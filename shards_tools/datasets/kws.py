"""Keyword spotting (Speech Commands-like): the 35 words spoken by espeak-ng and flite voices.

Splits are by voice, so a test voice is never heard in training. Realism is cheap and matters for a
benchmark: half the clips get a synthetic room, half get real music as background noise.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from . import debs
from .common import (NOISE_PACKAGES, SR, audio_windows, h64, list_files, load_window, rank_split, rng_for,
                     run_jobs, slug, to_mono_16k, write_audio)

WORDS = ("backward bed bird cat dog down eight five follow forward four go happy house learn left marvin "
         "nine no off on one right seven sheila six stop three tree two up visual wow yes zero").split()
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
# Robotic, whispered and effect voices do not sound like speakers a keyword spotter would meet.
SKIP_VARIANT = ("robo", "whisper", "demonic", "announcer", "fast", "mr")
EXTRA = ("voice", "noise", "snr_db", "rir")

_bank: np.ndarray | None = None
_bank_src: list[tuple[int, str]] = []  # (start sample, package) for the noise column
_tmp = ""


def espeak_variants() -> list[str]:
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        cols = line.split()
        files = [c for c in cols if c.startswith("!v/")]
        # A name followed by more words is a file with a space, which `-v accent+name` cannot address.
        if files and cols[-1] == files[0]:
            name = files[0][3:]
            if not any(s in name.lower() for s in SKIP_VARIANT):
                names.add(name)
    return sorted(names)


def select_voices(cfg: dict) -> list[str]:
    espeak = [f"espeak-ng:{a}+{v}" for a in ACCENTS for v in espeak_variants()]
    flite = [f"flite:{v}" for v in FLITE_VOICES]
    by_hash = lambda ids: sorted(ids, key=lambda i: (h64("kws-voice", i), i))  # noqa: E731
    return by_hash(espeak)[: cfg["kws_espeak_voices"]] + by_hash(flite)[: cfg["kws_flite_voices"]]


def noise_bank(cache: Path) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """A few minutes of real game / hold music at 16 kHz to mix under the words."""
    parts, src, n = [], [], 0
    for pkg in NOISE_PACKAGES:
        root = debs.fetch(pkg, cache)
        files = [f for f in list_files(root, ".ogg") + list_files(root, ".wav") if "/doc/" not in str(f)]
        for rel, start in audio_windows(files, root, pkg, budget_s=120):
            x = load_window(root / rel, start, 30.0)
            parts.append(x)
            src.append((n, pkg))
            n += len(x)
    return np.concatenate(parts), src


def _init(bank, bank_src, tmp):
    global _bank, _bank_src, _tmp
    _bank, _bank_src, _tmp = bank, bank_src, tmp


def _synth(voice: str, word: str, rate: float, pitch: float) -> np.ndarray:
    engine, name = voice.split(":", 1)
    wav = os.path.join(_tmp, f"{os.getpid()}_{h64(voice, word, rate)}.wav")
    if engine == "espeak-ng":  # -w, not --stdout: the stdout header has a bogus length (DATA.md)
        cmd = ["espeak-ng", "-v", name, "-s", str(int(rate)), "-p", str(int(pitch)), "-w", wav, word]
    else:
        cmd = ["flite", "-voice", name, "--setf", f"duration_stretch={170.0 / rate:.3f}", "-t", word, "-o", wav]
    subprocess.run(cmd, check=True, capture_output=True)
    x, sr = sf.read(wav, dtype="float32")
    os.remove(wav)
    return to_mono_16k(x, sr)


def _trim(x: np.ndarray) -> np.ndarray:
    """Cut leading/trailing silence (10 ms frames more than 35 dB below the loudest)."""
    frame = SR // 100
    n = len(x) // frame
    e = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    on = np.flatnonzero(e > e.max() * 10 ** (-3.5))
    if len(on) == 0:
        return x
    return x[max(0, on[0] * frame - 320): min(len(x), (on[-1] + 1) * frame + 800)]


def _room(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exponentially decaying noise tail after a direct path: a crude but cheap room response."""
    rt60 = rng.uniform(0.15, 0.6)
    t = np.arange(int(rt60 * SR)) / SR
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    h = tail / np.sqrt((tail ** 2).sum()) * 10 ** (-rng.uniform(0, 10) / 20)  # direct-to-reverb 0-10 dB
    h[0] += 1.0
    n = len(x) + len(h)
    y = np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(h, n), n)[: len(x)]
    return y.astype(np.float32)


def make_clip(job) -> dict:
    voice, word, split, out_dir = job
    pv, rng = rng_for("kws-voice-params", voice), rng_for("kws-clip", voice, word)
    rate = float(np.clip(pv.uniform(130, 200) + rng.normal(0, 10), 110, 240))
    pitch = float(np.clip(pv.uniform(25, 75) + rng.normal(0, 6), 0, 99))
    x = _trim(_synth(voice, word, rate, pitch))
    if len(x) > 0.95 * SR:  # too slow for a 1 s clip: say it faster rather than cut the word
        x = _trim(_synth(voice, word, rate * len(x) / (0.9 * SR) + 5, pitch))
    x = x[:SR]
    clip = np.zeros(SR, np.float32)
    off = int(rng.integers(0, SR - len(x) + 1))
    clip[off: off + len(x)] = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.9)
    row = {"voice": voice, "noise": "", "snr_db": "", "rir": ""}
    if rng.random() < 0.5:
        clip = _room(clip, rng)
        row["rir"] = "1"
    if rng.random() < 0.5:
        start = int(rng.integers(0, len(_bank) - SR))
        noise = _bank[start: start + SR]
        p_noise = float((noise ** 2).mean())
        if p_noise > 1e-7:  # skip near-silent stretches of music: the gain would explode
            snr = rng.uniform(3, 25)
            p_speech = float((clip[off: off + len(x)] ** 2).mean())
            clip = clip + noise * np.sqrt(p_speech / p_noise / 10 ** (snr / 10))
            row.update(noise=[p for s, p in _bank_src if s <= start][-1], snr_db=f"{snr:.1f}")
    peak = np.abs(clip).max()
    if peak > 0.99:
        clip *= 0.99 / peak
    rel = f"audio/{word}/{slug(voice)}.flac"
    write_audio(out_dir / rel, clip)
    return {"path": rel, "label": word, "split": split, "source": voice.split(":")[0], **row}


def build(task_dir: Path, cfg: dict, cache: Path, workers: int) -> tuple[list[dict], list[str], list[str]]:
    """Returns (rows, extra columns, Debian packages used)."""
    debs.require_tool("espeak-ng", "espeak-ng")
    if cfg["kws_flite_voices"]:
        debs.require_tool("flite", "flite")
    voices = select_voices(cfg)
    split = rank_split(voices, 0.15, 0.15, salt="kws")
    bank, bank_src = noise_bank(cache)
    jobs = [(v, w, split[v], task_dir) for v in voices for w in WORDS]
    with tempfile.TemporaryDirectory(prefix="kws-") as tmp:
        rows = run_jobs(make_clip, jobs, workers, "kws", _init, (bank, bank_src, tmp))
    pkgs = sorted({r["source"] for r in rows} | {r["noise"] for r in rows if r["noise"]})
    return rows, list(EXTRA), pkgs

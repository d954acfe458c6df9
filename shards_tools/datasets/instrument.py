"""Instrument family (NSynth-like): single notes rendered from General MIDI SoundFonts.

Train and val come from one SoundFont and test from another, so a model must generalise across sample
sets rather than memorise one recording of each instrument.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from . import debs
from .common import SR, h64, run_jobs, write_audio

TRAIN_FONT = ("timgm6mb-soundfont", "usr/share/sounds/sf2/TimGM6mb.sf2")
TEST_FONT = ("musescore-general-soundfont-small", "usr/share/sounds/sf3/MuseScore_General_Lite.sf3")
HOLD_S, RELEASE_S = 1.5, 0.5
VELOCITIES = (40, 64, 88, 112, 127)
EXTRA = ("soundfont", "program", "pitch", "velocity")

# The 11 NSynth families as General MIDI program ranges (0-based); pads, effects and percussion that have
# no NSynth family are left out.
FAMILY_PROGRAMS = {
    "keyboard": [*range(0, 8)],
    "mallet": [*range(8, 15), 108, 112, 114],
    "organ": [*range(16, 21)],
    "guitar": [*range(24, 32), 104, 105, 106],
    "bass": [*range(32, 40)],
    "string": [*range(40, 47), *range(48, 52), 107, 110],
    "vocal": [52, 53, 54],
    "brass": [*range(56, 64)],
    "reed": [21, 22, 23, *range(64, 72), 109, 111],
    "flute": [*range(72, 80)],
    "synth_lead": [*range(80, 88)],
}
# Playable MIDI pitch range per family, roughly where each instrument sounds natural.
PITCHES = {
    "keyboard": (33, 96), "mallet": (55, 96), "organ": (36, 84), "guitar": (40, 84), "bass": (28, 60),
    "string": (40, 88), "vocal": (48, 80), "brass": (45, 81), "reed": (48, 84), "flute": (60, 96),
    "synth_lead": (45, 90),
}

_synths: dict = {}


def _render(font: Path, program: int, pitch: int, velocity: int) -> np.ndarray:
    import tinysoundfont  # optional dependency: only this task needs it

    if str(font) not in _synths:  # loading the sf3 decodes all its samples (~3 s): once per worker
        syn = tinysoundfont.Synth(samplerate=SR)
        _synths[str(font)] = (syn, syn.sfload(str(font)))
    syn, sfid = _synths[str(font)]
    syn.program_select(0, sfid, 0, program)
    syn.noteon(0, pitch, velocity)
    a = np.frombuffer(syn.generate(int(HOLD_S * SR)), dtype=np.float32)
    syn.noteoff(0, pitch)
    b = np.frombuffer(syn.generate(int(RELEASE_S * SR)), dtype=np.float32)
    syn.sounds_off(0)
    syn.generate(SR // 10)  # flush the cut-off voices so the next note starts clean
    return np.concatenate([a, b]).reshape(-1, 2).mean(axis=1)


def make_note(job) -> dict | None:
    pkg, font, family, program, pitch, velocity, split, task_dir = job
    x = _render(font, program, pitch, velocity)
    peak = float(np.abs(x).max())
    if peak < 1e-4:  # the preset has no sample for this key
        return None
    # Peak-normalise: MuseScore's piano is ~30x quieter than TimGM's, loudness must not give the font away.
    x = x / peak * 0.8
    rel = f"audio/{pkg}/{family}/p{program:03d}_n{pitch:03d}_v{velocity:03d}.flac"
    write_audio(task_dir / rel, x)
    return {"path": rel, "label": family, "split": split, "source": pkg, "soundfont": font.name,
            "program": program, "pitch": pitch, "velocity": velocity}


def _candidates(family: str, salt: str) -> list[tuple[int, int, int]]:
    lo, hi = PITCHES[family]
    notes = [(p, n, v) for p in FAMILY_PROGRAMS[family] for n in range(lo, hi + 1) for v in VELOCITIES]
    return sorted(notes, key=lambda note: (h64(salt, family, *note), note))


def build(task_dir: Path, cfg: dict, cache: Path, workers: int) -> tuple[list[dict], list[str], list[str]]:
    if importlib.util.find_spec("tinysoundfont") is None:
        raise debs.SourceError("Python package `tinysoundfont` not found: pip install --no-deps tinysoundfont "
                               "(its pyaudio dependency is not needed) or run scripts/setup.sh")
    n_train, n_val, n_test = cfg["inst_per_family"]
    fonts = {pkg: debs.fetch(pkg, cache) / rel for pkg, rel in (TRAIN_FONT, TEST_FONT)}
    jobs = []
    for family in FAMILY_PROGRAMS:
        # Over-draw a little: a few presets are silent on some keys and get dropped.
        train_font = _candidates(family, TRAIN_FONT[0])
        spare = 1 + (n_train + n_val) // 10
        picks = [("val", note) for note in train_font[:n_val]]
        picks += [("train", note) for note in train_font[n_val: n_val + n_train + spare]]
        for split, note in picks:
            jobs.append((TRAIN_FONT[0], fonts[TRAIN_FONT[0]], family, *note, split, task_dir))
        for note in _candidates(family, TEST_FONT[0])[: n_test + 1 + n_test // 10]:
            jobs.append((TEST_FONT[0], fonts[TEST_FONT[0]], family, *note, "test", task_dir))
    # Group by font so each worker loads a SoundFont once, not per note.
    jobs.sort(key=lambda j: (j[0], j[2], j[3], j[4], j[5]))
    rows = [r for r in run_jobs(make_note, jobs, workers, "instrument") if r is not None]
    rows = _trim_counts(rows, {"train": n_train, "val": n_val, "test": n_test}, task_dir)
    return rows, list(EXTRA), [TRAIN_FONT[0], TEST_FONT[0]]


def _trim_counts(rows: list[dict], want: dict, task_dir: Path) -> list[dict]:
    """Keep exactly the wanted count per family and split (spares beyond it are deleted)."""
    keep, seen = [], {}
    for r in sorted(rows, key=lambda r: (r["split"], r["label"], h64("inst-keep", r["path"]), r["path"])):
        k = (r["split"], r["label"])
        seen[k] = seen.get(k, 0) + 1
        if seen[k] <= want[r["split"]]:
            keep.append(r)
        else:
            (task_dir / r["path"]).unlink()
    return keep

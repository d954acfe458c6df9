"""Language ID (VoxForge-like) from real speech: Asterisk telephone prompts in five languages.

The prompt id (file path under the voice directory, without extension) names the same text in every
language, so splitting by prompt id keeps a sentence out of two splits. Caveat (DATA.md): en and es are
read by the same speaker, so a model can partly cheat with speaker identity.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from . import debs
from .common import h64, rank_split, run_jobs, slug, write_audio

LANGS = ("en", "es", "fr", "it", "ru")
GSM_SR = 8000
GSM_BYTES_PER_SECOND = 1650  # 33-byte frames every 20 ms
EXTRA = ("prompt", "speaker")


def _prompts(root: Path) -> dict[str, tuple[Path, str]]:
    """prompt id -> (gsm file, speaker directory), skipping the silence fillers."""
    base = root / "usr" / "share" / "asterisk" / "sounds"
    out = {}
    for speaker_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for f in sorted(speaker_dir.rglob("*.gsm")):
            pid = f.relative_to(speaker_dir).with_suffix("").as_posix()
            if not pid.startswith("silence/") and f.stat().st_size >= 0.25 * GSM_BYTES_PER_SECOND:
                out[pid] = (f, speaker_dir.name)
    return out


def decode_gsm(path: Path) -> np.ndarray:
    res = subprocess.run(["sox", "-q", str(path), "-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1",
                          "-r", str(GSM_SR), "-"], capture_output=True, check=True)
    return np.frombuffer(res.stdout, dtype="<i2").astype(np.float32) / 32768.0


def make_clip(job) -> dict:
    lang, pid, gsm, speaker, split, pkg, task_dir = job
    rel = f"audio/{lang}/{slug(pid.replace('/', '__'))}.flac"
    write_audio(task_dir / rel, decode_gsm(gsm), GSM_SR)  # kept at 8 kHz: the shard builder resamples
    return {"path": rel, "label": lang, "split": split, "source": pkg, "prompt": pid, "speaker": speaker}


def build(task_dir: Path, cfg: dict, cache: Path, workers: int) -> tuple[list[dict], list[str], list[str]]:
    debs.require_tool("sox", "sox")
    pkgs = {lang: f"asterisk-core-sounds-{lang}-gsm" for lang in LANGS}
    prompts = {lang: _prompts(debs.fetch(pkg, cache)) for lang, pkg in pkgs.items()}
    ids = set().union(*prompts.values())
    if cfg["langid_prompts"] is not None:
        # Small sizes: short prompts that exist in every language, so each split has all five labels.
        max_bytes = cfg["langid_max_seconds"] * GSM_BYTES_PER_SECOND
        ids = {i for i in ids if all(i in p and p[i][0].stat().st_size <= max_bytes for p in prompts.values())}
        ids = set(sorted(ids, key=lambda i: (h64("langid-pick", i), i))[: cfg["langid_prompts"]])
    split = rank_split(ids, 0.15, 0.15, salt="langid")
    jobs = [(lang, pid, *prompts[lang][pid], split[pid], pkgs[lang], task_dir)
            for lang in LANGS for pid in sorted(ids) if pid in prompts[lang]]
    rows = run_jobs(make_clip, jobs, workers, "langid")
    return rows, list(EXTRA), sorted(pkgs.values())

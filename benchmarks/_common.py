"""Helpers shared by the benchmark scripts: a work folder that cleans up after itself, deterministic test
audio, best-of timing, running the project's CLIs, and a plain-text table with PASS/BELOW verdicts.

Nothing here downloads anything: every input is synthesized or given by the user.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")

# One compute thread per process: every method gets exactly --workers processes, so a library that would
# otherwise spread one worker over all cores (torch, OpenMP, BLAS) does not borrow CPU the others lack.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class Workspace:
    """The benchmark's scratch folder: a fresh temp dir, or the user's --work dir. On cleanup a temp dir is
    removed whole; in a user's dir only what this run created goes, so --work never deletes anything else."""

    def __init__(self, work: str | None, keep: bool, prefix: str):
        self.keep = keep
        self.own = work is None
        self.root = Path(tempfile.mkdtemp(prefix=prefix) if work is None else work).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: list[Path] = []

    def path(self, name: str) -> Path:
        """A fresh sub-path (an old one of that name is removed first), removed again on cleanup."""
        p = self.root / name
        remove(p)
        self._made.append(p)
        return p

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        if self.keep:
            print(f"kept: {self.root}")
            return
        for p in ([self.root] if self.own else self._made):
            remove(p)


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def tone_noise(rng: np.random.Generator, seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    """float32 (frames, channels) in [-1, 1]: one to three tones with a vibrato and a fade, plus noise.
    Noise keeps FLAC from compressing the clip to nothing, so codec costs are realistic."""
    n = max(1, int(round(seconds * sr)))
    t = np.arange(n, dtype=np.float64) / sr
    x = np.zeros((n, channels))
    for c in range(channels):
        for _ in range(int(rng.integers(1, 4))):
            f0, depth, rate = rng.uniform(80, 0.4 * min(sr, 16000)), rng.uniform(0, 20), rng.uniform(0.5, 6)
            phase = 2 * np.pi * np.cumsum(f0 + depth * np.sin(2 * np.pi * rate * t)) / sr
            x[:, c] += rng.uniform(0.05, 0.3) * np.sin(phase)
        x[:, c] += rng.uniform(0.003, 0.05) * rng.standard_normal(n)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms ramps: no click at the edges
    return np.clip(x * fade[:, None], -1, 1).astype(np.float32)


def best_of(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Smallest wall-clock time of `repeat` calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def venv_bin(name: str) -> str:
    """A console script installed beside this interpreter (works without activating the venv)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not found beside {sys.executable} or on PATH")
    return found


def run(cmd: list[str], ok: tuple[int, ...] = (0,), env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; a failure raises with its stderr, so a broken method never passes for a fast one."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode not in ok:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)}: exit code {proc.returncode}\n{tail}")
    return proc


def build_supports_codec() -> bool:
    """`unfused-shards build --codec` exists (it was added while these benchmarks were written)."""
    return "--codec" in run([venv_bin("unfused-shards"), "build", "--help"]).stdout


def startup_seconds(cmd: list[str], repeat: int = 3) -> float:
    """Best wall clock of a command that only starts up (e.g. `--help`): the fixed cost in a CLI timing."""
    return best_of(lambda: run(cmd), repeat)[0]


class CpuWitness:
    """How much CPU processes other than this benchmark used while it ran (Linux: /proc/stat for the whole
    machine minus getrusage of this process and its waited-for descendants). On a shared machine another
    job's load silently halves a parallel figure; this line says whether the figures can be trusted."""

    def __enter__(self) -> CpuWitness:
        self.t0, self.machine0, self.ours0 = time.perf_counter(), _machine_cpu(), _our_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        machine = _machine_cpu()
        self.others = None if machine is None else max(0.0, machine - self.machine0 - (_our_cpu() - self.ours0))

    def line(self) -> str:
        if self.others is None:
            return "CPU used by other processes during the run: unknown (no /proc/stat)"
        share = self.others / (self.wall * (os.cpu_count() or 1))
        warn = "  WARNING: the machine was not idle, figures are unreliable; run again" if share > 0.05 else ""
        return (f"CPU used by other processes during the run: {self.others:.1f} CPU-s = {share:.0%} of the machine"
                f"{warn}")


def _machine_cpu() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (all states but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _our_cpu() -> float:
    """This process, its waited-for descendants, and its live descendants with theirs: a fork server's
    workers are reaped by the server, which lives (unreaped by us) until this process ends."""
    import resource

    reaped = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                 for f in ("ru_utime", "ru_stime"))
    return reaped + sum(_proc_cpu(stat) for stat in _live_descendants(os.getpid()))


def _live_descendants(root: int) -> list[list[str]]:
    """/proc/<pid>/stat fields (after the command name) of every live descendant of `root` (Linux)."""
    stats = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
    children: dict[int, list[int]] = {}
    for pid, f in stats.items():
        children.setdefault(int(f[1]), []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(stats[pid])
        todo.extend(children.get(pid, []))
    return out


def _proc_cpu(fields: list[str]) -> float:
    """utime + stime + cutime + cstime of one /proc stat line, in seconds."""
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "BELOW"


def ratio(value: float) -> str:
    """A ratio to two decimals, rounded down: 0.997 of a 1.0 target prints 0.99 (BELOW), not 1.00 (BELOW)."""
    return f"{math.floor(value * 100) / 100:.2f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])

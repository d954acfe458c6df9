"""k-means for pseudo-labels: the project's CPU k-means against scikit-learn's MiniBatchKMeans at HuBERT's settings.

Data: N points (default 1,000,000) x d (128) float32 from a seeded Gaussian mixture of C (1,000) components:
unequal weights (log-normal, normalised), means N(0, 1) * spread, a per-component scale (log-normal around
0.5) and a shared decaying per-dimension spectrum (dimension j scaled by (j + 1)^-1/2, RMS 1), so clusters
overlap, K < C forces components to merge and k-means has real local optima. Generated in chunks of 100,000
rows, each from its own seeded stream: the first N' rows are the same for every N >= N'.

1. Ours vs the baseline, both clustering the same N points into K (500) clusters with --threads threads:
   ours      the project's cpu backend (unfused_dist.cluster.kmeans): k-means++ (`init_centroids`) on an init
             sample of --init-points, then `lloyd` (--iterations, `faiss_search`) on a fit sample of
             --fit-points, then `faiss_search` assigning all N points. The three default to the project's
             own (pseudolabel.init_points 30,000, iterations 20, fit_points 200,000 = 400 points per centroid
             at K=500); the sweep (2.) shows what the fit sample size buys. Timed: sampling + init + fit +
             assigning every point.
   sklearn   sklearn.cluster.MiniBatchKMeans at HuBERT's settings (n_clusters=K, init="k-means++",
             batch_size=10000, n_init=20, max_iter=100, max_no_improvement=100, reassignment_ratio=0.0, tol=0.0,
             random_state=--seed, compute_labels=False). Timed: `fit` only (no predict, no labels).
   Quality: `objective(x_all, centroids)` of the project, the sum over ALL N points of the squared distance to
   the nearest centroid, computed by the same function for both (not timed).
   Targets: time sklearn / ours >= 5 and objective ours / sklearn <= 1.01.
2. Fit-sample sweep (--sweep): the objective over all N points vs the fit sample size (25k ... N), the same
   init and nested samples, with the time of fit + assignment of all points: where quality stops improving.
3. Scaling of ours (--max-n): N = 1e5, 1e6, 1e7, each in a fresh subprocess: time per point (sampling + init
   + fit + assigning all points) and peak memory per point. Peak = the child's high-water RSS (Linux VmHWM,
   reset after the imports; the child's ru_maxrss is printed too, but it includes the high-water mark the
   child inherits from the parent at exec). The points themselves are d x 4 bytes; the rest should be a small
   bounded overhead (memory is bounded by the points a rank holds).

Nothing is downloaded. Other processes' CPU use during each part is printed (the machine may be shared).

    .venv/bin/python benchmarks/kmeans.py [--n 1000000] [--fit-points 100000] [--no-sklearn] [--max-n 1e7]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _common import CpuWitness, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEN_CHUNK = 100_000  # rows per generation chunk (each chunk has its own seeded stream)
SKLEARN_SETTINGS = dict(init="k-means++", batch_size=10000, n_init=20, max_iter=100, max_no_improvement=100,
                        reassignment_ratio=0.0, tol=0.0, compute_labels=False)
SWEEP = (25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000)
SCALES = (100_000, 1_000_000, 10_000_000)


# ---- data -----------------------------------------------------------------------------------------

class Mixture:
    """The seeded mixture's parameters (small: C x d)."""

    def __init__(self, components: int, dim: int, seed: int, spread: float):
        rng = np.random.default_rng([seed, 0])
        self.spectrum = (np.arange(1, dim + 1) ** -0.5)
        self.spectrum = (self.spectrum / np.sqrt(np.mean(self.spectrum ** 2))).astype(np.float32)
        self.means = (rng.standard_normal((components, dim)) * spread * self.spectrum).astype(np.float32)
        w = rng.lognormal(0.0, 1.0, components)
        self.weights = w / w.sum()
        self.scales = (0.5 * rng.lognormal(0.0, 0.3, components)).astype(np.float32)
        self.seed = seed

    def fill(self, out: np.ndarray) -> None:
        """Write len(out) points into `out` (float32, n x d), chunk by chunk (bounded temporaries)."""
        for c, start in enumerate(range(0, len(out), GEN_CHUNK)):
            rng = np.random.default_rng([self.seed, 1, c])
            n = min(GEN_CHUNK, len(out) - start)
            comp = rng.choice(len(self.weights), size=n, p=self.weights)
            noise = rng.standard_normal((n, out.shape[1]), dtype=np.float32)
            noise *= self.scales[comp, None]
            noise *= self.spectrum
            noise += self.means[comp]
            out[start:start + n] = noise


def generate(n: int, args) -> np.ndarray:
    x = np.empty((n, args.dim), np.float32)
    Mixture(args.components, args.dim, args.seed, args.spread).fill(x)
    return x


def sample_indices(n: int, size: int, seed: int, stream: int) -> np.ndarray | None:
    """Sorted indices of a seeded sample of `size` of n rows (prefixes of one permutation: nested samples);
    None for all rows."""
    if size <= 0 or size >= n:
        return None
    return np.sort(np.random.default_rng([seed, stream]).permutation(n)[:size])


# ---- methods --------------------------------------------------------------------------------------

def set_threads(threads: int) -> None:
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # BLAS (numpy, scipy, faiss's OpenBLAS) and OpenMP (sklearn, faiss)


def ours_init(x: np.ndarray, args) -> np.ndarray:
    from unfused_dist.cluster.kmeans import init_centroids

    idx = sample_indices(len(x), args.init_points, args.seed, 2)
    return init_centroids(x if idx is None else x[idx], args.k, args.seed)


def ours_fit_assign(x: np.ndarray, init: np.ndarray, fit_points: int, args) -> tuple[np.ndarray, dict]:
    """Lloyd on the fit sample from `init`, then the nearest centroid of every point; (centroids, seconds)."""
    from unfused_dist.cluster.kmeans import faiss_search, lloyd

    t0 = time.perf_counter()
    idx = sample_indices(len(x), fit_points, args.seed, 3)
    fit = x if idx is None else x[idx]
    del idx
    t1 = time.perf_counter()
    result = lloyd(fit, init, args.iterations, faiss_search, "cpu", progress=False)
    del fit
    t2 = time.perf_counter()
    ids, _ = faiss_search(x, result.centroids)
    t3 = time.perf_counter()
    assert len(ids) == len(x)
    return result.centroids, {"sample": t1 - t0, "fit": t2 - t1, "assign": t3 - t2, "repaired": result.repaired}


def ours(x: np.ndarray, args) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    init = ours_init(x, args)
    t_init = time.perf_counter() - t0
    centroids, t = ours_fit_assign(x, init, args.fit_points, args)
    t["init"] = t_init
    t["total"] = time.perf_counter() - t0
    return centroids, t


def sklearn_fit(x: np.ndarray, args) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=args.k, random_state=args.seed, **SKLEARN_SETTINGS)
    t0 = time.perf_counter()
    km.fit(x)
    t = time.perf_counter() - t0
    return km.cluster_centers_.astype(np.float32), {"total": t, "n_steps": int(km.n_steps_),
                                                    "n_iter": int(km.n_iter_)}


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    from unfused_dist.cluster.kmeans import objective as project_objective

    return project_objective(x, centroids)


# ---- parts ----------------------------------------------------------------------------------------

def compare(x: np.ndarray, args) -> None:
    n = len(x)
    fit_n = n if args.fit_points <= 0 or args.fit_points >= n else args.fit_points
    with CpuWitness() as witness:
        c_ours, t_ours = ours(x, args)
        obj_ours = objective(x, c_ours)
        print(f"ours: {t_ours['total']:.1f} s (sampling {t_ours['sample']:.2f} s, k-means++ init on "
              f"{min(args.init_points, n):,} points {t_ours['init']:.1f} s, {args.iterations} Lloyd iterations on "
              f"{fit_n:,} points {t_ours['fit']:.1f} s, assigning all {n:,} points {t_ours['assign']:.1f} s; "
              f"{t_ours['repaired']} empty clusters repaired)", flush=True)
        if args.sklearn:
            c_sk, t_sk = sklearn_fit(x, args)
            obj_sk = objective(x, c_sk)
            print(f"sklearn MiniBatchKMeans fit: {t_sk['total']:.1f} s ({t_sk['n_steps']:,} mini-batch steps, "
                  f"{t_sk['n_iter']} passes)", flush=True)
    rows = [["ours: init + Lloyd on fit sample + assign all", f"{t_ours['total']:.1f}", f"{obj_ours:.6e}",
             f"{obj_ours / n:.4f}"]]
    if args.sklearn:
        rows.append(["sklearn MiniBatchKMeans (HuBERT settings): fit only", f"{t_sk['total']:.1f}", f"{obj_sk:.6e}",
                     f"{obj_sk / n:.4f}"])
    print()
    print(table(["method", "s", "objective (all N)", "per point"], rows))
    if args.sklearn:
        speed, quality = t_sk["total"] / t_ours["total"], obj_ours / obj_sk
        print(f"\ntime sklearn / ours: {speed:.2f}x (target >= 5): {'PASS' if speed >= 5 else 'BELOW'}")
        print(f"objective ours / sklearn: {quality:.4f} (target <= 1.01): {'PASS' if quality <= 1.01 else 'BELOW'}")
    print(witness.line(), flush=True)


def sweep(x: np.ndarray, args) -> None:
    n = len(x)
    sizes = sorted({min(s, n) for s in SWEEP if s <= n} | {n})
    print(f"\nfit-sample sweep: N={n:,}, the same k-means++ init ({min(args.init_points, n):,} points), "
          f"{args.iterations} Lloyd iterations, nested samples; time = fit + assigning all N", flush=True)
    with CpuWitness() as witness:
        t0 = time.perf_counter()
        init = ours_init(x, args)
        t_init = time.perf_counter() - t0
        rows, best = [], None
        results = []
        for size in sizes:
            centroids, t = ours_fit_assign(x, init, size, args)
            obj = objective(x, centroids)
            results.append((size, t, obj))
            best = obj if best is None else min(best, obj)
        for size, t, obj in results:
            rows.append([f"{size:,}", f"{t['fit']:.1f}", f"{t['assign']:.1f}", f"{t_init + sum(t[k] for k in ('sample', 'fit', 'assign')):.1f}",
                         f"{obj:.6e}", f"{obj / best:.4f}"])
    print(table(["fit points", "fit s", "assign s", "total s (with init)", "objective (all N)", "/ best"], rows))
    print(f"(init {t_init:.1f} s is included in every total)")
    print(witness.line(), flush=True)


def scaling(args) -> None:
    ns = [n for n in SCALES if n <= args.max_n]
    if not ns:
        return
    print(f"\nscaling of ours (fresh process per N; fit sample min({args.fit_points:,}, N), init sample "
          f"{args.init_points:,}, {args.iterations} iterations, {args.threads} threads)", flush=True)
    rows = []
    with CpuWitness() as witness:
        for n in ns:
            cmd = [sys.executable, __file__, "--_child", str(n), *_child_args(args)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"N={n:,}: child failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([f"{n:,}", f"{r['gen']:.1f}", f"{r['total']:.1f}", f"{r['total'] / n * 1e6:.2f}",
                         f"{r['objective'] / n:.4f}", f"{r['base'] / 2**20:,.0f}", f"{r['peak'] / 2**20:,.0f}",
                         f"{(r['peak'] - r['base']) / n:.0f}", f"{(r['peak'] - r['after_gen']) / n:.1f}",
                         f"{r['ru_maxrss'] / 2**20:,.0f}"])
            print(f"  N={n:,} done: {r['total']:.1f} s (init {r['init']:.1f}, fit {r['fit']:.1f}, assign "
                  f"{r['assign']:.1f})", flush=True)
            if not r["hwm_reset"]:
                print("  (could not reset VmHWM after the imports: the peak includes the imports' transient peak)")
    print(table(["N", "generate s", "ours s", "us/point", "objective/N", "RSS after imports MiB", "peak MiB",
                 "(peak - imports) B/point", "k-means over data B/point", "ru_maxrss MiB"], rows))
    print(f"(the points themselves: {args.dim * 4} B/point. peak = VmHWM of the child (its own high-water RSS, reset "
          "after the imports); 'k-means over data' = peak - the high-water mark after generating the points, i.e. what "
          "sampling + init + fit + assigning all points add. ru_maxrss of a child also holds the high-water mark it "
          "inherits from its parent at exec, so it is shown only for reference)")
    print(witness.line(), flush=True)


def _child_args(args) -> list[str]:
    return ["--dim", str(args.dim), "--k", str(args.k), "--components", str(args.components), "--iterations",
            str(args.iterations), "--init-points", str(args.init_points), "--fit-points", str(args.fit_points),
            "--seed", str(args.seed), "--threads", str(args.threads), "--spread", str(args.spread)]


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(n: int, args) -> int:
    """One scaling point in a fresh process: prints one JSON line.

    Peak memory is the kernel's high-water RSS of this process. ru_maxrss alone cannot be used here: a child
    started by exec inherits its parent's high-water mark (the parent held the 1e6 points), so the peak is read
    from /proc/self/status VmHWM (the same counter for this process's own memory), reset after the imports
    (clear_refs 5) so that the peak is what generation and k-means add; ru_maxrss is reported beside it."""
    set_threads(args.threads)
    import faiss  # noqa: F401  (imports counted in the baseline)
    import sklearn.cluster  # noqa: F401
    import unfused_dist.cluster.kmeans  # noqa: F401
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    base = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    x = generate(n, args)
    gen = time.perf_counter() - t0
    after_gen = _proc_status()["VmHWM"]
    centroids, t = ours(x, args)
    peak = _proc_status()["VmHWM"]
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    obj = objective(x, centroids)
    print(json.dumps({"n": n, "gen": gen, "total": t["total"], "base": base, "after_gen": after_gen, "peak": peak,
                      "ru_maxrss": ru_maxrss, "hwm_reset": reset, "objective": obj,
                      **{k: t[k] for k in ("init", "fit", "assign")}}))
    return 0


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="points (default 1,000,000)")
    p.add_argument("--dim", type=int, default=128, help="dimensions (default 128)")
    p.add_argument("--k", type=int, default=500, help="clusters (default 500)")
    p.add_argument("--components", type=int, default=1000, help="mixture components (default 1000)")
    p.add_argument("--spread", type=float, default=1.0, help="scale of the component means (default 1.0)")
    from unfused_dist.config import PseudoLabelConfig
    project = PseudoLabelConfig()  # ours runs at the project's defaults unless told otherwise
    p.add_argument("--iterations", type=int, default=project.iterations,
                   help=f"Lloyd iterations of ours (default pseudolabel.iterations: {project.iterations})")
    p.add_argument("--init-points", type=int, default=project.init_points,
                   help=f"k-means++ init sample of ours (default pseudolabel.init_points: {project.init_points:,})")
    p.add_argument("--fit-points", type=int, default=project.fit_points,
                   help=f"Lloyd fit sample of ours, 0 = all points (default pseudolabel.fit_points: "
                        f"{project.fit_points:,})")
    p.add_argument("--sklearn", action=argparse.BooleanOptionalAction, default=True,
                   help="run the MiniBatchKMeans baseline (default on; ~1.5-2 min at 1e6 points on 2 cores)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="fit-sample sweep (default on)")
    p.add_argument("--max-n", type=float, default=1e7,
                   help="largest N of the scaling curve (1e5, 1e6, 1e7 up to this; 0 = none; default 1e7, "
                        "which needs ~5.5 GB of RAM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the samples, the inits (default 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help=f"threads of FAISS, BLAS, OpenMP, torch for both methods (default all cores: {os.cpu_count()})")
    p.add_argument("--_child", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        return child(args._child, args)
    set_threads(args.threads)
    fit_desc = "all" if args.fit_points <= 0 or args.fit_points >= args.n else f"{args.fit_points:,}"
    print(f"k-means benchmark: N={args.n:,} x {args.dim} float32, K={args.k}, mixture of {args.components} "
          f"components (spread {args.spread:g}, seed {args.seed}); threads {args.threads} for both methods "
          f"(FAISS, BLAS, OpenMP, torch) on {os.cpu_count()} CPU cores")
    print(f"ours: k-means++ on {args.init_points:,} points, {args.iterations} Lloyd iterations on {fit_desc} "
          "points (faiss-cpu), then assign all points; timed end to end")
    print("sklearn: MiniBatchKMeans(" + ", ".join(f"{k}={v!r}" for k, v in SKLEARN_SETTINGS.items())
          + f", random_state={args.seed}); timed: fit only")
    t0 = time.perf_counter()
    x = generate(args.n, args)
    print(f"generated {args.n:,} points in {time.perf_counter() - t0:.1f} s ({x.nbytes / 2**20:,.0f} MiB)\n",
          flush=True)
    compare(x, args)
    if args.sweep:
        sweep(x, args)
    del x
    scaling(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""k-means for pseudo-labels: one Lloyd loop, three backends.

    cpu          nearest-centroid search with FAISS (IndexFlatL2) on this process's points
    gpu          the same search on the node's GPUs (FAISS GPU, all or the first N), or a torch matrix
                 product on the GPU when faiss-gpu is not installed (and it says so)
    distributed  every rank keeps its own points and searches them on its device; per-iteration centroid
                 sums, counts and the objective are all-reduced, so data is spread over nodes, never gathered

All backends run the same iteration, so they agree: assign every point to its nearest centroid (the
objective is the sum of those squared distances), move each centroid to the mean of its points, and repair
empty clusters deterministically by splitting the largest one (as FAISS does). Initialisation is seeded:
k-means++ on an explicit sample, or k points sampled. FAISS's own `Kmeans` is not used for training because
it silently subsamples to `max_points_per_centroid` x k points; here the caller chooses the fit sample and
`max_points_per_centroid` is an explicit cap that is logged.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..engine.device import rank_device
from ..errors import UnfusedError
from ..log import logger

BACKENDS = ("cpu", "gpu", "distributed")
_SEARCH_CHUNK = 65536  # rows per search call: bounds the (chunk x k) distance matrix


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (K, d) float32
    objective: list[float] = field(default_factory=list)  # per iteration: sum of squared distances (all ranks)
    points_used: int = 0  # over all ranks
    backend: str = ""
    repaired: int = 0  # empty clusters repaired, over all iterations


# ---- nearest-centroid search ----------------------------------------------------------------------

def import_faiss():
    """The installed faiss build (faiss-cpu or faiss-gpu-cu12: both install `faiss`), or a one-line error."""
    try:
        import faiss
    except ImportError:
        raise UnfusedError("faiss is not installed: pip install -e '.[cpu]' (faiss-cpu), or '.[gpu]' "
                           "(faiss-gpu-cu12, CUDA 12) on GPU nodes; pseudolabel.backend=gpu also runs without "
                           "it, on torch") from None
    return faiss


def faiss_search(x: np.ndarray, centroids: np.ndarray, gpus: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, squared distances float32) of each row's nearest centroid. gpus: 0 = CPU, -1 = all."""
    faiss = import_faiss()

    index = faiss.IndexFlatL2(centroids.shape[1])
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=gpus if gpus > 0 else -1)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ids, dist = [], []
    for start in range(0, len(x), _SEARCH_CHUNK):
        d, i = index.search(np.ascontiguousarray(x[start:start + _SEARCH_CHUNK], dtype=np.float32), 1)
        if (i < 0).any():  # FAISS's answer for a NaN row: it must never be written as cluster -1
            row = start + int(np.flatnonzero(i[:, 0] < 0)[0])
            raise UnfusedError(f"k-means: point {row} has no nearest centroid (a NaN or inf in the points or the "
                               "centroids); re-run the pseudolabel stage, and check the teacher if it recurs")
        ids.append(i[:, 0])
        dist.append(d[:, 0])
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(dist)


def nearest(xb: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of each row's nearest centroid, as a matrix product on their device."""
    c_sq = (c * c).sum(1) if c_sq is None else c_sq
    d = (xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq
    best, idx = d.min(1)
    return idx, best


def torch_search(x: np.ndarray, centroids: np.ndarray, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """The same search as a matrix product on a torch device (the GPU fallback; also runs on the CPU)."""
    c = torch.as_tensor(centroids, dtype=torch.float32, device=device)
    c_sq = (c * c).sum(1)
    ids, dist = [], []
    for start in range(0, len(x), _SEARCH_CHUNK):
        xb = torch.as_tensor(np.ascontiguousarray(x[start:start + _SEARCH_CHUNK]), dtype=torch.float32,
                             device=device)
        idx, best = nearest(xb, c, c_sq)
        ids.append(idx.cpu().numpy())
        dist.append(best.clamp_min(0).cpu().numpy())
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(dist)


def gpu_search_fn(gpus: int) -> tuple[Callable, str]:
    """FAISS GPU if this faiss build has it, else torch on this rank's GPU; returns (search, description)."""
    try:
        import faiss
    except ImportError:  # no faiss at all: the torch search needs none
        faiss = None
    if faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        n = faiss.get_num_gpus() if gpus <= 0 else min(gpus, faiss.get_num_gpus())
        return (lambda x, c: faiss_search(x, c, gpus=n)), f"faiss-gpu x{n}"
    if rank_device().type != "cuda":
        raise UnfusedError("pseudolabel.backend=gpu but neither faiss-gpu nor a CUDA device (run.device) is "
                           "available; use backend cpu or distributed")
    logger("kmeans").warning("faiss-gpu is not installed: using the torch GPU implementation (one GPU)")
    return (lambda x, c: torch_search(x, c, rank_device())), "torch-gpu"


def search_fn(backend: str, gpus: int = 0) -> tuple[Callable, str]:
    if backend == "gpu":
        return gpu_search_fn(gpus)
    if backend == "distributed" and rank_device().type == "cuda":  # each rank searches on its own GPU
        return (lambda x, c: torch_search(x, c, rank_device())), "distributed (torch-gpu)"
    if backend in ("cpu", "distributed"):
        return faiss_search, "faiss-cpu" if backend == "cpu" else "distributed (faiss-cpu)"
    raise ValueError(f"pseudolabel.backend '{backend}' is not one of {', '.join(BACKENDS)}")


# ---- initialisation -------------------------------------------------------------------------------

def init_centroids(sample: np.ndarray, k: int, seed: int, method: str = "kmeans++") -> np.ndarray:
    """Seeded initial centroids from `sample` (the caller picks and logs its size)."""
    if len(sample) < k:
        raise ValueError(f"k-means needs at least k={k} points to initialise, got {len(sample)}; "
                         "lower pseudolabel.k or raise pseudolabel.init_points")
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if method == "sampled":
        return sample[np.random.default_rng(seed).choice(len(sample), k, replace=False)].copy()
    if method != "kmeans++":
        raise ValueError(f"pseudolabel.init '{method}' is not one of kmeans++, sampled")
    from sklearn.cluster import kmeans_plusplus

    centroids, _ = kmeans_plusplus(sample, k, random_state=seed)
    return centroids.astype(np.float32)


# ---- Lloyd ----------------------------------------------------------------------------------------

def lloyd(x: np.ndarray, init: np.ndarray, iterations: int, search: Callable, backend: str = "",
          all_reduce: Callable[[np.ndarray], np.ndarray] | None = None, progress: bool = True,
          on_iteration: Callable[[int, float], None] | None = None) -> KMeansResult:
    """`iterations` Lloyd steps from `init` over this process's points `x`. With `all_reduce` (a sum over
    ranks), x is one rank's share and every rank ends with the same centroids. `on_iteration(i, objective)`
    after each step (e.g. the k-means metrics)."""
    reduce = all_reduce or (lambda a: a)
    c = np.array(init, dtype=np.float32)
    k, d = c.shape
    result = KMeansResult(c, points_used=int(reduce(np.array([len(x)], np.float64))[0]), backend=backend)
    bar = tqdm(range(iterations), desc=f"k-means K={k} ({backend})", unit="it", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for it in bar:
        ids, dist = search(x, c)
        sums, counts = _cluster_sums(x, ids, k)
        # one buffer, one collective: sums, counts and the objective travel together
        packed = reduce(np.concatenate([sums.ravel(), counts, [float(dist.sum(dtype=np.float64))]]))
        sums, counts, objective = packed[:k * d].reshape(k, d), packed[k * d:-1], float(packed[-1])
        result.objective.append(objective)
        if on_iteration is not None:
            on_iteration(it + 1, objective)
        nonempty = counts > 0
        c[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        result.repaired += repair_empty(c, counts)
        bar.set_postfix(objective=f"{objective:.4g}", refresh=False)
    result.centroids = c
    return result


def _cluster_sums(x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums in float64 (so the order of addition, e.g. over ranks, hardly matters) and counts,
    as a sparse one-hot product, chunked so memory stays at one chunk of float64 rows."""
    from scipy.sparse import csr_matrix

    sums = np.zeros((k, x.shape[1]), np.float64)
    for start in range(0, len(x), _SEARCH_CHUNK):
        part = ids[start:start + _SEARCH_CHUNK]
        onehot = csr_matrix((np.ones(len(part)), (part, np.arange(len(part)))), shape=(k, len(part)))
        sums += onehot @ np.asarray(x[start:start + _SEARCH_CHUNK], dtype=np.float64)
    return sums, np.bincount(ids, minlength=k).astype(np.float64)


def repair_empty(c: np.ndarray, counts: np.ndarray, eps: float = 1 / 1024) -> int:
    """Give each empty cluster half of the currently largest one: both centroids move apart by a relative
    eps (FAISS's rule), and the next iteration divides its points. Deterministic: every rank repairs alike."""
    counts = counts.astype(np.float64).copy()
    empty = np.flatnonzero(counts == 0)
    for j in empty:
        big = int(np.argmax(counts))
        c[j] = c[big] * (1 + eps)
        c[big] = c[big] * (1 - eps)
        counts[j] = counts[big] = counts[big] / 2
    return len(empty)


def objective(x: np.ndarray, centroids: np.ndarray, search: Callable = faiss_search) -> float:
    """Sum of squared distances of every row to its nearest centroid (the same measure for every method)."""
    return float(search(x, centroids)[1].sum(dtype=np.float64))

"""FAISS k-means with explicit sampling (FAISS otherwise subsamples silently) and nearest-centroid labels."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (K, d) float32
    objective: list[float]  # per iteration (sum of squared distances over the training points)
    points_used: int
    backend: str


def fit_kmeans(x: np.ndarray, k: int, iterations: int, seed: int, max_points_per_centroid: int) -> KMeansResult:
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}; lower pseudolabel.k")
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(x)
    used = min(len(x), k * max_points_per_centroid)
    return KMeansResult(centroids=km.centroids.copy(), objective=[float(v) for v in km.obj], points_used=used,
                        backend="faiss-cpu")


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid id and squared distance for every row."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), dist[:, 0]

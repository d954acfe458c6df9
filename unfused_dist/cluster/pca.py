"""PCA-whitening (eigen power -0.5) followed by row L2-normalisation, as pure numpy functions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Whitening:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (D, d): top-d eigenvectors as columns
    scale: np.ndarray  # (d,): eigenvalue ** -0.5

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = ((x - self.mean) @ self.components) * self.scale
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def save(self, path) -> None:
        np.savez(path, mean=self.mean, components=self.components, scale=self.scale)

    @classmethod
    def load(cls, path) -> "Whitening":
        with np.load(path) as z:  # plain arrays: no pickle allowed
            return cls(mean=z["mean"], components=z["components"], scale=z["scale"])


def fit_whitening(x: np.ndarray, dim: int, eps: float = 1e-6) -> Whitening:
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:min(dim, x.shape[1])]
    return Whitening(mean=mean.astype(np.float32), components=eigvec[:, order].astype(np.float32),
                     scale=(np.maximum(eigval[order], 0) + eps) ** -0.5)

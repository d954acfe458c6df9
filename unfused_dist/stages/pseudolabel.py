"""Stage 2: the frozen teacher embeds the target training split; PCA-whitening + L2 + k-means give each
clip a pseudo-label, written as label shards aligned key by key with the audio shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from ..artefacts import atomic_write_text, mark_done, reset
from ..cluster.kmeans import assign, fit_kmeans
from ..cluster.labels import write_label_shards
from ..cluster.pca import fit_whitening
from ..config import Config
from ..data.loader import ShardSource
from ..engine.export import load_encoder, sha256_of
from .common import Features, embed_split, split_dir


def labels_dir(cfg: Config) -> Path:
    """labels/<RUN>/ inside the target's training split, as the data contract says."""
    return split_dir(cfg, "train") / "labels" / cfg.run.path.name


def run(cfg: Config) -> None:
    out = cfg.run.path / "pseudolabel"
    reset(out)
    c = cfg.pseudolabel
    teacher, meta = load_encoder(cfg.run.path / "pretrain")
    features = Features(cfg.audio, meta["norm_mean"], meta["norm_std"])
    source = ShardSource(split_dir(cfg, "train"))
    pooling = {"final": "embedding", "block1": "block1"}.get(c.layer)
    if pooling is None:
        raise ValueError(f"pseudolabel.layer '{c.layer}' is not one of final, block1")
    keys, emb, true = embed_split(teacher, features, source, cfg, pooling, desc="pseudolabel: embed")
    np.save(out / "embeddings.npy", emb.astype(np.float16))

    whitening = fit_whitening(emb, c.pca_dim)
    whitening.save(out / "pca.npz")
    x = whitening.apply(emb)
    km = fit_kmeans(x, c.k, c.iterations, cfg.run.seed, c.max_points_per_centroid)
    np.save(out / "centroids.npy", km.centroids)
    ids, dist = assign(x, km.centroids)
    ldir = labels_dir(cfg)
    write_label_shards(source.split_dir, ldir, keys, ids, dist)

    sizes = np.bincount(ids, minlength=c.k).tolist()
    report = {"k": c.k, "layer": c.layer, "points": len(x), "points_used_for_centroids": km.points_used,
              "backend": km.backend, "objective": km.objective, "cluster_sizes": sizes,
              "teacher_sha256": meta["sha256"], "labels_dir": str(ldir),
              "pca_sha256": sha256_of(out / "pca.npz"), "centroids_sha256": sha256_of(out / "centroids.npy"),
              "nmi_vs_true_labels": float(normalized_mutual_info_score(true, ids)) if (true >= 0).all() else None,
              "purity": _purity(true, ids) if (true >= 0).all() else None}
    atomic_write_text(ldir / "meta.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    print(f"[pseudolabel] {len(x)} clips -> K={c.k} ({km.backend}), objective {km.objective[-1]:.2f}, "
          f"NMI vs true labels {report['nmi_vs_true_labels']}, purity {report['purity']}")
    mark_done(out, {"labels_dir": str(ldir)})


def _purity(true: np.ndarray, ids: np.ndarray) -> float:
    total = 0
    for c in np.unique(ids):
        total += np.bincount(true[ids == c]).max()
    return float(total / len(ids))

"""Stage 2: the frozen teacher embeds the target training split; PCA-whitening + L2 + k-means give each
clip a pseudo-label, written as label shards aligned key by key with the audio shards.

Runs as one process or as several ranks (torchrun / SLURM): every step that touches all clips is split by
shard (rank r takes shards r, r + world, ...):
1. embed: each rank dumps its shards' embeddings (cluster/dump.py; finished shards are never redone);
2-3. fit: PCA-whitening on `pca_points` sampled clips, k-means initialised on `init_points` (rank 0,
   broadcast), Lloyd on `fit_points` sampled clips: on rank 0 (backends cpu, gpu), or on every rank over the
   sampled clips of its own shards with sums all-reduced (distributed);
4. assign: each rank labels every clip of its shards and writes their label shards;
5. finish: one process writes labels/<RUN>/meta.json, the report and a cluster-size plot, then done.json.
On SLURM, embed and assign run as job arrays over parts of the shards (embed/assign take part, parts).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..artefacts import atomic_write_text, mark_done, reset
from ..cluster import dump
from ..cluster.kmeans import init_centroids, lloyd, search_fn
from ..cluster.labels import write_label_shard
from ..cluster.pca import Whitening, fit_whitening
from ..config import Config
from ..data.source import ShardSource
from ..data.transforms import WithShard, eval_transform
from ..engine.distributed import all_reduce_sum, barrier, broadcast_object, init_distributed, is_main
from ..engine.device import place, rank_device, to_device
from ..engine.export import load_encoder, sha256_of
from ..errors import UnfusedError
from ..metrics.exporter import stage_metrics
from ..run_layout import RunLayout
from .common import Features, split_dir
from ..log import logger

log = logger("pseudolabel")


def labels_dir(cfg: Config) -> Path:
    """Where this run's label shards go (RunLayout.labels: inside the target's training split)."""
    return RunLayout.of(cfg).labels(split_dir(cfg, "train"))


def shards_digest(source: ShardSource) -> str:
    """One checksum over the audio shards' own (from the manifest): the labels were made for exactly these."""
    return hashlib.sha256("\n".join(s.sha256 for s in source.manifest.shards).encode()).hexdigest()[:16]


def check_k(cfg: Config, source: ShardSource) -> None:
    """K clusters need at least K clips: checked before hours of embedding, not after."""
    k, clips = cfg.pseudolabel.k, source.manifest.num_samples
    if k > clips:
        raise UnfusedError(f"{source.split_dir}: pseudolabel.k={k} is more than the {clips} clips of this split; "
                           f"lower pseudolabel.k to at most {clips}")


def my_shards(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


def embed(cfg: Config, part: int | None = None, parts: int | None = None) -> int:
    """Step 1 alone (also what a SLURM array task runs): dump the embeddings of shards part, part + parts, ...
    (default: this rank's). Returns the number of shards embedded now."""
    rank, world = init_distributed(cfg.run.device)
    part, parts = (rank, world) if part is None else (part, parts)
    c = cfg.pseudolabel
    source = ShardSource(split_dir(cfg, "train"))
    check_k(cfg, source)
    teacher, meta = load_encoder(RunLayout.of(cfg).stage("pretrain"))
    device = rank_device()  # the GPU this rank's job holds, when it has one
    place(teacher, device).eval()
    features = place(Features(cfg.audio, meta["norm_mean"], meta["norm_std"]), device)
    directory = RunLayout.of(cfg).embeddings
    # every array task prepares (parts != world: each is a process group of its own); prepare is safe to
    # run concurrently. Which audio shards the embeddings came from is checked per shard (dump.is_dumped).
    if is_main() or parts != world:
        dump.prepare(directory, {"teacher_sha256": meta["sha256"], "layer": c.layer,
                                 "task_seconds": cfg.data.task_seconds})
    barrier()
    transform = WithShard(eval_transform(cfg.audio, cfg.data.task_seconds))

    def embed_batch(wave):
        out = teacher(features(to_device(wave, device)))
        return out.embedding if c.layer == "final" else out.blocks[0]

    return dump.dump(embed_batch, source, my_shards(len(source.counts), part, parts), directory, transform,
                     cfg.data.num_workers, cfg.data.eval_batch_size, progress=is_main(),
                     desc=f"pseudolabel: embed (part {part + 1}/{parts})")


def run(cfg: Config) -> None:
    """The whole stage, in every rank of this process group."""
    if is_main():
        reset(RunLayout.of(cfg).stage("pseudolabel"))  # keeps embeddings/: the dump validates itself shard by shard
    barrier()
    embed(cfg)
    barrier()
    fit(cfg)
    barrier()
    assign(cfg)
    barrier()
    if is_main():
        finish(cfg)


def fit(cfg: Config) -> None:
    """Steps 2-3 over a finished dump: PCA-whitening and initial centroids on rank 0, Lloyd on rank 0 (cpu,
    gpu) or on every rank (distributed); writes pca.npz and centroids.npy (+ fit.json)."""
    rank, world = init_distributed(cfg.run.device)
    c, out = cfg.pseudolabel, RunLayout.of(cfg).stage("pseudolabel")
    source = ShardSource(split_dir(cfg, "train"))
    store = dump.EmbeddingStore(out / "embeddings", source)
    if is_main():
        pca_sample = store.sample(c.pca_points, cfg.run.seed)
        whitening = fit_whitening(pca_sample, c.pca_dim)
        whitening.save(out / "pca.npz")
        init = init_centroids(whitening.apply(store.sample(c.init_points, cfg.run.seed + 1)), c.k, cfg.run.seed,
                              c.init)
        log.info(f"{store.total} clips; PCA-whitening to {c.pca_dim} dims fitted on {len(pca_sample)} clips; "
                 f"{c.init} init on {min(c.init_points, store.total)} clips")
    whitening, init = broadcast_object((whitening, init) if is_main() else None)
    fit_n = min(c.fit_points or store.total, c.k * c.max_points_per_centroid, store.total)
    search, backend = search_fn(c.backend, c.gpus)
    with stage_metrics(cfg, "pseudolabel") as metrics:
        if c.backend == "distributed":
            mine = my_shards(len(source.counts), rank, world)
            km = lloyd(whitening.apply(store.sample(fit_n, cfg.run.seed + 2, shards=mine)), init, c.iterations,
                       search, backend, all_reduce=all_reduce_sum, progress=is_main(), on_iteration=metrics.kmeans)
        else:
            km = lloyd(whitening.apply(store.sample(fit_n, cfg.run.seed + 2)), init, c.iterations, search, backend,
                       progress=is_main(), on_iteration=metrics.kmeans) if is_main() else None
            km = broadcast_object(km)
    if is_main():
        np.save(out / "centroids.npy", km.centroids)
        atomic_write_text(out / "fit.json", json.dumps({"backend": km.backend, "objective": km.objective,
                                                        "repaired": km.repaired, "fit_points": int(fit_n),
                                                        "points": store.total}))


def assign(cfg: Config, part: int | None = None, parts: int | None = None) -> None:
    """Step 4: every clip of shards part, part + parts, ... (default: this rank's) gets its nearest centroid;
    writes their label shards and, per shard, the cluster ids (for the report)."""
    rank, world = init_distributed(cfg.run.device)
    part, parts = (rank, world) if part is None else (part, parts)
    c, out = cfg.pseudolabel, RunLayout.of(cfg).stage("pseudolabel")
    source = ShardSource(split_dir(cfg, "train"))
    store = dump.EmbeddingStore(out / "embeddings", source)
    whitening = Whitening.load(out / "pca.npz")
    centroids = np.load(out / "centroids.npy")
    search, _ = search_fn(c.backend, c.gpus)
    ldir = labels_dir(cfg)
    for i in my_shards(len(source.counts), part, parts):
        info = store.info(i)
        ids, dist = search(whitening.apply(store.rows(i)), centroids)
        write_label_shard(source.manifest.shards[i], ldir, info["keys"], ids, dist)
        (out / "assigned").mkdir(exist_ok=True)
        np.save(out / "assigned" / f"{store.names[i]}.npy", ids)  # outside embeddings/: redone with every fit


def finish(cfg: Config) -> None:
    """Step 5 (one process): checks every shard was labelled, writes meta.json, the report, the plot, done."""
    out = RunLayout.of(cfg).stage("pseudolabel")
    source = ShardSource(split_dir(cfg, "train"))
    store = dump.EmbeddingStore(out / "embeddings", source)
    parts = []
    for i, name in enumerate(store.names):
        path = out / "assigned" / f"{name}.npy"
        if not path.exists():
            raise UnfusedError(f"{path}: shard {name} has no pseudo-labels; run the assignment for every part")
        parts.append((np.load(path), np.asarray(store.info(i)["labels"])))
    ids = np.concatenate([a for a, _ in parts])
    true = np.concatenate([t for _, t in parts])
    ldir = labels_dir(cfg)
    _report(cfg, out, ldir, json.loads((out / "fit.json").read_text()), ids, true)
    mark_done(out, {"labels_dir": str(ldir)})


def _report(cfg: Config, out: Path, ldir: Path, fitted: dict, ids: np.ndarray, true: np.ndarray) -> None:
    c = cfg.pseudolabel
    _, meta = load_encoder(RunLayout.of(cfg).stage("pretrain"))
    sizes = np.bincount(ids, minlength=c.k)
    total = len(ids)
    labelled = bool(total) and bool((true >= 0).all())
    report = {"k": c.k, "layer": c.layer, "points": int(total), "fit_points": fitted["fit_points"],
              "pca_points": min(c.pca_points, total), "init_points": min(c.init_points, total), "init": c.init,
              "backend": fitted["backend"], "iterations": c.iterations, "objective": fitted["objective"],
              "empty_clusters_repaired": fitted["repaired"], "cluster_sizes": sizes.tolist(),
              "empty_clusters_after_assignment": int((sizes == 0).sum()),
              "teacher_sha256": meta["sha256"], "labels_dir": str(ldir),
              "audio_shards_sha256": shards_digest(ShardSource(split_dir(cfg, "train"))),
              "pca_sha256": sha256_of(out / "pca.npz"), "centroids_sha256": sha256_of(out / "centroids.npy"),
              "nmi_vs_true_labels": _nmi(true, ids) if labelled else None,
              "purity": _purity(true, ids) if labelled else None}
    atomic_write_text(ldir / "meta.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    _plot_sizes(sizes, out / "cluster_sizes.png", report)
    log.info(f"{total} clips -> K={c.k} ({fitted['backend']}, fit on {fitted['fit_points']}), objective "
             f"{fitted['objective'][-1]:.2f}, clusters {sizes.min()}..{sizes.max()} clips, NMI vs true labels "
             f"{report['nmi_vs_true_labels']}, purity {report['purity']}")


def _nmi(true: np.ndarray, ids: np.ndarray) -> float:
    from sklearn.metrics import normalized_mutual_info_score  # here: scikit-learn takes seconds to import

    return float(normalized_mutual_info_score(true, ids))


def _purity(true: np.ndarray, ids: np.ndarray) -> float:
    total = 0
    for c in np.unique(ids):
        total += np.bincount(true[ids == c]).max()
    return float(total / len(ids))


def _plot_sizes(sizes: np.ndarray, path: Path, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(np.arange(len(sizes)), np.sort(sizes)[::-1], width=1.0)
    ax.set(xlabel="cluster (largest first)", ylabel="clips",
           title=f"K={report['k']}: cluster sizes (NMI {report['nmi_vs_true_labels'] or float('nan'):.3f}, "
                 f"purity {report['purity'] or float('nan'):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

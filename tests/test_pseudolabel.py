"""Pseudo-labels at scale: the distributed k-means (2 real gloo ranks, each with its own points) equals the
single-process one; empty clusters are repaired; the torch search equals FAISS's; and the whole stage
(sharded embedding dump, PCA, k-means, label shards) resumes a killed dump without redoing finished shards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp
from conftest import build_noise_dataset

from unfused_dist.cluster.kmeans import faiss_search, init_centroids, lloyd, torch_search

K = 12


def _points(n: int = 6000, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = 3 * rng.standard_normal((20, d))
    return (means[rng.integers(20, size=n)] + rng.standard_normal((n, d))).astype(np.float32)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from unfused_dist.engine.distributed import all_reduce_sum, init_distributed

    init_distributed()
    x = _points()
    init = init_centroids(x[:2000], K, seed=0)
    mine = x[rank::world]  # each rank holds only its own points
    km = lloyd(mine, init, 8, faiss_search, "distributed", all_reduce=all_reduce_sum, progress=False)
    ids, _ = faiss_search(mine, km.centroids)
    np.savez(Path(out) / f"rank{rank}.npz", centroids=km.centroids, objective=km.objective, ids=ids,
             points=km.points_used)


def test_distributed_kmeans_on_two_ranks_equals_the_cpu_backend(tmp_path, free_port):
    mp.start_processes(_rank, args=(2, free_port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    x = _points()
    init = init_centroids(x[:2000], K, seed=0)
    ref = lloyd(x, init, 8, faiss_search, "cpu", progress=False)
    ref_ids, _ = faiss_search(x, ref.centroids)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for r, got in enumerate(ranks):
        np.testing.assert_allclose(got["centroids"], ref.centroids, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["objective"], ref.objective, rtol=1e-6)
        assert int(got["points"]) == len(x)
        assert (got["ids"] == ref_ids[r::2]).all()
    assert ref.objective[-1] < ref.objective[0]


def test_empty_clusters_are_repaired_and_every_cluster_ends_non_empty():
    x = _points()
    init = init_centroids(x[:2000], K, seed=0)
    init[3] = 1e4  # nothing is near it: empty after the first assignment
    km = lloyd(x, init, 6, faiss_search, "cpu", progress=False)
    assert km.repaired >= 1
    assert np.bincount(faiss_search(x, km.centroids)[0], minlength=K).min() > 0


def test_the_torch_search_agrees_with_faiss():
    x = _points(3000)
    c = init_centroids(x, K, seed=1, method="sampled")
    ids_f, d_f = faiss_search(x, c)
    ids_t, d_t = torch_search(x, c, "cpu")
    assert (ids_f == ids_t).mean() > 0.999
    np.testing.assert_allclose(d_f, d_t, rtol=1e-3, atol=1e-3)


def _stage_run(tmp_path: Path, split: Path) -> Path:
    """A run dir with an exported (random) teacher and a config for the pseudolabel stage."""
    from unfused_dist.engine.export import export_encoder
    from unfused_dist.models.encoder import AudioNTT

    run = tmp_path / "run"
    export_encoder(AudioNTT(n_fc=2, n_mels=64), run / "pretrain", meta={"norm_mean": -6.0, "norm_std": 3.0})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run: {{dir: {run}}}\ndata: {{target: {split.parent}, task_seconds: 0.1, num_workers: 1}}\n"
                   "pseudolabel: {k: 4, pca_dim: 8, init_points: 200, pca_points: 200}\n")
    return cfg


def test_a_killed_embedding_dump_resumes_without_redoing_finished_shards(tmp_path):
    from shards_tools.verify import verify_split

    split = build_noise_dataset(tmp_path / "data", 120, shard_samples=4)  # 30 shards
    cfg = _stage_run(tmp_path, split)
    emb = tmp_path / "run/pseudolabel/embeddings"
    cmd = [sys.executable, "-m", "unfused_dist.cli", "run", "pseudolabel", "-c", str(cfg)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (emb.is_dir() and len(list(emb.glob("audio-*.json"))) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the dump ended before it was killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = {p.name: p.stat().st_mtime_ns for p in emb.glob("audio-*")}
    assert 2 <= len([n for n in before if n.endswith(".json")]) < 30

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in emb.glob("audio-*")}
    assert all(after[n] == t for n, t in before.items() if n.endswith(".json"))  # finished shards kept as they were
    assert len([n for n in after if n.endswith(".json")]) == 30
    verify_split(split)  # label shards: same keys, same order as every audio shard
    labels = Path(json.loads((tmp_path / "run/pseudolabel/done.json").read_text())["labels_dir"])
    assert labels.parent == split / "labels" and labels.name.startswith("run-")  # labels/<RUN>/: name + path hash
    meta = json.loads((labels / "meta.json").read_text())
    assert meta["points"] == 120 and meta["fit_points"] == 120 and sum(meta["cluster_sizes"]) == 120
    assert meta["pca_points"] == 120 and meta["init_points"] == 120 and len(meta["objective"]) == 20
    assert (tmp_path / "run/pseudolabel/cluster_sizes.png").stat().st_size > 0

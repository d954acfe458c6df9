"""Pseudo-labels stay true to the data they were made from: a rebuilt dataset is re-embedded, never labelled
from stale embeddings; runs with the same folder name keep their own label shards; non-finite embeddings are
refused where they are made; concurrent embedding tasks agree on one fresh dump; impossible K fails before
embedding; a lost label shard points at the pseudolabel stage. Real tar shards, real FAISS, real teacher."""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_noise_dataset

from unfused_dist.errors import UnfusedError


def _run_cfg(root: Path, split: Path, run: Path, k: int = 2):
    """A config for a run dir holding an exported (random) teacher, on the dataset of `split`."""
    from unfused_dist.config import load_config
    from unfused_dist.engine.export import export_encoder
    from unfused_dist.models.encoder import AudioNTT

    if not (run / "pretrain").exists():
        torch.manual_seed(0)
        export_encoder(AudioNTT(n_fc=2, n_mels=64), run / "pretrain", meta={"norm_mean": -6.0, "norm_std": 3.0})
    return load_config(None, [f"run.dir={run}", f"data.target={split.parent}", "data.task_seconds=0.1",
                              "data.num_workers=0", f"pseudolabel.k={k}", "pseudolabel.pca_dim=4",
                              "data.eval_batch_size=4", "pseudolabel.iterations=2"])


def _label_keys(ldir: Path, split: Path) -> list[list[str]]:
    from unfused_dist.data.source import label_shard_name
    from unfused_dist.data.manifest import DatasetManifest
    from unfused_dist.data.shards import iter_shard

    return [[s.key for s in iter_shard(ldir / label_shard_name(sh.name))] for sh in DatasetManifest.load(split).shards]


# ---- bug: a rebuilt dataset was labelled from the old dump's keys ---------------------------------------

def test_a_rebuilt_dataset_is_re_embedded_and_its_label_shards_stay_aligned(tmp_path):
    from shards_tools.build import build
    from shards_tools.verify import verify_split
    from unfused_dist.data.source import ShardSource
    from unfused_dist.stages import distill, pseudolabel

    split = build_noise_dataset(tmp_path / "data", 12, shard_samples=4)
    cfg = _run_cfg(tmp_path, split, tmp_path / "run")
    pseudolabel.run(cfg)
    # the dataset is rebuilt with one clip renamed (c005 -> c005x): same counts, same first/last keys
    raw = tmp_path / "data/raw"
    (raw / "c005.wav").rename(raw / "c005x.wav")
    shutil.rmtree(split.parent)
    build(raw, split.parent, workers=1, shard_samples=4, keep_order=True, progress=False)  # as build_noise_dataset
    # the finished stage's labels are for the old shards: distill says how to redo them
    with pytest.raises(UnfusedError, match=r"shards changed since the pseudolabel stage .* delete .*done.json"):
        distill.pseudo_labels(tmp_path / "run/pseudolabel", ShardSource(split))
    (tmp_path / "run/pseudolabel/done.json").unlink()  # the stage is redone
    pseudolabel.run(cfg)
    verify_split(split)  # label shards: the same keys in the same order as the rebuilt audio shards
    assert "c005x" in _label_keys(pseudolabel.labels_dir(cfg), split)[1]
    assert distill.pseudo_labels(tmp_path / "run/pseudolabel", ShardSource(split)) == pseudolabel.labels_dir(cfg)


def test_labels_of_other_keys_than_the_manifests_say_to_re_run_the_pseudolabel_stage(tone_dataset):
    from unfused_dist.cluster.labels import write_label_shard
    from unfused_dist.data.manifest import DatasetManifest

    shard = DatasetManifest.load(tone_dataset / "train").shards[0]
    keys = ["other"] * shard.num_samples
    with pytest.raises(UnfusedError, match=r"do not match the manifest.*re-run the pseudolabel stage"):
        write_label_shard(shard, tone_dataset / "labels", keys, np.zeros(len(keys)), np.zeros(len(keys)))


# ---- bug: runs whose folders share a name shared one label directory ----------------------------------

def test_two_runs_with_the_same_folder_name_keep_their_own_label_shards(tmp_path):
    from unfused_dist.data.source import ShardSource
    from unfused_dist.stages import distill, pseudolabel

    split = build_noise_dataset(tmp_path / "data", 12, shard_samples=4)
    a = _run_cfg(tmp_path, split, tmp_path / "a/run", k=2)
    b = _run_cfg(tmp_path, split, tmp_path / "b/run", k=3)
    assert pseudolabel.labels_dir(a) != pseudolabel.labels_dir(b)
    assert pseudolabel.labels_dir(a).parent == split / "labels"  # the contract's labels/<RUN>/
    pseudolabel.run(a)
    pseudolabel.run(b)
    meta = json.loads((pseudolabel.labels_dir(a) / "meta.json").read_text())
    assert meta["k"] == 2  # run b did not overwrite run a's labels
    assert distill.pseudo_labels(tmp_path / "a/run/pseudolabel", ShardSource(split)) == pseudolabel.labels_dir(a)


def test_distill_refuses_label_shards_another_fit_wrote_and_runs_only_after_pseudolabel(tmp_path):
    from unfused_dist.stages import distill, pseudolabel

    split = build_noise_dataset(tmp_path / "data", 12, shard_samples=4)
    cfg = _run_cfg(tmp_path, split, tmp_path / "run")
    with pytest.raises(UnfusedError, match=r"pseudolabel stage has not finished; run it first"):
        distill.run(cfg)
    pseudolabel.run(cfg)
    meta_path = pseudolabel.labels_dir(cfg) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "centroids_sha256": "0" * 64}))  # as if another fit wrote here
    with pytest.raises(UnfusedError, match=r"meta.json: K 2, centroids 000000000000 differ from this run's"):
        distill.run(cfg)


# ---- bug: non-finite embeddings were stored (float16 overflow, NaN) ------------------------------------

@pytest.mark.parametrize("value", [7e4, float("nan")])
def test_an_embedding_float16_cannot_hold_is_refused_naming_shard_and_key(tmp_path, value):
    from unfused_dist.cluster import dump
    from unfused_dist.config import load_config
    from unfused_dist.data.source import ShardSource
    from unfused_dist.data.transforms import WithShard, eval_transform

    split = build_noise_dataset(tmp_path / "data", 8, shard_samples=4)
    source = ShardSource(split)

    def embed(wave):  # a teacher that diverges on the first clip of the second batch
        out = torch.ones(len(wave), 3)
        if embed.calls == 1:
            out[0, 1] = value
        embed.calls += 1
        return out
    embed.calls = 0

    transform = WithShard(eval_transform(load_config().audio, 0.1))
    dump.prepare(tmp_path / "emb", {"teacher_sha256": "t"})
    with pytest.raises(UnfusedError, match=r"audio-000001.tar: clip 'c004' has a non-finite or out-of-float16-"
                                           r"range embedding \((70000.0|nan) in dimension 1\); the teacher"):
        dump.dump(embed, source, [0, 1], tmp_path / "emb", transform, 0, 4, progress=False, desc="")
    assert not (tmp_path / "emb/audio-000001.tar.npy").exists()


def test_a_non_finite_embedding_already_in_a_dump_is_refused_when_read(tmp_path):
    from unfused_dist.cluster import dump
    from unfused_dist.config import load_config
    from unfused_dist.data.source import ShardSource
    from unfused_dist.data.transforms import WithShard, eval_transform

    split = build_noise_dataset(tmp_path / "data", 8, shard_samples=4)
    source, emb = ShardSource(split), tmp_path / "emb"
    transform = WithShard(eval_transform(load_config().audio, 0.1))
    dump.prepare(emb, {"teacher_sha256": "t"})
    dump.dump(lambda w: torch.ones(len(w), 3), source, [0, 1], emb, transform, 0, 4, progress=False, desc="")
    rows = np.load(emb / "audio-000001.tar.npy")
    rows[2, 0] = np.inf  # a dump from before the writer checked, or altered since
    np.save(emb / "audio-000001.tar.npy", rows)
    store = dump.EmbeddingStore(emb, source)
    with pytest.raises(UnfusedError, match=r"audio-000001.tar.npy: clip 'c006' has a non-finite embedding"):
        store.rows(1)
    with pytest.raises(UnfusedError, match=r"clip 'c006' has a non-finite embedding"):
        store.sample(0, seed=0)


# ---- bug: concurrent embedding tasks removed each other's dump ----------------------------------------

def _prepare(directory: str, go, results) -> None:
    from unfused_dist.cluster import dump

    go.wait()
    try:
        dump.prepare(Path(directory), {"teacher_sha256": "new"})
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("attempt", range(3))
def test_array_tasks_preparing_a_stale_dump_at_once_converge_on_one_fresh_dump(tmp_path, attempt):
    emb = tmp_path / "embeddings"
    emb.mkdir()
    (emb / "teacher.json").write_text(json.dumps({"teacher_sha256": "old"}))
    for j in range(3000):  # a large stale dump: its removal takes long enough for the tasks to overlap
        (emb / f"audio-{j:06d}.tar.json").write_text("{}")
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    tasks = [ctx.Process(target=_prepare, args=(str(emb), go, results)) for _ in range(3)]
    for t in tasks:
        t.start()
    go.set()
    for t in tasks:
        t.join(timeout=120)
    assert [results.get(timeout=10) for _ in tasks] == ["ok"] * 3
    assert [p.name for p in emb.iterdir()] == ["teacher.json"]
    assert json.loads((emb / "teacher.json").read_text()) == {"teacher_sha256": "new"}
    assert [p.name for p in tmp_path.iterdir() if "stale" in p.name] == []


# ---- bug: K above the clip count failed only after embedding everything --------------------------------

def test_k_above_the_clip_count_fails_before_anything_is_embedded(tmp_path):
    from unfused_dist.stages import pseudolabel

    split = build_noise_dataset(tmp_path / "data", 8, shard_samples=4)
    cfg = _run_cfg(tmp_path, split, tmp_path / "run", k=9)
    with pytest.raises(UnfusedError, match=r"pseudolabel.k=9 is more than the 8 clips.*lower pseudolabel.k"):
        pseudolabel.embed(cfg)
    assert not list((tmp_path / "run").rglob("*.npy"))


# ---- bug: a lost label shard advised rebuilding the dataset ---------------------------------------------

def test_a_missing_label_shard_says_to_re_run_the_pseudolabel_stage(tone_dataset):
    from unfused_dist.data.shards import ShardUnavailable, iter_shard_with_labels

    audio = tone_dataset / "train/audio-000000.tar"
    with pytest.raises(ShardUnavailable, match=r"labels-000000.tar: cannot open this label shard .*re-run the "
                                               r"pseudolabel stage for this run"):
        list(iter_shard_with_labels(audio, tone_dataset / "train/labels/run/labels-000000.tar"))


def test_a_point_faiss_cannot_place_is_an_error_not_cluster_minus_one():
    from unfused_dist.cluster.kmeans import faiss_search

    centroids = np.eye(4, dtype=np.float32)
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(UnfusedError, match=r"k-means: point 1 has no nearest centroid"):
        faiss_search(x, centroids)

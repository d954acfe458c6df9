"""What a training batch is made of, on the kind of dataset that hid issue 18: shards sorted by label (a
folder per class, built in the source's order). A batch must be as mixed as a uniform sample of the
rank's data, whatever the worker count and in every epoch, and every row must still be its clip's audio
with its clip's label."""
import csv

import numpy as np
import pytest
import soundfile as sf

from shards_tools.build import build
from shards_tools.mixing import expected_distinct
from unfused_dist.config import DataConfig
from unfused_dist.data.loader import make_loader
from unfused_dist.data.source import ShardSource
from unfused_dist.data.stream import TrainingStream
from unfused_dist.data.shards import iter_shard
from unfused_dist.data.transforms import RandomCrop

CLASSES, PER_CLASS, BATCH = 35, 20, 32  # the demo's fine-tuning set: 700 clips, batches of 32
CROP = RandomCrop(400, 16000, with_label="label")


def _crop_label_key(sample, rng):
    return (*CROP(sample, rng), sample.key)


@pytest.fixture(scope="module")
def sorted_split(tmp_path_factory):
    """700 clips, sorted by label into 3 shards; clip i's audio is the constant (i + 1) / 1024, so any crop
    of it names its clip."""
    root = tmp_path_factory.mktemp("sorted")
    rows = []
    for i in range(CLASSES * PER_CLASS):
        path = root / "raw" / f"w{i // PER_CLASS:02d}" / f"c{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.full(800, (i + 1) / 1024, np.float32), 16000, subtype="PCM_16")
        rows.append((path, f"word{i // PER_CLASS:02d}"))
    with open(root / "task.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    build(root / "task.csv", root / "shards", workers=1, shard_samples=250, keep_order=True, progress=False)
    return root / "shards" / "train"


def _batches(split, workers: int, epoch: int):
    stream = TrainingStream(ShardSource(split), _crop_label_key, seed=0, shuffle=True, workers=workers,
                            batch_size=BATCH, shuffle_buffer=DataConfig().shuffle_buffer)
    stream.set_position(epoch, 0)
    return list(make_loader(stream))


def test_the_dataset_is_sorted_by_label(sorted_split):
    labels = [{s.meta()["label"] for s in iter_shard(p)} for p in sorted(sorted_split.glob("audio-*.tar"))]
    assert [len(s) for s in labels] == [13, 13, 10]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_from_label_sorted_shards_are_as_mixed_as_uniform_sampling(sorted_split, workers):
    """Each batch against a uniform sample of what its epoch delivers (an epoch leaves out a contiguous run of
    the shards, under one batch per worker: on sorted shards, a class or two), and of the whole dataset."""
    dataset = expected_distinct([PER_CLASS] * CLASSES, BATCH)  # 21.5
    distinct, uniform = [], []
    for epoch in range(3):
        batches = [labels.tolist() for _, labels, _ in _batches(sorted_split, workers, epoch)]
        assert len(batches) == CLASSES * PER_CLASS // (max(workers, 1) * BATCH) * max(workers, 1)
        delivered = np.bincount(sum(batches, []))
        uniform.append(expected_distinct(delivered[delivered > 0].tolist(), BATCH))
        distinct.append([len(set(labels)) for labels in batches])
        # a batch from one worker's range, or from a buffer yielding early, holds 6-12 labels
        assert min(distinct[-1]) >= 0.6 * dataset, (epoch, distinct[-1])
    # three epochs of ~21 batches: the mean's standard error is ~1 % of it
    mean = np.mean(distinct)
    assert abs(mean / np.mean(uniform) - 1) < 0.03, (np.mean(distinct, axis=1), uniform)
    assert abs(mean / dataset - 1) < 0.05, (mean, dataset)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_training_row_is_its_clips_audio_and_label(sorted_split, workers):
    truth = {s.key: s.label_id for p in sorted(sorted_split.glob("audio-*.tar"))
             for s in ShardSource(sorted_split).iter_shard(int(p.stem.split("-")[1]))}
    seen = set()
    for wave, labels, keys in _batches(sorted_split, workers, epoch=1):
        for row, label, key in zip(wave.numpy(), labels.tolist(), keys):
            clip = int(key.rsplit("__c", 1)[1])
            np.testing.assert_allclose(row, (clip + 1) / 1024, atol=1 / 32768)  # the crop is this clip's
            assert label == truth[key] == clip // PER_CLASS
            seen.add(key)
    assert len(seen) == CLASSES * PER_CLASS // (max(workers, 1) * BATCH) * max(workers, 1) * BATCH


def test_a_position_saved_under_the_old_ordering_rules_is_refused(sorted_split):
    """Before issue 18 the buffer yielded early and batches were not mixed across workers: the same position
    lands on other samples now, so a resume from such a checkpoint must be refused, saying why."""
    from unfused_dist.data.stream import ORDER_VERSION, LoaderStateError

    stream = TrainingStream(ShardSource(sorted_split), _crop_label_key, seed=0, shuffle=True, workers=2, batch_size=8)
    old = {k: v for k, v in stream.state_dict().items() if k != "order_version"}
    with pytest.raises(LoaderStateError, match=f"order_version None -> {ORDER_VERSION}") as refused:
        stream.load_state_dict(old)
    assert "move the stage's ckpt/ away" in str(refused.value)
    with pytest.raises(LoaderStateError, match="workers 1 -> 2"):
        stream.load_state_dict({**stream.state_dict(), "workers": 1})

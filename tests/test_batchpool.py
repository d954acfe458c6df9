"""Batches cross from DataLoader workers through buffers each worker reuses: what the training process gets
is what the workers made, stays intact when the buffers are refilled, and iterations that are abandoned
midway (their batches still in flight) leave nothing stale behind."""
import numpy as np
import torch
from conftest import build_noise_dataset

from unfused_dist.data.batchpool import BatchPool, collate
from unfused_dist.data.loader import make_loader
from unfused_dist.data.source import ShardSource
from unfused_dist.data.stream import EvaluationStream, TrainingStream
from unfused_dist.data.transforms import CentreCrop

CROP = CentreCrop(800, 16000)  # (the clip's middle 800 samples, label id, key): what each key must bring


def _stream(split, workers, batch_size=None):
    if batch_size is None:  # an evaluation stream: every sample once
        return EvaluationStream(ShardSource(split), CROP, seed=3, shuffle=True, workers=workers, shuffle_buffer=4)
    return TrainingStream(ShardSource(split), CROP, seed=3, shuffle=True, workers=workers, batch_size=batch_size,
                          shuffle_buffer=4)


def _check_rows(batches, expected):
    """Every row is its key's crop, and each batch tensor is the caller's own (a copy, not a worker's)."""
    rows = 0
    for wave, _, keys in batches:
        assert not wave.is_shared()  # torch's own path yields shared-memory tensors: the pool was used
        for row, key in zip(wave, keys):
            np.testing.assert_array_equal(row.numpy(), expected[key])
            rows += 1
    return rows


def test_pooled_batches_are_the_workers_and_survive_buffer_reuse_and_abandoned_epochs(tmp_path):
    split = build_noise_dataset(tmp_path, 24, shard_samples=3)
    expected = {key: wave.numpy() for waves, _, keys in make_loader(_stream(split, workers=0), 7)
                for wave, key in zip(waves, keys)}
    assert len(expected) == 24

    stream = _stream(split, workers=2, batch_size=2)
    loader = make_loader(stream)
    kept = []  # held across the whole run, while the workers refill their few buffers many times over
    for epoch, start, take in [(0, 0, None), (1, 0, 3), (1, 3, None), (2, 0, 1), (3, 5, None)]:
        stream.set_position(epoch, start)
        batches = iter(loader)
        got = list(batches) if take is None else [next(batches) for _ in range(take)]  # else: abandoned
        assert len(got) == (take or stream.batches_per_epoch() - start)
        kept += got
    assert _check_rows(kept, expected) == 2 * len(kept)

    # evaluation: workers that live one iteration, and a last batch per worker of another shape
    evaluation = list(make_loader(_stream(split, workers=2), 5))
    assert sorted(len(keys) for _, _, keys in evaluation) == [2, 2, 5, 5, 5, 5]
    assert _check_rows(evaluation, expected) == 24


def test_a_pool_sends_each_buffer_once_per_iteration_and_never_waits():
    pool = BatchPool()
    rows = [torch.full((3,), float(i)) for i in range(2)]
    first = [pool.stack(rows) for _ in range(BatchPool.PER_SHAPE)]
    assert [p.slot for p in first] == list(range(BatchPool.PER_SHAPE))
    assert all(p.buffer is not None for p in first) and [p.busy is not None for p in first] == [True] + [False] * 5
    assert pool.stack(rows) is None  # all busy: the batch goes torch's way instead of waiting
    assert collate([(r.numpy(),) for r in rows])[0].tolist() == [[0.0] * 3, [1.0] * 3]

    pool.busy[2] = 0  # the training process copied slot 2 out
    again = pool.stack([r + 10 for r in rows])
    assert (again.slot, again.buffer, again.busy) == (2, None, None)  # known to the other side: a few bytes
    assert pool.buffers[2][1].tolist() == [11.0] * 3
    assert pool.stack([torch.zeros(4), torch.zeros(4)]).buffer is not None  # another shape, another buffer
    assert pool.stack([torch.zeros(4), torch.zeros(5)]) is None  # ragged: default_collate explains

    pool.reset()  # a new iteration: the other side has forgotten every buffer
    fresh = pool.stack(rows)
    assert fresh.slot == 0 and fresh.buffer is not None and fresh.busy is not None

"""Exact resume of the training stream: keys and crops after a resume are those of an uninterrupted run,
the samples skipped are never decoded, and every rank and worker yields the same number of batches."""
import numpy as np
import pytest

from unfused_dist.data.loader import LoaderStateError, ShardSource, ShardStream, make_loader


def _key_and_draw(sample, rng):
    return sample.key, int(rng.integers(1 << 30))  # the draw stands for the random crop


def _stream(split, rank=0, world=1, workers=2, batch_size=1, transform=_key_and_draw):
    return ShardStream(ShardSource(split), transform, seed=7, shuffle=True, rank=rank, world=world,
                       workers=workers, batch_size=batch_size, shuffle_buffer=4)


def _epoch(stream, epoch, start=0):
    stream.set_position(epoch, start)
    return [list(zip(keys, draws)) for keys, draws in make_loader(stream)]


@pytest.mark.parametrize("stop", [0, 1, 2, 5, 9])
def test_resume_at_any_batch_continues_exactly(tone_dataset, stop):
    split = tone_dataset / "train"
    full = _epoch(_stream(split), epoch=1)
    assert len(full) == _stream(split).batches_per_epoch() >= 10
    resumed = _epoch(_stream(split), epoch=1, start=stop)  # a fresh stream, as after a restart
    assert full[:stop] + resumed == full


def test_resume_does_not_decode_skipped_samples(tone_dataset):
    split = tone_dataset / "train"
    decoded = []

    def transform(sample, rng):
        decoded.append(sample.key)
        return sample.audio(16000)[:10], sample.key

    stream = _stream(split, workers=0, transform=transform)
    total = stream.batches_per_epoch()
    stream.set_position(0, total - 2)
    batches = list(make_loader(stream))
    assert len(batches) == 2 and len(decoded) == 2 * stream.batch_size


def test_every_rank_and_worker_yields_the_same_batches_and_ranks_are_disjoint(tone_dataset):
    split = tone_dataset / "train"
    per_rank = [[k for b in _epoch(_stream(split, rank=r, world=2), 0) for k, _ in b] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == _stream(split, world=2).batches_per_epoch()
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0])) == len(per_rank[0])  # no sample twice within an epoch
    next_epoch = [k for b in _epoch(_stream(split, rank=0, world=2), 1) for k, _ in b]
    assert next_epoch != per_rank[0]  # a new epoch, a new order


def test_a_changed_layout_is_refused(tone_dataset):
    split = tone_dataset / "train"
    state = _stream(split, workers=2).state_dict()
    with pytest.raises(LoaderStateError, match="workers 2 -> 1"):
        _stream(split, workers=1).load_state_dict(state)
    np.testing.assert_equal(_stream(split).state_dict(), state)


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error(tone_dataset):
    with pytest.raises(LoaderStateError, match="cannot give each of 16 ranks x 2 workers a full batch of 1"):
        _stream(tone_dataset / "train", world=16).batches_per_epoch()

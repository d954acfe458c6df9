"""Exact resume of the training stream: keys and crops after a resume are those of an uninterrupted run,
the samples skipped are never decoded, and every rank and worker yields the same number of batches."""
import gc
import json
import logging
import signal

import numpy as np
import pytest
from conftest import build_noise_dataset, read_tar, write_tar

from unfused_dist.data.loader import make_loader
from unfused_dist.data.order import PositionRng
from unfused_dist.data.source import ShardSource
from unfused_dist.data.stream import LoaderStateError, TrainingStream
from unfused_dist.data.shards import ShardError


def _key_and_draw(sample, rng):
    return sample.key, int(rng.integers(1 << 30))  # the draw stands for the random crop


def _key_and_audio_draw(sample, rng):
    sample.audio(16000)  # decode, so a corrupt member shows
    return _key_and_draw(sample, rng)


def _stream(split, rank=0, world=1, workers=2, batch_size=1, transform=_key_and_audio_draw, shuffle_buffer=4,
            **kw):
    return TrainingStream(ShardSource(split), transform, seed=7, shuffle=True, rank=rank, world=world,
                          workers=workers, batch_size=batch_size, shuffle_buffer=shuffle_buffer, **kw)


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


def test_one_loader_serves_every_epoch_with_the_same_workers_and_exact_positions(tone_dataset):
    # Training makes its loader once: the workers persist and each iteration re-reads set_position
    split = tone_dataset / "train"
    stream = _stream(split)
    loader = make_loader(stream)
    assert loader.persistent_workers
    workers = set()

    def one_pass(epoch, start):
        stream.set_position(epoch, start)
        batches = [list(zip(keys, draws)) for keys, draws in loader]
        workers.add(tuple(w.pid for w in loader._iterator._workers))
        return batches

    for epoch, start in [(0, 0), (1, 3), (2, 0)]:
        assert one_pass(epoch, start) == _epoch(_stream(split), epoch, start)  # fresh loaders: the reference
    stream.set_position(3, 0)
    it = iter(loader)
    next(it), next(it)  # abandoned mid-epoch, its prefetched batches still in flight
    assert one_pass(4, 1) == _epoch(_stream(split), 4, 1)
    assert len(workers) == 1


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


def test_a_changed_layout_is_refused(tone_dataset, tmp_path):
    split = tone_dataset / "train"
    state = _stream(split, workers=2).state_dict()
    with pytest.raises(LoaderStateError, match="workers 2 -> 1"):
        _stream(split, workers=1).load_state_dict(state)
    np.testing.assert_equal(_stream(split).state_dict(), state)
    with pytest.raises(LoaderStateError, match="shuffle_buffer 4 -> 64"):
        _stream(split, shuffle_buffer=64).load_state_dict(state)
    unshuffled = TrainingStream(ShardSource(split), _key_and_draw, seed=7, shuffle=False, workers=2, batch_size=1)
    with pytest.raises(LoaderStateError, match="shuffle True -> False"):
        unshuffled.load_state_dict(state)
    # the same number of shards, rebuilt with other sizes: positions would land on other samples
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] += 1
    manifest["shards"][1]["num_samples"] -= 1
    (split / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderStateError, match="shard_sizes [0-9a-f]+ -> [0-9a-f]+"):
        _stream(split).load_state_dict(state)


def test_the_left_over_samples_change_between_epochs_even_with_one_shard(tmp_path):
    """10 clips in one shard, batches of 3: one clip is left over each epoch, and not always the same one."""
    split = build_noise_dataset(tmp_path, 10, shard_samples=10)
    stream = _stream(split, workers=0, batch_size=3, transform=_key_and_draw)
    left_over = set()
    for epoch in range(12):
        keys = [k for b in _epoch(stream, epoch) for k, _ in b]
        assert len(keys) == len(set(keys)) == 9
        left_over |= {f"c{i:03d}" for i in range(10)} - set(keys)
    assert len(left_over) > 3


def _keys_per_rank(split, world, epoch=0, **kw):
    return [[k for b in _epoch(_stream(split, rank=r, world=world, **kw), epoch) for k, _ in b] for r in range(world)]


@pytest.mark.parametrize("n", [40, 43])
def test_two_ranks_by_two_workers_deliver_each_sample_once_per_epoch(tmp_path, n):
    """40 clips in 8 shards of 5, batch 5: every clip exactly once. 43 clips (a last shard of 3): the same
    40 steps' worth, no clip twice, and the 3 left over differ from epoch to epoch."""
    split = build_noise_dataset(tmp_path, n, shard_samples=5)
    everything = {f"c{i:03d}" for i in range(n)}
    left_out = []
    for epoch in range(3):
        per_rank = _keys_per_rank(split, world=2, epoch=epoch, batch_size=5)
        assert len(per_rank[0]) == len(per_rank[1]) == 20
        assert not set(per_rank[0]) & set(per_rank[1])
        delivered = per_rank[0] + per_rank[1]
        assert len(set(delivered)) == len(delivered) == 40 and set(delivered) <= everything
        left_out.append(everything - set(delivered))
    if n == 43:
        assert len({frozenset(s) for s in left_out}) > 1


def test_too_few_shards_is_an_error_unless_resampled(tone_dataset):
    split = tone_dataset / "train"  # 12 clips in 4 shards; 3 ranks x 2 workers
    with pytest.raises(LoaderStateError, match="4 shards for 3 ranks x 2 workers.*data.resampled=true"):
        _stream(split, world=3).batches_per_epoch()
    per_rank = _keys_per_rank(split, world=3, resampled=True)
    assert [len(keys) for keys in per_rank] == [_stream(split, world=3, resampled=True).batches_per_epoch()] * 3 == [4] * 3
    assert per_rank == _keys_per_rank(split, world=3, resampled=True)  # seeded
    full = _epoch(_stream(split, world=3, resampled=True), 0)
    assert full[:1] + _epoch(_stream(split, world=3, resampled=True), 0, start=1) == full


def test_a_bad_sample_is_skipped_logged_and_replaced_so_batches_stay_equal(tmp_path, corrupt_audio, caplog):
    split = build_noise_dataset(tmp_path, 40, shard_samples=5)
    shard = split / "audio-000003.tar"
    clean = _keys_per_rank(split, world=2, batch_size=5, workers=0)
    bad = corrupt_audio(shard, 2)
    with caplog.at_level(logging.WARNING, logger="unfused_dist.data.loader"):
        per_rank = _keys_per_rank(split, world=2, batch_size=5, workers=0)
    assert [len(k) for k in per_rank] == [20, 20]
    delivered = per_rank[0] + per_rank[1]
    assert bad in clean[0] + clean[1] and bad not in delivered
    assert len(set(delivered)) == 39  # the bad clip's place went to a good one from the same worker
    assert f"{shard}: sample '{bad}' cannot be decoded" in caplog.text and "1 this epoch" in caplog.text
    assert [len(k) for k in _keys_per_rank(split, world=2, batch_size=5, workers=2)] == [20, 20]
    counted = []  # the metrics' view: the main process learns what its 2 workers skipped
    for r in range(2):
        stream = _stream(split, rank=r, world=2, batch_size=5, workers=2)
        list(make_loader(stream))
        counted.append(stream.take_bad())
    assert sorted(counted) == [0, 1] and stream.take_bad() == 0

    with pytest.raises(ShardError, match=rf"{shard}: sample '{bad}' cannot be decoded"):
        _keys_per_rank(split, world=2, batch_size=5, bad_samples="fail")


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 7])
def test_resume_around_a_bad_sample_is_exact(tmp_path, corrupt_audio, stop):
    split = build_noise_dataset(tmp_path, 24, shard_samples=3)
    for shard, i in [("audio-000001.tar", 1), ("audio-000004.tar", 2), ("audio-000007.tar", 2)]:
        corrupt_audio(split / shard, i)
    full = _epoch(_stream(split, batch_size=2, shuffle_buffer=1), 0)
    assert len(full) == 12
    assert full[:stop] + _epoch(_stream(split, batch_size=2, shuffle_buffer=1), 0, start=stop) == full


def test_bad_samples_at_the_end_of_a_range_take_its_first_good_sample(tmp_path, corrupt_audio):
    split = build_noise_dataset(tmp_path, 6, shard_samples=3)
    corrupt_audio(split / "audio-000000.tar", 0)
    corrupt_audio(split / "audio-000001.tar", 2)  # the last of the epoch: nothing after it
    stream = TrainingStream(ShardSource(split), _key_and_audio_draw, seed=7, shuffle=False, workers=0, batch_size=2)
    keys = [k for b in make_loader(stream) for k in b[0]]
    assert keys == ["c001", "c001", "c002", "c003", "c004", "c001"]


def test_workers_start_from_a_fork_server_and_a_closure_transform_is_refused_clearly(tone_dataset):
    # Forking a training process that runs threads (metrics server, queue feeders) hung a rank in os.fork()
    loader = make_loader(_stream(tone_dataset / "train"))
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert len(list(loader)) == _stream(tone_dataset / "train").batches_per_epoch()

    def closure(sample, rng):
        return sample.key

    with pytest.raises(ValueError, match="cannot be pickled.*data.num_workers=0"):
        make_loader(_stream(tone_dataset / "train", transform=closure))
    assert make_loader(_stream(tone_dataset / "train", transform=closure, workers=0)).num_workers == 0


def _objects_frozen_here(sample, rng):
    return (gc.get_freeze_count(),)


def test_workers_freeze_what_they_inherit_out_of_the_collectors_reach(tone_dataset):
    # Else the first full collection walks torch's ~170k objects in every worker and unshares their pages
    counts = [int(n) for (batch,) in make_loader(_stream(tone_dataset / "train", transform=_objects_frozen_here))
              for n in batch]
    assert counts and min(counts) > 10_000
    assert gc.get_freeze_count() == 0  # the training process itself is left alone


_HOLD_A_LOADER = """
import sys, time
from unfused_dist.data.loader import make_loader
from unfused_dist.data.source import ShardSource
from unfused_dist.data.stream import TrainingStream
from unfused_dist.data.transforms import CentreCrop
stream = TrainingStream(ShardSource(sys.argv[1]), CentreCrop(1600, 16000), seed=0, shuffle=True, workers=2,
                        batch_size=1)
loader = make_loader(stream)
next(iter(loader))
print(*[w.pid for w in loader._iterator._workers], flush=True)
time.sleep(600)
"""


def test_workers_end_when_the_training_process_is_killed(tone_dataset):
    import os
    import signal
    import subprocess
    import sys
    import time

    from unfused_dist.data.workers import _alive

    proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_LOADER, str(tone_dataset / "train")],
                            stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30  # they look once a second
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, f"DataLoader workers {workers} outlived their killed process"
        time.sleep(0.1)


def test_position_rng_draws_depend_only_on_key_and_position():
    """What exact resume rests on: a position's draws do not depend on the positions drawn before it, on
    how much they drew, or on a reused generator; other positions and other keys draw differently."""
    def draws(rng, position):
        return rng.at(position).integers(1 << 62, size=6).tolist()

    a = PositionRng(7, 1, 0, 1)
    first = {p: draws(a, p) for p in range(50)}
    b = PositionRng(7, 1, 0, 1)
    b.at(3).standard_normal(1001)  # a long, odd-sized draw at another position leaves nothing behind
    assert {p: draws(b, p) for p in reversed(range(50))} == first
    assert len({tuple(v) for v in first.values()}) == 50
    assert draws(PositionRng(7, 2, 0, 1), 0) != first[0] and draws(PositionRng(7, 1, 0, 0), 0) != first[0]


def _without_last_sample(shard):
    members = read_tar(shard)
    last = members[-1][0].split(".")[0]
    write_tar(shard, [(n, d) for n, d in members if n.split(".")[0] != last])


@pytest.mark.parametrize("damage", ["truncated", "fewer samples than its manifest", "a refused member"])
def test_a_shard_that_stops_short_costs_its_samples_not_the_run(tmp_path, caplog, damage):
    """Skipping bad samples: the samples a damaged shard cannot give count as bad and are replaced, so every
    rank still yields the same batches (a short rank would hang the others' collectives). Failing: an
    error naming the shard."""
    split = build_noise_dataset(tmp_path, 40, shard_samples=5)
    shard = split / "audio-000003.tar"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:3000])
    elif damage == "fewer samples than its manifest":
        _without_last_sample(shard)
    else:  # before the shard's last sample, which it then never reaches
        members = read_tar(shard)
        write_tar(shard, members[:-2] + [("c999.pyd", b"cos\nsystem\n")] + members[-2:])
    reason = {"truncated": "unreadable or truncated", "fewer samples than its manifest": "ends after 4 samples",
              "a refused member": "member 'c999.pyd' is not audio"}[damage]
    for workers in (0, 2):
        caplog.clear()
        counted = []
        for rank in range(2):
            stream = _stream(split, rank=rank, world=2, batch_size=5, workers=workers)
            with caplog.at_level(logging.WARNING, logger="unfused_dist.data.loader"):
                batches = _epoch(stream, 0)
            assert len(batches) == stream.batches_per_epoch() == 4
            keys = [k for b in batches for k, _ in b]
            assert len(keys) == 20  # a bad position repeats the next good sample of its worker
            counted.append(stream.take_bad())  # the workers' counts reach the main process
        assert sum(counted) > 0, workers
        if workers == 0:  # a DataLoader worker's log records stay in its own process
            assert f"{shard}: " in caplog.text and reason in caplog.text
    with pytest.raises(ShardError, match=rf"{shard}: .*{reason}"):
        for rank in range(2):
            _epoch(_stream(split, rank=rank, world=2, batch_size=5, workers=0, bad_samples="fail"), 0)


def test_a_shard_that_cannot_be_opened_stops_the_run_even_when_skipping(tmp_path):
    split = build_noise_dataset(tmp_path, 20, shard_samples=5)
    (split / "audio-000002.tar").unlink()
    with pytest.raises(ShardError, match=r"audio-000002.tar: cannot open this shard"):
        for rank in range(2):
            _epoch(_stream(split, rank=rank, world=2, batch_size=5, workers=0), 0)


def _label_of(sample, rng):
    return sample.key, sample.label_id


def test_unreadable_json_is_a_bad_sample_parsed_only_by_the_lane_that_delivers_it(tone_dataset):
    """12 clips in 4 shards of 3; 3 ranks, batches of 4, unshuffled: rank 0 takes clips 0-3 (shard 1's first
    among them) and rank 1 clips 4-7, reading past that first clip of shard 1 without delivering it."""
    split = tone_dataset / "train"
    shard = split / "audio-000001.tar"
    members = read_tar(shard)
    bad = members[0][0].split(".")[0]
    write_tar(shard, [(n, b"{not json" if n == f"{bad}.json" else d) for n, d in members])

    def stream(rank, bad_samples="skip"):
        return TrainingStream(ShardSource(split), _label_of, seed=0, shuffle=False, rank=rank, world=3, batch_size=4,
                              bad_samples=bad_samples)

    streams = [stream(rank) for rank in range(3)]
    delivered = [[k for k, _ in s] for s in streams]
    assert [len(keys) for keys in delivered] == [4, 4, 4]
    assert bad not in delivered[0] + delivered[1] + delivered[2]
    assert [s.bad_count for s in streams] == [1, 0, 0]  # the owner skipped it; rank 1 never parsed it
    with pytest.raises(ShardError, match=rf"sample '{bad}' has unreadable JSON"):
        list(stream(0, "fail"))
    assert len(list(stream(1, "fail"))) == 4


def test_resampled_shards_where_nothing_decodes_are_an_error_not_a_hang(tmp_path, corrupt_audio):
    split = build_noise_dataset(tmp_path, 8, shard_samples=2)
    for shard in sorted(split.glob("audio-*.tar")):
        for i in range(2):
            corrupt_audio(shard, i)

    def hung(*_):
        raise TimeoutError("still drawing after 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    # A resampled stream never ends: it used to draw bad samples for ever. Every second after the first 60,
    # since a decoder's catch-all may take one TimeoutError for a bad sample.
    signal.setitimer(signal.ITIMER_REAL, 60, 1)
    try:
        with pytest.raises(ShardError, match=r"found no sample it could decode in \d+ draws"):
            _epoch(_stream(split, world=1, workers=0, batch_size=2, resampled=True), 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("json_bytes", [b"[1, 2]", b'{"label": [1]}', b"[" * 100000])
def test_json_that_is_no_object_or_whose_label_is_no_text_is_a_bad_sample(tone_dataset, json_bytes):
    split = tone_dataset / "train"
    shard = split / "audio-000001.tar"
    members = read_tar(shard)
    bad = members[0][0].split(".")[0]
    write_tar(shard, [(n, json_bytes if n == f"{bad}.json" else d) for n, d in members])
    stream = TrainingStream(ShardSource(split), _label_of, seed=0, shuffle=False, batch_size=4)
    delivered = [k for k, _ in stream]
    assert len(delivered) == 12 and bad not in delivered and stream.bad_count == 1


def test_a_resume_over_another_subset_of_keys_with_the_same_counts_is_refused(tone_dataset):
    split = tone_dataset / "train"
    keys = [s.key for i in range(4) for s in ShardSource(split).iter_shard(i)]
    by_shard = [keys[i:i + 3] for i in range(0, 12, 3)]

    def subset_stream(pick):
        chosen = frozenset(shard_keys[pick] for shard_keys in by_shard)  # one clip of each shard
        return TrainingStream(ShardSource(split, keys=chosen, counts=[1, 1, 1, 1]), _key_and_draw, seed=0,
                              shuffle=True, batch_size=1)

    state = subset_stream(0).state_dict()
    subset_stream(0).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="keys [0-9a-f]+ -> [0-9a-f]+"):
        subset_stream(1).load_state_dict(state)


def _key_and_cls(sample, rng):
    return sample.key, sample.cls()


def test_label_shards_out_of_line_stop_the_run_even_when_skipping(tmp_path):
    """Pseudo-labels made for another build of the dataset are stale for the whole shard: skipping them as bad
    samples would train on less data without a word. The run stops, naming both shards."""
    split = build_noise_dataset(tmp_path, 20, shard_samples=5)
    labels = tmp_path / "labels"
    labels.mkdir()
    for shard in sorted(split.glob("audio-*.tar")):
        keys = list(dict.fromkeys(name.split(".")[0] for name, _ in read_tar(shard)))
        if shard.name == "audio-000002.tar":
            keys[3] = "renamed"
        write_tar(labels / shard.name.replace("audio-", "labels-"), [(f"{k}.cls", b"1") for k in keys])
    for workers in (0, 2):
        with pytest.raises(ShardError, match=r"labels-000002.tar has key 'renamed' at position 3"):
            for rank in range(2):
                stream = TrainingStream(ShardSource(split, labels_dir=labels), _key_and_cls, seed=7, shuffle=True,
                                        rank=rank, world=2, workers=workers, batch_size=5, shuffle_buffer=4)
                _epoch(stream, 0)

import io
import signal
import tarfile

import numpy as np
import pytest
from conftest import read_tar, write_tar

from unfused_dist.cluster.labels import write_label_shards
from unfused_dist.data.order import assign_shards
from unfused_dist.data.source import ShardSource, label_shard_name
from unfused_dist.data.stream import EvaluationStream, TrainingStream
from unfused_dist.data.manifest import DatasetManifest
from unfused_dist.data.shards import LabelAlignmentError, ShardError, iter_shard


def _keys(split_dir):
    m = DatasetManifest.load(split_dir)
    return [s.key for sh in m.shards for s in iter_shard(split_dir / sh.name)]


def test_assign_shards_covers_every_shard_once_per_epoch():
    for epoch in range(3):
        plan = assign_shards(11, seed=5, epoch=epoch, world=2, lanes=2, shuffle=True)
        flat = [s for rank in plan for w in rank for s in w]
        assert sorted(flat) == list(range(11))
    assert assign_shards(11, 5, 0, 2, 2, True) != assign_shards(11, 5, 1, 2, 2, True)


def test_ranks_read_disjoint_samples_and_the_same_number_of_batches(tone_dataset):
    split = tone_dataset / "train"
    seen = []
    counts = []
    for rank in range(2):
        stream = EvaluationStream(ShardSource(split), lambda s, rng: s.key, seed=1, shuffle=True, rank=rank, world=2)
        seen.append(list(stream))
        train = TrainingStream(ShardSource(split), lambda s, rng: s.key, seed=1, shuffle=True, rank=rank, world=2,
                               batch_size=2)
        counts.append((len(list(train)) // 2, train.batches_per_epoch()))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_keys(split))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0


def test_label_shards_align_and_a_mismatch_names_both_shards(tone_dataset, tmp_path):
    split = tone_dataset / "train"
    keys = _keys(split)
    labels = tmp_path / "labels"
    write_label_shards(split, labels, keys, np.arange(len(keys)) % 3, np.zeros(len(keys)))
    source = ShardSource(split, labels_dir=labels)
    got = [(s.key, s.cls()) for i in range(len(source.counts)) for s in source.iter_shard(i)]
    assert got == [(k, i % 3) for i, k in enumerate(keys)]

    # Swap two keys inside the first label shard: the reader must refuse and name both shards.
    first = DatasetManifest.load(split).shards[0].name
    shard = labels / label_shard_name(first)
    members = read_tar(shard)
    write_tar(shard, members[2:4] + members[0:2] + members[4:])
    with pytest.raises(LabelAlignmentError) as e:
        list(ShardSource(split, labels_dir=labels).iter_shard(0))
    assert str(shard) in str(e.value) and str(split / first) in str(e.value)


@pytest.mark.parametrize("ext", ["pyd", "pickle"])
def test_a_pickle_member_is_refused_not_loaded(tone_dataset, append_member, tmp_path, ext, caplog):
    split = tone_dataset / "train"
    shard = split / DatasetManifest.load(split).shards[0].name
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # unpickling this would run `touch`
    append_member(shard, f"evil.{ext}", payload)
    with pytest.raises(ShardError, match=rf"{shard}: member 'evil.{ext}' is not audio/json/text/int"):
        list(iter_shard(shard))
    stream = EvaluationStream(ShardSource(split), lambda s, rng: s.key, seed=0, shuffle=False, workers=0,
                              bad_samples="fail")
    with pytest.raises(ShardError, match=rf"member 'evil.{ext}'"):
        list(stream)
    # skipping bad samples: the shard's samples before the member still arrive, and the refusal is logged
    caplog.clear()
    skipping = EvaluationStream(ShardSource(split), lambda s, rng: s.key, seed=0, shuffle=False, workers=0)
    assert len(list(skipping)) == sum(ShardSource(split).counts)
    assert f"{shard}: member 'evil.{ext}' is not audio/json/text/int" in caplog.text
    assert not marker.exists()


def test_truncated_shard_is_a_clear_error(tone_dataset):
    split = tone_dataset / "train"
    shard = split / DatasetManifest.load(split).shards[0].name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 7])
    with pytest.raises(ShardError, match="truncated"):
        list(iter_shard(shard))


@pytest.mark.parametrize("offset, byte, reason", [(1024 + 5, b"X", "checksum is wrong"),
                                                  (1024 + 150, b"9", "checksum or size is not a number")])
def test_a_damaged_header_is_a_clear_error(tmp_path, offset, byte, reason):
    """The second member's header (at 1024: header + one data block before it) with one byte changed: in
    its name (the checksum no longer adds up), or a non-octal digit in its checksum field."""
    path = tmp_path / "t.tar"
    write_tar(path, [("a.cls", b"1"), ("b.cls", b"2")])
    assert [s.key for s in iter_shard(path)] == ["a", "b"]
    data = bytearray(path.read_bytes())
    data[offset:offset + 1] = byte
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{path}: unreadable or truncated shard \(a header's {reason}"):
        list(iter_shard(path))


def test_corrupt_audio_member_names_shard_and_key(tone_dataset, tmp_path):
    split = tone_dataset / "train"
    shard = split / DatasetManifest.load(split).shards[0].name
    members = read_tar(shard)
    bad_key = members[0][0].split(".")[0]
    members[0] = (members[0][0], b"fLaC" + b"\x00" * 64)  # a FLAC header with garbage behind it
    write_tar(shard, members)
    sample = next(iter_shard(shard))
    with pytest.raises(ShardError, match=rf"{shard}: sample '{bad_key}' cannot be decoded"):
        sample.audio(16000)


def test_verify_checks_label_shards_and_stats_reports_durations_and_rates(tone_dataset):
    from shards_tools.stats import split_stats
    from shards_tools.verify import VerifyError, verify_split

    split = tone_dataset / "train"
    keys = _keys(split)
    labels = split / "labels" / "run1"  # where the pseudolabel stage puts them
    write_label_shards(split, labels, keys, np.arange(len(keys)) % 3, np.zeros(len(keys)))
    verify_split(split)
    shard = labels / label_shard_name(DatasetManifest.load(split).shards[1].name)
    members = read_tar(shard)
    write_tar(shard, members[:-2])  # the last sample's label is gone
    with pytest.raises(VerifyError, match=rf"{shard}: position 2 has key None"):
        verify_split(split)
    shard.unlink()
    with pytest.raises(VerifyError, match="missing label shard"):
        verify_split(split)

    text = "\n".join(split_stats(split).lines())
    assert "train: 12 clips" in text and "source sample rates: 8000 Hz 4, 16000 Hz 4, 22050 Hz 4" in text
    assert "0.5-1    s" in text and "1-2    s" in text  # durations between 0.6 and 1.4 s


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_reader_handles_long_names_in_every_tar_format(tmp_path, fmt):
    """Keys past ustar's 100 characters: PAX and GNU headers (and ustar's prefix field) must give the key."""
    key = "speaker_" + "x" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60 + "/" + "k" * 60
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in [(f"{key}.json", b'{"a": 1}'), (f"{key}.cls", b"3"), ("other.cls", b"4")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    samples = list(iter_shard(path))
    assert [(s.key, sorted(s.members)) for s in samples] == [(key, ["cls", "json"]), ("other", ["cls"])]
    assert samples[0].cls() == 3 and samples[0].meta() == {"a": 1}


def _tar_bytes(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    """members: (name, payload) for regular files, (name, None, kind) for links and folders."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for name, data, *kind in members:
            info = tarfile.TarInfo(name)
            if kind:
                info.type, info.linkname = kind[0], "target"
            else:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_a_long_name_on_a_link_or_folder_names_nothing_after_it(tmp_path, fmt, kind):
    path = tmp_path / "t.tar"
    path.write_bytes(_tar_bytes([("s" * 150, None, kind), ("a.cls", b"1"), ("a.json", b"{}")], fmt))
    assert [(s.key, sorted(s.members)) for s in iter_shard(path)] == [("a", ["cls", "json"])]


def _with_pax_record(record: bytes) -> bytes:
    """A tar whose first member carries a PAX header of exactly `record`, its checksum valid."""
    data = bytearray(_tar_bytes([("a.cls", b"1")], tarfile.PAX_FORMAT))
    header = bytearray(512)
    header[:9] = b"PaxHeader"
    header[124:136] = b"%011o\0" % len(record)
    header[156:157], header[257:265] = b"x", b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    block = bytes(header) + record + b"\0" * (-len(record) % 512)
    return block + bytes(data)


@pytest.mark.parametrize("record", [b"0 mtime=1\n", b"garbage\n", b"99 path=a.cls\n"])
def test_a_malformed_pax_header_is_a_clear_error_not_a_hang(tmp_path, record):
    path = tmp_path / "t.tar"
    path.write_bytes(_with_pax_record(record))
    def hung(*_):
        raise TimeoutError("still parsing after 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # a record that does not move the parser on used to loop for ever
    try:
        with pytest.raises(ShardError, match=rf"{path}: unreadable or truncated shard \(a PAX header's records"):
            list(iter_shard(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("size, reason", [(b"%011o\0" % (8 << 30), "a member runs past the end"),
                                          (b"-1".rjust(11) + b"\0", "a header's checksum or size is negative")])
def test_a_size_field_past_the_end_of_the_file_is_a_clear_error(tmp_path, size, reason):
    """A header with a valid checksum claiming 8 GiB, or -1: refused before anything is read (one used to ask
    for 8 GiB at once, the other read the rest of the file)."""
    data = bytearray(_tar_bytes([("a.cls", b"1"), ("b.cls", b"2")]))
    header = data[512 * 2: 512 * 3]  # the second member's header
    header[124:136] = size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[512 * 2: 512 * 3] = header
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{path}: unreadable or truncated shard \({reason}"):
        list(iter_shard(path))

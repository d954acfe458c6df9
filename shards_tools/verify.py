"""Re-read a built dataset and check it against its manifest: members, key pairing, audio, counts, sha256.

Shard contents are only ever parsed as the manifest's codec (FLAC or WAV) or JSON; any other member
(.pyd, .pickle, ...) is an error, reported before anything else so a tampered shard names the offending
member. Label shards (SPLIT/labels/<run>/) are checked for the same keys in the same order.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from itertools import zip_longest
from dataclasses import dataclass
from pathlib import Path

from unfused_dist.audio.io import AudioDecodeError, decode_audio
from unfused_dist.data.loader import label_shard_name
from unfused_dist.data.manifest import (SHARD_GLOB, DatasetManifest, ManifestError, ShardInfo,
                                        find_split_dirs, sha256_file)

# the first bytes of each codec's stream: a WAV inside a .flac member would otherwise decode fine
MAGIC = {"flac": b"fLaC", "wav": b"RIFF"}
_SECONDS_TOL = 1e-3


class VerifyError(Exception):
    """One-line description of the first problem found, naming the shard (and member) at fault."""


@dataclass
class SplitReport:
    split: str
    directory: Path
    clips: int
    seconds: float
    shards: int

    def line(self) -> str:
        return (f"{self.split}: OK {self.clips} clips, {self.seconds / 3600:.3f} h, "
                f"{self.shards} shards ({self.directory})")


def iter_samples(shard: Path, extensions: tuple[str, ...] = ("flac", "json")) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: payload}) per sample, strictly: regular members named <key>.<ext> for the given
    extensions only, each key's members consecutive (as WebDataset groups them) and complete."""
    name = shard.name
    try:
        with tarfile.open(shard, mode="r:") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    raise VerifyError(f"{name}: member {member.name!r} is not a regular file; rebuild the split")
                k, dot, ext = member.name.partition(".")
                if not dot or "/" in member.name or ext not in extensions:
                    allowed = " and ".join(f"<key>.{e}" for e in extensions)
                    raise VerifyError(f"{name}: foreign member {member.name!r} (only {allowed} are allowed; "
                                      "nothing is unpickled) - rebuild the split")
                if k != key:
                    if key is not None:
                        yield _complete(name, key, group, extensions)
                    key, group = k, {}
                if ext in group:
                    raise VerifyError(f"{name}: duplicate member {member.name!r}; rebuild the split")
                group[ext] = tar.extractfile(member).read()
            if key is not None:
                yield _complete(name, key, group, extensions)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise VerifyError(f"{name}: unreadable tar ({e}); the file is truncated or corrupt - rebuild the split")


def _complete(shard_name: str, key: str, group: dict[str, bytes],
              extensions: tuple[str, ...]) -> tuple[str, dict[str, bytes]]:
    missing = [e for e in extensions if e not in group]
    if missing:
        raise VerifyError(f"{shard_name}: key {key!r} has no .{missing[0]} member (or its members are not "
                          f"consecutive); rebuild the split")
    return key, group


def parse_meta(shard_name: str, key: str, payload: bytes) -> dict:
    try:
        meta = json.loads(payload)
    except ValueError as e:
        raise VerifyError(f"{shard_name}: {key}.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("id") != key:
        raise VerifyError(f"{shard_name}: {key}.json has id {meta.get('id') if isinstance(meta, dict) else None!r}, "
                          f"expected {key!r}")
    return meta


def _check_shard(directory: Path, info: ShardInfo, manifest: DatasetManifest, seen: set[str]) -> float:
    path = directory / info.name
    if not path.is_file():
        raise VerifyError(f"{info.name}: listed in the manifest but missing from {directory}; rebuild the split")
    count, seconds, first, last = 0, 0.0, None, None
    codec = manifest.codec
    for key, group in iter_samples(path, (codec, "json")):
        if key in seen:
            raise VerifyError(f"{info.name}: key {key!r} appears twice in the split")
        seen.add(key)
        meta = parse_meta(info.name, key, group["json"])
        try:
            if not group[codec].startswith(MAGIC.get(codec, b"?")):
                raise AudioDecodeError(f"not a {codec.upper()} stream")
            x, sr = decode_audio(group[codec])
        except AudioDecodeError as e:
            raise VerifyError(f"{info.name}: {key}.{codec}: {e.reason}") from None
        if sr != manifest.sample_rate or x.shape[0] != 1:
            raise VerifyError(f"{info.name}: {key}.{codec} is {sr} Hz x {x.shape[0]} channels, "
                              f"manifest says {manifest.sample_rate} Hz mono")
        dur = x.shape[1] / sr
        if abs(float(meta.get("duration", -1)) - dur) > _SECONDS_TOL:
            raise VerifyError(f"{info.name}: {key}.json duration {meta.get('duration')} != audio {dur:.6f} s")
        label = meta.get("label")
        if manifest.labels is not None and label is not None and label not in manifest.label_index:
            raise VerifyError(f"{info.name}: {key}.json label {label!r} is not in the manifest's labels")
        count, seconds, first, last = count + 1, seconds + dur, first or key, key
    if count != info.num_samples:
        raise VerifyError(f"{info.name}: {count} samples, manifest says {info.num_samples}; rebuild the split")
    if (first or "", last or "") != (info.first_key, info.last_key):
        raise VerifyError(f"{info.name}: keys {first}..{last}, manifest says {info.first_key}..{info.last_key}")
    if abs(seconds - info.seconds) > _SECONDS_TOL * max(1, count):
        raise VerifyError(f"{info.name}: {seconds:.3f} s of audio, manifest says {info.seconds:.3f} s")
    digest = sha256_file(path)
    if digest != info.sha256:
        raise VerifyError(f"{info.name}: sha256 {digest[:12]}... != manifest {info.sha256[:12]}...; "
                          f"the file changed after the build - rebuild the split")
    return seconds


def verify_split(directory: str | Path) -> SplitReport:
    directory = Path(directory)
    try:
        manifest = DatasetManifest.load(directory)
    except ManifestError as e:
        raise VerifyError(str(e)) from None
    listed = [s.name for s in manifest.shards]
    if len(set(listed)) != len(listed):
        raise VerifyError(f"{directory / 'manifest.json'}: a shard is listed twice; rebuild the split")
    unlisted = sorted(p.name for p in directory.glob(SHARD_GLOB) if p.name not in set(listed))
    if unlisted:
        raise VerifyError(f"{unlisted[0]}: shard in {directory} is not in the manifest; remove it or rebuild")
    seen: set[str] = set()
    seconds = sum(_check_shard(directory, info, manifest, seen) for info in manifest.shards)
    if len(seen) != manifest.num_samples:
        raise VerifyError(f"{directory / 'manifest.json'}: num_samples {manifest.num_samples} but the shards "
                          f"hold {len(seen)}")
    for labels in sorted(p for p in (directory / "labels").glob("*") if p.is_dir()):
        _check_labels(directory, labels, manifest)
    return SplitReport(manifest.split, directory, len(seen), seconds, len(listed))


def _check_labels(directory: Path, labels: Path, manifest: DatasetManifest) -> None:
    """Every audio shard has a label shard with the same keys in the same order, each with an int class."""
    for info in manifest.shards:
        label_shard = labels / label_shard_name(info.name)
        if not label_shard.is_file():
            raise VerifyError(f"{label_shard}: missing label shard for {info.name}; re-run the pseudolabel stage")
        audio_keys = (k for k, _ in iter_samples(directory / info.name, (manifest.codec, "json")))
        for i, ((key, group), audio_key) in enumerate(zip_longest(iter_samples(label_shard, ("cls", "json")),
                                                                  audio_keys, fillvalue=(None, None))):
            if key != audio_key or not group["cls"].strip().isdigit():
                raise VerifyError(f"{label_shard}: position {i} has key {key!r} (cls {group and group.get('cls')!r}) "
                                  f"where {info.name} has {audio_key!r}; re-run the pseudolabel stage")


def verify(path: str | Path) -> tuple[list[SplitReport], list[str]]:
    """Verify a split dir or every split dir in a folder -> (reports of good splits, error lines).
    Each bad split contributes one line 'split: ERROR <shard>: <problem>'. ManifestError if no split found."""
    dirs = find_split_dirs(path)
    if not dirs:
        raise ManifestError(f"{path}: no manifest.json here or in its sub-folders; is this a built dataset?")
    reports, errors = [], []
    for d in dirs:
        try:
            reports.append(verify_split(d))
        except VerifyError as e:
            errors.append(f"{d.name}: ERROR {e}")
    return reports, errors

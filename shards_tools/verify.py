"""Re-read a built dataset and check it against its manifest: members, key pairing, audio, counts, sha256.

Shard contents are only ever parsed as the manifest's codec (FLAC or WAV) or JSON; any other member
(.pyd, .pickle, ...) is an error, reported before anything else so a tampered shard names the offending
member. The manifest itself is checked too: its split is its folder's name, its totals are its shards'
sums, its labels are in the builder's order (the order is what gives each label its class id). Label
shards (SPLIT/labels/<run>/) are checked for the same keys in the same order, one per audio shard.
A folder that holds shards but no manifest.json is an incomplete split, and an error. A split whose shards
are sorted by label or source folder (mixing.py) gets a warning, not an error: it is sound, but training
batches drawn from it mix poorly.

Every error says what repairs it. A damaged shard is repaired by deleting it and re-running the command
that built the split: a build re-run rewrites only shards that are missing (one whose size is unchanged
passes its check and would be kept, damage and all), and always rewrites the manifest.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from shards_tools.build import RECORDS_DIR
from shards_tools.mixing import Mix, add_sample, split_mixes
from shards_tools.sources import builder_label_orders
from unfused_dist.audio.io import AudioDecodeError, decode_audio
from unfused_dist.data.source import label_shard_name
from unfused_dist.data.manifest import (MANIFEST_NAME, SHARD_GLOB, DatasetManifest, ManifestError, ShardInfo,
                                        find_split_dirs, sha256_file)

# the first bytes of each codec's stream: a WAV inside a .flac member would otherwise decode fine
MAGIC = {"flac": b"fLaC", "wav": b"RIFF"}
_SECONDS_TOL = 1e-3
LABEL_SHARD_GLOB = "labels-*.tar"


class VerifyError(Exception):
    """One-line description of the first problem found, naming the shard (and member) at fault."""


@dataclass
class SplitReport:
    split: str
    directory: Path
    clips: int
    seconds: float
    shards: int
    warnings: list[str] = field(default_factory=list)  # sound, but worth a rebuild (shards sorted by label)

    def line(self) -> str:
        return (f"{self.split}: OK {self.clips} clips, {self.seconds / 3600:.3f} h, "
                f"{self.shards} shards ({self.directory})")


def repair_hint(manifest: DatasetManifest | None, delete: list[Path] | tuple[Path, ...] = ()) -> str:
    """What repairs a split: delete the damaged files, then re-run the command that wrote it (recorded in
    its manifest). A build re-run redoes only missing shards, so a damaged one must be deleted first; a
    merge re-run (--overwrite) copies every shard again from its inputs."""
    command = manifest.build.command if manifest is not None else ""
    if (command.startswith("unfused-shards build") and manifest.build.order == "source"
            and "--keep-order" not in command.split()):
        command += " --keep-order"  # built in the source's order: without it the re-run would rewrite every shard
    first = f"delete {' '.join(str(p) for p in delete)} and " if delete else ""
    if command.startswith(("unfused-shards merge", "shards_tools.merge")):
        return f"{first}re-run the merge that wrote this split with --overwrite (`{command}`)"
    shown = f" (`{command}`)" if command.startswith("unfused-shards build") else ""
    return f"{first}re-run the same `unfused-shards build` command{shown}, which rewrites only missing shards"


def iter_samples(shard: Path, extensions: tuple[str, ...] = ("flac", "json"),
                 fix: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: payload}) per sample, strictly: regular members named <key>.<ext> for the given
    extensions only, each key's members consecutive (as WebDataset groups them) and complete.
    Errors end with `fix` (default: delete the shard and re-run its build)."""
    name, fix = shard.name, fix or repair_hint(None, [shard])
    try:
        with tarfile.open(shard, mode="r:") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    raise VerifyError(f"{name}: member {member.name!r} is not a regular file; {fix}")
                k, dot, ext = member.name.partition(".")
                if not dot or "/" in member.name or ext not in extensions:
                    allowed = " and ".join(f"<key>.{e}" for e in extensions)
                    raise VerifyError(f"{name}: foreign member {member.name!r} (only {allowed} are allowed; "
                                      f"nothing is unpickled); {fix}")
                if k != key:
                    if key is not None:
                        yield _complete(name, key, group, extensions, fix)
                    key, group = k, {}
                if ext in group:
                    raise VerifyError(f"{name}: duplicate member {member.name!r}; {fix}")
                group[ext] = tar.extractfile(member).read()
            if key is not None:
                yield _complete(name, key, group, extensions, fix)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise VerifyError(f"{name}: unreadable tar ({e}), the file is truncated or corrupt; {fix}") from None


def _complete(shard_name: str, key: str, group: dict[str, bytes], extensions: tuple[str, ...],
              fix: str) -> tuple[str, dict[str, bytes]]:
    missing = [e for e in extensions if e not in group]
    if missing:
        raise VerifyError(f"{shard_name}: key {key!r} has no .{missing[0]} member (or its members are not "
                          f"consecutive); {fix}")
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


def _check_manifest(directory: Path, manifest: DatasetManifest) -> None:
    """What the manifest says about itself, before any shard is read: a wrong split name, total or label
    order would mislead every reader even with intact shards."""
    where = directory / MANIFEST_NAME
    folder = Path(os.path.abspath(directory)).name  # `verify .` inside the split dir; a symlink keeps its name
    if manifest.split != folder:
        raise VerifyError(f"{where}: says split {manifest.split!r} but its folder is {folder!r}; rename the folder "
                          f"back to {manifest.split!r} (or rebuild the split into a folder of that name)")
    rewrite = repair_hint(manifest)  # a re-run rewrites the manifest from the shards' records
    listed = [s.name for s in manifest.shards]
    if len(set(listed)) != len(listed):
        raise VerifyError(f"{where}: a shard is listed twice; {rewrite}")
    count = sum(s.num_samples for s in manifest.shards)
    if manifest.num_samples != count:
        raise VerifyError(f"{where}: num_samples {manifest.num_samples} but its shards list {count}; {rewrite}")
    seconds = sum(s.seconds for s in manifest.shards)
    if abs(manifest.total_seconds - seconds) > _SECONDS_TOL:
        raise VerifyError(f"{where}: total_seconds {manifest.total_seconds:.6f} but its shards list "
                          f"{seconds:.6f}; {rewrite}")
    labels = manifest.labels
    if labels is not None and (len(set(labels)) != len(labels) or labels not in builder_label_orders(labels)):
        raise VerifyError(f"{where}: labels are not in the builder's order (sorted, without repeats), so class "
                          f"ids differ from the build's; {rewrite}")


def _check_shard(directory: Path, info: ShardInfo, manifest: DatasetManifest, seen: set[str],
                 mixes: list[Mix]) -> float:
    path = directory / info.name
    if not path.is_file():
        raise VerifyError(f"{info.name}: listed in the manifest but missing from {directory}; "
                          f"{repair_hint(manifest)}")
    fix = repair_hint(manifest, [path])
    count, seconds, first, last = 0, 0.0, None, None
    codec = manifest.codec
    for mix in mixes:
        mix.new_shard()
    for key, group in iter_samples(path, (codec, "json"), fix):
        if key in seen:
            raise VerifyError(f"{info.name}: key {key!r} appears twice in the split; {fix}")
        seen.add(key)
        try:
            meta = parse_meta(info.name, key, group["json"])
        except VerifyError as e:
            raise VerifyError(f"{e}; {fix}") from None
        try:
            if not group[codec].startswith(MAGIC.get(codec, b"?")):
                raise AudioDecodeError(f"not a {codec.upper()} stream")
            x, sr = decode_audio(group[codec])
        except AudioDecodeError as e:
            raise VerifyError(f"{info.name}: {key}.{codec}: {e.reason}; {fix}") from None
        if sr != manifest.sample_rate or x.shape[0] != 1:
            raise VerifyError(f"{info.name}: {key}.{codec} is {sr} Hz x {x.shape[0]} channels, "
                              f"manifest says {manifest.sample_rate} Hz mono; {fix}")
        dur = x.shape[1] / sr
        if abs(float(meta.get("duration", -1)) - dur) > _SECONDS_TOL:
            raise VerifyError(f"{info.name}: {key}.json duration {meta.get('duration')} != audio {dur:.6f} s; {fix}")
        _check_label(info.name, key, meta.get("label"), manifest, fix)
        add_sample(mixes, meta)
        count, seconds, first, last = count + 1, seconds + dur, first or key, key
    if count != info.num_samples:
        raise VerifyError(f"{info.name}: {count} samples, manifest says {info.num_samples}; {fix}")
    if (first or "", last or "") != (info.first_key, info.last_key):
        raise VerifyError(f"{info.name}: keys {first}..{last}, manifest says {info.first_key}..{info.last_key}; "
                          f"{fix}")
    if abs(seconds - info.seconds) > _SECONDS_TOL * max(1, count):
        raise VerifyError(f"{info.name}: {seconds:.3f} s of audio, manifest says {info.seconds:.3f} s; {fix}")
    digest = sha256_file(path)
    if digest != info.sha256:
        raise VerifyError(f"{info.name}: sha256 {digest[:12]}... != manifest {info.sha256[:12]}..., the file "
                          f"changed after the build; {fix}")
    return seconds


def _check_label(shard_name: str, key: str, label, manifest: DatasetManifest, fix: str) -> None:
    # no label is fine (a labelled source may leave some rows blank); any other label must have a class id
    if label is None:
        return
    if manifest.labels is None:
        raise VerifyError(f"{shard_name}: {key}.json has label {label!r} but the manifest has no labels; {fix}")
    if not isinstance(label, str) or label not in manifest.label_index:
        raise VerifyError(f"{shard_name}: {key}.json label {label!r} is not in the manifest's labels; {fix}")


def verify_split(directory: str | Path) -> SplitReport:
    directory = Path(directory)
    try:
        manifest = DatasetManifest.load(directory)
    except ManifestError as e:
        raise VerifyError(str(e)) from None
    _check_manifest(directory, manifest)
    listed = {s.name for s in manifest.shards}
    unlisted = sorted(p.name for p in directory.glob(SHARD_GLOB) if p.name not in listed)
    if unlisted:
        raise VerifyError(f"{unlisted[0]}: shard in {directory} is not in the manifest; delete "
                          f"{directory / unlisted[0]} (it is no part of this build)")
    seen: set[str] = set()
    mixes = split_mixes()
    seconds = sum(_check_shard(directory, info, manifest, seen, mixes) for info in manifest.shards)
    for labels in sorted(p for p in (directory / "labels").glob("*") if p.is_dir()):
        _check_labels(directory, labels, manifest)
    warnings = [f"{directory}: {mix.warning()}" for mix in mixes if mix.is_sorted()]
    return SplitReport(manifest.split, directory, len(seen), seconds, len(manifest.shards), warnings[:1])


def _check_labels(directory: Path, labels: Path, manifest: DatasetManifest) -> None:
    """Exactly one label shard per audio shard, with the same keys in the same order, each with an int class."""
    expected = {label_shard_name(info.name) for info in manifest.shards}
    extra = sorted(p.name for p in labels.glob(LABEL_SHARD_GLOB) if p.name not in expected)
    if extra:
        raise VerifyError(f"{labels / extra[0]}: label shard for no audio shard of {directory / MANIFEST_NAME}; "
                          f"delete it, or re-run the pseudolabel stage into a new labels folder")
    fix = "re-run the pseudolabel stage"
    for info in manifest.shards:
        label_shard = labels / label_shard_name(info.name)
        if not label_shard.is_file():
            raise VerifyError(f"{label_shard}: missing label shard for {info.name}; {fix}")
        audio_keys = (k for k, _ in iter_samples(directory / info.name, (manifest.codec, "json")))
        for i, ((key, group), audio_key) in enumerate(zip_longest(iter_samples(label_shard, ("cls", "json"), fix),
                                                                  audio_keys, fillvalue=(None, None))):
            if key != audio_key or not group["cls"].strip().isdigit():
                raise VerifyError(f"{label_shard}: position {i} has key {key!r} (cls {group and group.get('cls')!r}) "
                                  f"where {info.name} has {audio_key!r}; {fix}")


def incomplete_split_dirs(path: str | Path) -> list[Path]:
    """Folders with shards (or a build's records) but no manifest.json: a build that did not finish, or a
    manifest lost since. find_split_dirs skips them; a reader would never see their data."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST_NAME).is_file():
        return []
    candidates = [path, *sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))]
    return [d for d in candidates if not (d / MANIFEST_NAME).is_file()
            and (any(d.glob(SHARD_GLOB)) or (d / RECORDS_DIR).is_dir())]


def verify(path: str | Path) -> tuple[list[SplitReport], list[str]]:
    """Verify a split dir or every split dir in a folder -> (reports of good splits, error lines).
    Each bad split contributes one line 'split: ERROR <shard>: <problem>', an incomplete one (shards but no
    manifest) too. ManifestError if no split, complete or not, is found."""
    dirs, incomplete = find_split_dirs(path), incomplete_split_dirs(path)
    if not dirs and not incomplete:
        raise ManifestError(f"{path}: no manifest.json here or in its sub-folders; is this a built dataset?")
    reports, errors = [], []
    for d in dirs:
        try:
            reports.append(verify_split(d))
        except VerifyError as e:
            errors.append(f"{d.name}: ERROR {e}")
    for d in incomplete:
        errors.append(f"{d.resolve().name}: ERROR {d}: shards but no {MANIFEST_NAME}, so the split is incomplete "
                      f"(its build did not finish); {repair_hint(None)}")
    errors += _vocabulary_mismatches(dirs)
    return reports, errors


def _vocabulary_mismatches(dirs: list[Path]) -> list[str]:
    """The splits of one dataset share one label vocabulary (a build writes the union over all its splits),
    else one class id means two labels between train and test."""
    vocab = {}
    for d in dirs:
        try:
            vocab[d] = tuple(DatasetManifest.load(d).labels or ())
        except ManifestError:
            continue  # verify_split has reported it
    if len(set(vocab.values())) < 2:
        return []
    common = Counter(vocab.values()).most_common(1)[0][0]  # the odd ones out are reported
    like = next(d.name for d, v in vocab.items() if v == common)
    return [f"{d.name}: ERROR {d / MANIFEST_NAME}: its labels differ from {like}'s ({len(v)} against "
            f"{len(common)}), so class ids differ between splits; build all splits from one source, or merge "
            "them with `unfused-shards merge`" for d, v in vocab.items() if v != common]


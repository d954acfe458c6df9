"""Merge built datasets: OUT/<split>/ gets every input's shards for that split, renumbered, copied byte for byte.

No audio is decoded or re-encoded, so a shard's sha256 is the same before and after the merge; only the
manifest is new. Inputs are refused when they could not form one dataset (different sample rate or codec,
a key present in two inputs). Label shards (labels/ dirs) are not merged: re-run the pseudolabel stage.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from shards_tools.build import RECORDS_DIR, REJECTED_NAME
from shards_tools.verify import SplitReport, VerifyError, iter_samples
from unfused_dist.data.manifest import (
    MANIFEST_NAME,
    SHARD_GLOB,
    BuildInfo,
    DatasetManifest,
    ShardInfo,
    find_split_dirs,
    sha256_file,
    shard_name,
)


class MergeError(Exception):
    """The inputs cannot be merged (or OUT is in the way); one line, naming the inputs at fault."""


@dataclass(frozen=True)
class InputSplit:
    origin: str  # the input path as the user gave it: what error messages name
    directory: Path
    manifest: DatasetManifest


class MergeSummary(SplitReport):
    """The same counts verify reports, for the merged split."""

    def line(self) -> str:
        return (f"{self.split}: {self.clips} clips, {self.seconds / 3600:.3f} h, {self.shards} shards "
                f"-> {self.directory}")


def merge(inputs: list[str | Path], out: str | Path, *, overwrite: bool = False,
          command: str = "") -> list[MergeSummary]:
    """Merge INPUTS (dataset folders or split dirs) into OUT/<split>/; returns one summary per split.
    Raises MergeError (or ManifestError) before anything is written if the inputs do not fit together."""
    out = Path(out)
    if len(inputs) < 2:
        raise MergeError("give at least two inputs and an output folder")
    by_split = _group_by_split([_load_input(p) for p in inputs])
    _check_compatible([s for group in by_split.values() for s in group])
    for group in by_split.values():
        _check_disjoint_keys(group)
    _check_out(out, by_split, overwrite)
    labels = _label_union([s for group in by_split.values() for s in group])
    sources = shlex.join(os.path.abspath(p) for p in inputs)
    command = command or f"shards_tools.merge.merge({[str(p) for p in inputs]!r}, {str(out)!r})"
    return [_write_split(split, group, out / split, labels, sources, command) for split, group in by_split.items()]


def _load_input(path: str | Path) -> list[InputSplit]:
    dirs = find_split_dirs(path)
    if not dirs:
        raise MergeError(f"{path}: no manifest.json here or in its sub-folders; is this a built dataset?")
    return [InputSplit(str(path), d, DatasetManifest.load(d)) for d in dirs]


def _group_by_split(inputs: list[list[InputSplit]]) -> dict[str, list[InputSplit]]:
    """split -> its parts, in input order (which is also the shard order of the result)."""
    groups: dict[str, list[InputSplit]] = {}
    for parts in inputs:
        for part in parts:
            groups.setdefault(part.manifest.split, []).append(part)
    return groups


def _check_compatible(parts: list[InputSplit]) -> None:
    # all splits, not just same-named ones: a dataset has one sample rate and codec throughout
    first = parts[0]
    for part in parts[1:]:
        for what in ("sample_rate", "codec"):
            a, b = getattr(first.manifest, what), getattr(part.manifest, what)
            if a != b:
                raise MergeError(f"{what.replace('_', ' ')} differs: {first.origin} ({first.manifest.split}) has "
                                 f"{a}, {part.origin} ({part.manifest.split}) has {b}; rebuild one of them")


def _check_disjoint_keys(group: list[InputSplit]) -> None:
    # keys come from the shards themselves: a manifest only records each shard's first and last key
    owner: dict[str, str] = {}
    for part in group:
        for key in _keys(part):
            if key in owner:
                raise MergeError(f"key {key!r} (split {part.manifest.split}) is in both {owner[key]} and "
                                 f"{part.origin}; merge only datasets built from different files")
            owner[key] = part.origin


def _keys(part: InputSplit) -> list[str]:
    keys = []
    for path in part.manifest.shard_paths(part.directory):
        try:
            keys.extend(key for key, _ in iter_samples(path, (part.manifest.codec, "json")))
        except VerifyError as e:
            raise MergeError(f"{part.origin}: {e}") from None
    return keys


def _check_out(out: Path, by_split: dict[str, list[InputSplit]], overwrite: bool) -> None:
    existing = find_split_dirs(out)
    if existing and not overwrite:
        raise MergeError(f"{out}: already holds a dataset ({', '.join(d.name for d in existing)}); "
                         f"pass --overwrite to replace it")
    # with --overwrite, writing into an input would delete the shards we are about to copy
    for split, group in by_split.items():
        target = (out / split).resolve()
        for part in group:
            if part.directory.resolve() == target:
                raise MergeError(f"{out}: is the input {part.origin} ({split}); choose another output folder")


def _label_union(parts: list[InputSplit]) -> list[str] | None:
    # one vocabulary for every split (as build does), so class ids agree between train, val and test
    labels = {lab for p in parts for lab in (p.manifest.labels or [])}
    return sorted(labels) or None


def _write_split(split: str, group: list[InputSplit], directory: Path, labels: list[str] | None,
                 sources: str, command: str) -> MergeSummary:
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory)
    shards: list[ShardInfo] = []
    for part in group:
        for info in part.manifest.shards:
            shards.append(_copy_shard(part, info, directory, shard_name(len(shards))))
    first = group[0].manifest
    manifest = DatasetManifest(
        split=split,
        sample_rate=first.sample_rate,
        codec=first.codec,
        num_samples=sum(s.num_samples for s in shards),
        total_seconds=round(sum(s.seconds for s in shards), 6),
        labels=labels,
        shards=shards,
        build=BuildInfo(
            command=command,
            source=sources,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 - UTC alias is 3.11+
            rejected=sum(p.manifest.build.rejected for p in group),
        ),
    )
    manifest.save(directory)  # last: its presence marks the split complete
    return MergeSummary(split, directory, manifest.num_samples, manifest.total_seconds, len(shards))


def _copy_shard(part: InputSplit, info: ShardInfo, directory: Path, name: str) -> ShardInfo:
    tmp, final = directory / f".{name}.tmp", directory / name
    try:
        shutil.copyfile(part.directory / info.name, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the manifest (written later) must never describe unflushed data
        # hashing the copy catches an input changed since its build, which would make the manifest lie
        digest = sha256_file(tmp)
        if digest != info.sha256:
            raise MergeError(f"{part.origin}: {info.name} no longer matches its manifest (sha256); "
                             f"run `unfused-shards verify` on it")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardInfo(name, info.num_samples, info.seconds, info.sha256, info.first_key, info.last_key)


def _remove_stale(directory: Path) -> None:
    """Manifest first, so a crash mid-way never leaves a manifest describing shards that are gone.
    labels/ is left alone: label shards are not merged, and deleting a user's folder is not ours to do."""
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    (directory / REJECTED_NAME).unlink(missing_ok=True)  # it listed the old build's rejects
    for p in list(directory.glob(SHARD_GLOB)) + list(directory.glob(".audio-*.tar.tmp")):
        p.unlink()
    shutil.rmtree(directory / RECORDS_DIR, ignore_errors=True)  # a build's records describe other shards

"""Merge built datasets: OUT/<split>/ gets every input's shards for that split, renumbered, copied byte for byte.

No audio is decoded or re-encoded, so a shard's sha256 is the same before and after the merge; only the
manifest is new. Inputs are refused when they could not form one dataset (different sample rate or codec,
a key present in two inputs, a shard that no longer matches its manifest). Label shards (labels/ dirs) are
not merged: re-run the pseudolabel stage.

OUT is never left with a half-written split: every split is written complete (shards, then its manifest) into
a staging folder, OUT/.merge-staging/, and only then swapped in, split by split, with two renames each. A
failure before the swap (a bad input, a full disk) removes the staging folder and leaves OUT as it was; one
during the swap (a few renames) says which splits are merged and what waits in the staging folder.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from shards_tools.build import RECORDS_DIR, REJECTED_NAME
from shards_tools.sources import sort_labels
from shards_tools.verify import SplitReport, VerifyError, iter_samples, repair_hint
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

STAGING_DIR = ".merge-staging"  # inside OUT: same file system (renames are atomic), and no split dir of OUT


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
    Raises MergeError (or ManifestError) before anything is written if the inputs do not fit together, or
    if an input shard is missing or no longer matches its manifest's sha256. With --overwrite, the old
    OUT/<split> dirs are replaced only once every new split is complete; OUT/rejected.jsonl goes (a merge
    rejects nothing of its own)."""
    out = Path(out)
    if len(inputs) < 2:
        raise MergeError("give at least two inputs and an output folder")
    by_split = _group_by_split([_load_input(p) for p in inputs])
    parts = [s for group in by_split.values() for s in group]
    _check_compatible(parts)
    for part in parts:
        _check_shards_intact(part)
    for group in by_split.values():
        _check_disjoint_keys(group)
    _check_out(out, by_split, overwrite)
    labels = _label_union(parts)
    sources = shlex.join(os.path.abspath(p) for p in inputs)
    command = command or f"shards_tools.merge.merge({[str(p) for p in inputs]!r}, {str(out)!r})"
    created = not out.exists()
    staging = out / STAGING_DIR
    _check_no_parked_split(staging)
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # new splits of a merge killed before its swap
        staging.mkdir()
        summaries = [_write_split(split, group, staging / split, labels, sources, command)
                     for split, group in by_split.items()]
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, OSError):
            raise MergeError(f"{out}: writing the merge failed ({e}); nothing in {out} was changed") from None
        raise
    for s in summaries:
        try:
            _swap_in(s.directory, out / s.split)
        except OSError as e:
            raise MergeError(f"{out / s.split}: swapping the merged split in failed ({e}); the splits before it "
                             f"are merged, the rest wait in {staging}: see its contents before merging again") from None
        s.directory = out / s.split
    (out / REJECTED_NAME).unlink(missing_ok=True)  # it listed the rejections of the build that wrote OUT before
    shutil.rmtree(staging, ignore_errors=True)
    return summaries


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


def _check_shards_intact(part: InputSplit) -> None:
    """Every shard of an input is there with the bytes its manifest records (sha256, which covers the size:
    the manifest records none), checked before OUT is touched; the copies are hashed again as written."""
    for info in part.manifest.shards:
        path = part.directory / info.name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif sha256_file(path) != info.sha256:
            problem = "no longer matches its manifest (sha256)"
        if problem:
            raise MergeError(f"{part.origin}: {path} {problem}; repair that input first "
                             f"({repair_hint(part.manifest, [path] if path.is_file() else [])})")


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
            keys.extend(key for key, _ in iter_samples(path, (part.manifest.codec, "json"),
                                                       repair_hint(part.manifest, [path])))
        except VerifyError as e:
            raise MergeError(f"{part.origin}: {e}") from None
    return keys


def _check_out(out: Path, by_split: dict[str, list[InputSplit]], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out}: is a file; choose a folder for the merged dataset")
    existing = find_split_dirs(out)
    if existing and not overwrite:
        raise MergeError(f"{out}: already holds a dataset ({', '.join(d.name for d in existing)}); "
                         f"pass --overwrite to replace it")
    linked = [split for split in by_split if (out / split).is_symlink()]
    if linked:  # the swap renames the link, and the user's files behind it may sit on another file system
        raise MergeError(f"{out / linked[0]}: is a symbolic link; merge into a folder of plain split folders")
    left = [d.name for d in existing if d != out and d.name not in by_split]
    if left:  # they would stay beside the new splits with the old vocabulary: one dataset that is two
        raise MergeError(f"{out}: holds split(s) {', '.join(left)} that the inputs do not have; remove them or "
                         "merge into another folder")
    # with --overwrite, the swap would move away the very shards we copy from
    for split, group in by_split.items():
        target = (out / split).resolve()
        for part in group:
            if part.directory.resolve() in (target, out.resolve()):
                raise MergeError(f"{out}: is the input {part.origin} ({split}); choose another output folder")


def _label_union(parts: list[InputSplit]) -> list[str] | None:
    # one vocabulary for every split, in the builder's order, so class ids agree between train, val and test
    # (and with the inputs' own, where they had all the labels)
    labels = {lab for p in parts for lab in (p.manifest.labels or [])}
    return sort_labels(labels) or None


def _write_split(split: str, group: list[InputSplit], directory: Path, labels: list[str] | None,
                 sources: str, command: str) -> MergeSummary:
    """The whole merged split in DIRECTORY (a fresh staging folder): shards, then the manifest."""
    directory.mkdir()
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
            order="merged",
        ),
    )
    manifest.save(directory)  # last: its presence marks the split complete
    return MergeSummary(split, directory, manifest.num_samples, manifest.total_seconds, len(shards))


def _copy_shard(part: InputSplit, info: ShardInfo, directory: Path, name: str) -> ShardInfo:
    final = directory / name
    shutil.copyfile(part.directory / info.name, final)
    with open(final, "rb") as f:
        os.fsync(f.fileno())  # the manifest (written later) must never describe unflushed data
    # hashing the copy catches an input changed since it was checked, which would make the manifest lie
    if sha256_file(final) != info.sha256:
        raise MergeError(f"{part.origin}: {info.name} changed during the merge (sha256); nothing in the output "
                         f"was changed - run `unfused-shards verify` on {part.directory}")
    return ShardInfo(name, info.num_samples, info.seconds, info.sha256, info.first_key, info.last_key)


def _is_build_output(p: Path) -> bool:
    """What a build or merge wrote into a split dir (replaced by the merge); anything else is the user's."""
    return (p.name in (MANIFEST_NAME, REJECTED_NAME, RECORDS_DIR) or p.match(SHARD_GLOB)
            or (p.name.startswith(".") and p.name.endswith(".tmp")))


def _swap_in(new: Path, target: Path) -> None:
    """Replace TARGET (an old split dir, if any) by the complete NEW one: two renames, so OUT/<split> is at
    every moment the old split or the new, each with its own manifest (or, between the renames, absent, the
    old one parked as <staging>/<split>.old, which the next merge refuses to clear). Then labels/ and any other
    files of the user move over unchanged: label shards are not merged, and deleting a user's folder is not
    ours to do (verify reports label shards that no longer align)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = new.parent / f"{new.name}.old"
    os.replace(target, old)
    os.replace(new, target)
    for p in list(old.iterdir()):
        if not _is_build_output(p):
            os.replace(p, target / p.name)
    shutil.rmtree(old)


def _check_no_parked_split(staging: Path) -> None:
    """A merge stopped between its renames parks an old split in the staging folder: never clear it."""
    parked = sorted(staging.glob("*.old")) if staging.is_dir() else []
    if parked:
        raise MergeError(f"{staging}: holds {', '.join(p.name for p in parked)}, left by a merge stopped while "
                         f"swapping splits in (an old split, or the user's files in it); move what you want to keep "
                         f"back into {staging.parent}, then remove {staging}")

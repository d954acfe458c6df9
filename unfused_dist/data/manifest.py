"""The on-disk dataset contract: one split per directory, described by manifest.json.

    SPLIT_DIR/manifest.json
    SPLIT_DIR/audio-000000.tar, audio-000001.tar, ...   (WebDataset: <key>.flac + <key>.json)

The manifest is written last (atomically), so a directory with a manifest is a complete build.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnfusedError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "audio-{:06d}.tar"
SHARD_GLOB = "audio-*.tar"


class ManifestError(UnfusedError):
    """A manifest that is missing, unreadable or of an unknown format; the message names the file."""


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    seconds: float
    sha256: str
    first_key: str
    last_key: str


@dataclass(frozen=True)
class BuildInfo:
    command: str
    source: str
    created: str  # ISO 8601, UTC
    rejected: int = 0
    # How samples were dealt to shards: "shuffled" (seeded random order, `seed`), "source" (the source's
    # order: `--keep-order`, and every build before the field existed) or "merged" (each input's shards kept)
    order: str = "source"
    seed: int | None = None


@dataclass
class DatasetManifest:
    split: str
    sample_rate: int
    codec: str
    num_samples: int
    total_seconds: float
    labels: list[str] | None
    shards: list[ShardInfo]
    build: BuildInfo
    format_version: int = FORMAT_VERSION
    _label_index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def label_index(self) -> dict[str, int]:
        """label -> class id, in vocabulary order; empty for an unlabelled dataset."""
        if self._label_index is None:
            self._label_index = {lab: i for i, lab in enumerate(self.labels or [])}
        return self._label_index

    def shard_paths(self, directory: str | Path) -> list[Path]:
        return [Path(directory) / s.name for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "split": self.split,
            "sample_rate": self.sample_rate,
            "codec": self.codec,
            "num_samples": self.num_samples,
            "total_seconds": self.total_seconds,
            "labels": self.labels,
            "shards": [asdict(s) for s in self.shards],
            "build": asdict(self.build),
        }

    def save(self, directory: str | Path) -> Path:
        """Write DIR/manifest.json atomically (temp file + os.replace) so readers never see half a file."""
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetManifest":
        """Read DIR/manifest.json (DIR may also be the manifest file itself)."""
        path = Path(directory)
        if path.is_dir() or not path.name.endswith(".json"):
            path = path / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no manifest; build the split with `unfused-shards build`") from None
        except (OSError, ValueError) as e:
            raise ManifestError(f"{path}: unreadable manifest ({e}); rebuild the split") from None
        try:
            return cls._from_json(raw)
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{path}: invalid manifest ({type(e).__name__}: {e}); rebuild the split") from None

    @classmethod
    def _from_json(cls, raw: dict[str, Any]) -> "DatasetManifest":
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"unknown format_version {version!r} (this code reads {FORMAT_VERSION}); rebuild or upgrade"
            )
        labels = raw["labels"]
        if labels is not None and not all(isinstance(lab, str) for lab in labels):
            raise ValueError("labels must be a list of strings or null")
        return cls(
            split=str(raw["split"]),
            sample_rate=int(raw["sample_rate"]),
            codec=str(raw["codec"]),
            num_samples=int(raw["num_samples"]),
            total_seconds=float(raw["total_seconds"]),
            labels=list(labels) if labels is not None else None,
            shards=[_shard_info(s) for s in raw["shards"]],
            build=BuildInfo(**raw["build"]),
            format_version=int(version),
        )


def _shard_info(raw: dict[str, Any]) -> ShardInfo:
    """A shard's entry, its field types checked: a hand-edited manifest must fail here, in one line, not as a
    TypeError deep in whatever sums its counts."""
    info = ShardInfo(**raw)
    texts = (info.name, info.sha256, info.first_key, info.last_key)
    if (not isinstance(info.num_samples, int) or not isinstance(info.seconds, (int, float))
            or not all(isinstance(t, str) for t in texts)):
        raise ValueError(f"shard {raw.get('name')!r} has a field of the wrong type")
    return info


def is_split_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def find_split_dirs(path: str | Path) -> list[Path]:
    """A split dir itself, or the split dirs directly inside a dataset folder (sorted)."""
    path = Path(path)
    if is_split_dir(path):
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and is_split_dir(p))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a dataset is meant to be read by other users/jobs
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

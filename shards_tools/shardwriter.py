"""Deterministic WebDataset tar writer: same samples in, byte-identical shards (same sha256) out.

Why not webdataset.TarWriter: it stamps the current time and user into every header. Here every header
has mtime 0, uid/gid 0, no user names, mode 0644; members are written in the order given.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from unfused_dist.data.manifest import ShardInfo, sha256_file, shard_name

_BLOCK = tarfile.BLOCKSIZE  # 512


def _member_size(payload: bytes) -> int:
    """Bytes a member takes in the tar: one header block + data padded to a block."""
    return _BLOCK + -(-len(payload) // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes audio-000000.tar, audio-000001.tar, ... into `directory`, each built under a temporary
    name and renamed into place when complete, so a crash never leaves a half shard under a real name."""

    def __init__(self, directory: str | Path, max_samples: int = 1000, max_bytes: int | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.directory = Path(directory)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self.total_bytes = 0
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        self._seconds = 0.0
        self._first = self._last = ""

    def add(self, key: str, members: list[tuple[str, bytes]], seconds: float) -> None:
        """Add one sample: members are (extension, payload) pairs, written as <key>.<ext> in order."""
        incoming = sum(_member_size(data) for _, data in members)
        if self._tar is not None and (
            self._count >= self.max_samples
            or (self.max_bytes is not None and self._file.tell() + incoming > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        if self._count == 0:
            self._first = key
        self._last = key
        self._count += 1
        self._seconds += seconds

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (on an exception): finished shards stay, the temp file goes."""
        if self._tar is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def _open(self) -> None:
        name = shard_name(len(self.shards))
        self._tmp = self.directory / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        # PAX only adds an extended header when a name exceeds ustar's 100 chars: still deterministic.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count, self._seconds = 0, 0.0

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; does not close our file object
        self._file.flush()
        os.fsync(self._file.fileno())  # the manifest (written later) must never describe unflushed data
        self._file.close()
        name = shard_name(len(self.shards))
        final = self.directory / name
        os.replace(self._tmp, final)
        self.total_bytes += final.stat().st_size
        self.shards.append(
            ShardInfo(
                name=name,
                num_samples=self._count,
                seconds=round(self._seconds, 6),
                sha256=sha256_file(final),
                first_key=self._first,
                last_key=self._last,
            )
        )
        self._tar = None

"""Stage artefact directories: `done.json` written last (atomic rename) marks a finished stage."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UnfusedError
from .log import logger

DONE = "done.json"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_done(directory: Path) -> bool:
    return (Path(directory) / DONE).is_file()


def read_done(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / DONE).read_text())


def mark_done(directory: Path, info: dict[str, Any]) -> None:
    atomic_write_text(Path(directory) / DONE, json.dumps({"finished": time.time(), **info}, indent=1))


RESUMABLE = ("ckpt", "embeddings")  # sub-dirs whose contents check themselves (checkpoints, embedding dumps)


def reset(directory: Path, keep_checkpoints: bool = True) -> None:
    """A stage dir without done.json is from a run killed half-way: its artefacts are not trusted, except
    the RESUMABLE sub-dirs (kept if asked), which validate themselves piece by piece so that work resumes."""
    directory = Path(directory)
    if directory.exists() and not is_done(directory):
        for child in directory.iterdir():
            if child.name in RESUMABLE and keep_checkpoints:
                continue
            # several ranks may reset the same directory at once: what another removed is not an error
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)


@contextmanager
def exclusive_lock(path: Path, busy: str | None = None, unlocked: str = "run one at a time"):
    """Hold an exclusive flock on `path` for the block; it goes when the file closes, also if the process
    dies. busy=None waits for the lock; otherwise, when another process holds it, UnfusedError(busy) at
    once. A file system without locks (e.g. Lustre mounted noflock): a warning ending in `unlocked`, and the
    block runs unlocked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy is not None else 0))
        except BlockingIOError:
            raise UnfusedError(busy) from None
        except OSError as e:
            logger("artefacts").warning(f"{path}: cannot lock ({e.strerror}); {unlocked}")
        yield


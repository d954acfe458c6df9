"""Library messages, in one format: `[where] message` on stdout, `[where] WARNING: message` on stderr.

Modules log through `logger("where")` (or `logging.getLogger(__name__)`, whose last name part is then the
`where`); the command-line entry points call `setup()` once. A program that imports the library and
configures logging itself gets the same records under the `unfused_dist` logger. Progress bars (tqdm,
stderr) are not log messages and stay as they are.
"""
from __future__ import annotations

import logging
import sys

ROOT = "unfused_dist"


def logger(where: str) -> logging.LoggerAdapter:
    """A logger whose messages read `[where] ...` (where: a stage, 'pipeline', 'checkpoint', ...)."""
    return logging.LoggerAdapter(logging.getLogger(f"{ROOT}.{where}"), {"where": where})


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        where = getattr(record, "where", record.name.rsplit(".", 1)[-1])
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[{where}] {level}{record.getMessage()}"


class _Streams(logging.Handler):
    """INFO to stdout, WARNING and above to stderr: the streams as they are when a record is emitted (a
    test's capture, a redirected stdout), each flushed at once so the messages keep their order with the
    stages' own output."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup(level: int = logging.INFO) -> None:
    """Send the library's messages to stdout/stderr (idempotent)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(isinstance(h, _Streams) for h in root.handlers):
        handler = _Streams()
        handler.setFormatter(_Format())
        root.addHandler(handler)

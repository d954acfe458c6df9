"""Fetch Debian packages into a local cache without installing them (``apt-get download`` + ``dpkg -x``).

Each package lands in ``CACHE/PKG/root`` (the extracted tree) with its licence at ``CACHE/PKG/copyright``,
because several sources are GPL / CC-BY-SA and the licence has to travel with the audio.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("UNFUSED_SOURCES_CACHE", "~/.cache/unfused-dist/sources")).expanduser()

_updated = False  # run `apt-get update` at most once per process


class SourceError(RuntimeError):
    """A source package or tool cannot be obtained; the message is one line meant for the user."""


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SourceError(f"`{tool}` not found: install the Debian package `{package}` "
                          f"(sudo apt-get install {package}) or run scripts/setup.sh")
    return path


def _download(pkg: str, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", "-q", pkg], cwd=workdir, capture_output=True, text=True)


def _apt_update() -> None:
    global _updated
    _updated = True
    cmd = ["apt-get", "update", "-qq"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", "-n"] + cmd  # -n: never hang on a password prompt inside a batch job
    subprocess.run(cmd, capture_output=True, text=True)


def fetch(pkg: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Return ``CACHE/PKG/root`` with the package's files, downloading it on first use."""
    dest = Path(cache) / pkg
    if (dest / ".extracted").exists():
        return dest / "root"
    require_tool("apt-get", "apt")
    require_tool("dpkg", "dpkg")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{pkg}-", dir=dest.parent) as tmp:
        work = Path(tmp)
        res = _download(pkg, work)
        if res.returncode != 0 and not _updated:
            _apt_update()  # the usual cause is a container without package lists
            res = _download(pkg, work)
        debs = sorted(work.glob("*.deb"))
        if res.returncode != 0 or not debs:
            last = (res.stderr.strip().splitlines() or ["no .deb produced"])[-1]
            raise SourceError(f"cannot fetch Debian package `{pkg}` with `apt-get download` ({last}); "
                              f"check access to a Debian mirror and run `apt-get update`")
        staged = work / "pkg"
        staged.mkdir()
        res = subprocess.run(["dpkg", "-x", str(debs[0]), str(staged / "root")], capture_output=True, text=True)
        if res.returncode != 0:
            raise SourceError(f"cannot extract `{debs[0].name}` with `dpkg -x`: {res.stderr.strip()}")
        _copy_licence(pkg, staged)
        (staged / ".extracted").write_text(debs[0].name + "\n")
        if dest.exists():  # a half-written earlier attempt: replace it
            shutil.rmtree(dest)
        os.replace(staged, dest)  # atomic, so a concurrent or interrupted run never sees half a package
    return dest / "root"


def _copy_licence(pkg: str, staged: Path) -> None:
    doc = staged / "root" / "usr" / "share" / "doc"
    candidates = [doc / pkg / "copyright"] + sorted(doc.glob("*/copyright"))
    for c in candidates:
        if c.is_file():
            shutil.copyfile(c, staged / "copyright")
            return
    (staged / "copyright").write_text(f"{pkg}: no debian/copyright in the .deb; see "
                                      f"https://packages.debian.org/source/{pkg}\n")


def licence_summary(pkg: str, cache: Path = DEFAULT_CACHE) -> str:
    """The distinct `License:` names of a package's machine-readable copyright file (or '?')."""
    path = Path(cache) / pkg / "copyright"
    names: list[str] = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("License:"):
                name = line.split(":", 1)[1].strip()
                if name and name not in names:
                    names.append(name)
    return ", ".join(names) or "see copyright file"


def keep_installed_licence(pkg: str, cache: Path = DEFAULT_CACHE) -> None:
    """Tools used from the system (espeak-ng, flite) get their licence copied beside the cache too."""
    dest = Path(cache) / pkg / "copyright"
    src = Path("/usr/share/doc") / pkg / "copyright"
    if not dest.is_file() and src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

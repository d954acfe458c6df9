"""pytest plugin: a real single-node SLURM cluster for the session (``scripts/slurm_local.sh``).

Load it with ``pytest_plugins = ["slurm_cluster"]`` in tests/conftest.py (tests/ is on sys.path there),
or ``-p slurm_cluster`` with tests/ on PYTHONPATH. The fixture ``slurm_cluster`` gives every test the same
session-wide cluster (and cancels the jobs a test leaves behind). The first use starts munged, MariaDB +
slurmdbd (so ``sacct`` and submitit's ``job.state`` work), slurmctld and slurmd under a temporary directory,
sets ``os.environ["SLURM_CONF"]`` for the session (restored afterwards) and yields a :class:`SlurmCluster`.
Teardown stops everything and fails if any daemon survives.
Missing SLURM packages are a failure, not a skip: CI installs them with ``make setup``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
DAEMONS = ("munged", "mariadbd", "mysqld", "slurmdbd", "slurmctld", "slurmd", "slurmstepd")
PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sinfo", "squeue", "scancel",
            "scontrol", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db", "mariadb-admin")


@dataclass
class SlurmCluster:
    dir: Path  # everything of the cluster lives here (logs in dir/"log")
    conf: Path  # dir/"slurm.conf"
    env: dict = field(default_factory=dict)  # os.environ + SLURM_CONF: pass to subprocesses
    startup_s: float = 0.0  # how long `slurm_local.sh start` took

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command (sinfo, sacct, scontrol, ...) against this cluster; its stdout."""
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def job_state(self, job_id: str, source: str = "sacct") -> str:
        """The job's state, e.g. COMPLETED, FAILED, RUNNING, PENDING, REQUEUED; '' if unknown.

        source="sacct": accounting (slurmdbd), kept after the job left the controller; it lags the
        controller by up to a few seconds. source="squeue": the controller's live view (a finished job
        stays there for MinJobAge=300 s)."""
        if source == "squeue":
            out = self.run("squeue", "-h", "-t", "all", "-o", "%T", "-j", str(job_id), check=False)
        else:
            out = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id), check=False)
        states = [s.split()[0] for s in out.splitlines() if s.strip()]
        return states[-1] if states else ""

    def wait_state(self, job_id: str, states=("COMPLETED",), timeout: float = 30, source: str = "sacct") -> str:
        """Poll until the job reaches one of `states`; the state, or AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id, source)
            if state in states:
                return state
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} is {state or 'unknown'} ({source}) after {timeout} s, expected "
                             f"{states}; logs in {self.dir / 'log'}")

    def log(self, name: str = "slurmctld") -> str:
        p = self.dir / "log" / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""


def cluster_processes(d: Path) -> list[str]:
    """Live (non-zombie) SLURM/munge/MariaDB processes that belong to the cluster in `d`: their command
    line or environment names `d`, or they hold a file or a unix socket under `d` open (slurmstepd)."""
    d_slash = str(d).rstrip("/") + "/"
    mark = f"SLURM_LOCAL_DIR={str(d).rstrip('/')}".encode()
    socks = set()  # unix sockets bound under d (munge, mariadb, slurmstepd's step sockets)
    try:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[7].startswith(d_slash):
                socks.add(f"socket:[{f[6]}]")
    except OSError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if comm not in DAEMONS:
                continue
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = d_slash in cmdline + " " or mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if not ours:
                fds = os.listdir(f"/proc/{pid}/fd")
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
                ours = any(x.startswith(d_slash) or x in socks for x in links)
        except OSError:
            continue  # gone meanwhile, or not readable
        if ours:
            found.append(f"{pid} {comm} {cmdline.strip()}")
    return found


def _missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


@pytest.fixture
def slurm_cluster(_slurm_session):
    """The session's cluster, left empty for the next test: jobs a test leaves queued or running (it
    failed, or timed out waiting) are cancelled, so they cannot hold the node's CPUs in later tests."""
    yield _slurm_session

    def queued() -> list[str]:  # squeue lists unfinished jobs only (and completing ones)
        return _slurm_session.run("squeue", "-h", "-o", "%i", check=False).split()

    left = queued()
    if left:
        # by base id: scancel refuses squeue's form of an array's pending tasks (12_[0-3%4]) and then
        # cancels nothing
        _slurm_session.run("scancel", *sorted({j.split("_")[0] for j in left}), check=False)
        deadline = time.monotonic() + 120
        while queued():
            assert time.monotonic() < deadline, f"jobs {left} still in the queue 120 s after scancel"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def _slurm_session(tmp_path_factory):
    missing = _missing_programs()
    if missing:
        pytest.fail(f"SLURM test cluster: programs missing ({', '.join(missing)}); run `make setup` "
                    "(apt: slurmctld slurmd slurm-client munge slurmdbd mariadb-server)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("SLURM test cluster: needs root (SlurmUser=root on this machine)", pytrace=False)
    d = tmp_path_factory.mktemp("slurm", numbered=True)
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=300)
    if p.returncode:
        left = cluster_processes(d)
        pytest.fail(f"SLURM test cluster did not start (exit {p.returncode}):\n{p.stderr}"
                    + (f"\nleft-over processes: {left}" if left else ""), pytrace=False)
    conf = d / "slurm.conf"
    assert p.stdout.strip() == f"export SLURM_CONF={conf}", p.stdout
    startup_s = time.monotonic() - t0
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(dir=d, conf=conf, env={**os.environ, "SLURM_CONF": str(conf)}, startup_s=startup_s)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        stop = subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=300)
        left = cluster_processes(d)
        assert stop.returncode == 0 and not left, (
            f"SLURM test cluster stop exited {stop.returncode}:\n{stop.stderr}\nsurviving processes: {left}")

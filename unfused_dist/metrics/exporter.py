"""Prometheus metrics of one rank of one stage (the "Metrics contract" in docs/ARCHITECTURE.md).

`start_exporter` serves this rank's metrics over HTTP and writes a Prometheus `file_sd` target file for
it, so a Prometheus server pointed at the targets directory (configs/prometheus.yml) finds every rank of
every job, also on SLURM nodes whose ports are chosen by the OS. Code that records metrics holds a
`Metrics` (the no-op `NULL` when metrics are off), so it never checks whether metrics are enabled.

Each exporter has its own CollectorRegistry, not prometheus_client's global one: several stages (or
tests) in one process would otherwise collide on the metric names.
"""
from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server

from ..artefacts import atomic_write_text
from ..config import Config, MetricsConfig, RunConfig
from ..errors import UnfusedError
from ..run_layout import RunLayout

LABELS = ("stage", "rank", "job")
# Bind addresses that mean "every interface".
_ANY_ADDRESS = ("", "0.0.0.0", "::")


class ExporterError(UnfusedError, OSError):
    """The exporter cannot serve or write its target file; the message says which setting to change."""


class Metrics:
    """What training code calls. This base class records nothing (metrics disabled, or no exporter);
    PrometheusMetrics records. Methods are cheap and thread-safe."""

    def step(self, samples: int, audio_seconds: float, step_s: float, data_s: float, loss: float,
             lr: float) -> None:
        """One optimizer micro-step of this rank: `samples` clips of `audio_seconds` audio in all, `data_s`
        seconds waiting for the batch, `step_s` seconds of forward/backward/step."""

    def checkpoint(self) -> None:
        """A checkpoint was saved."""

    def bad_sample(self, reason: str, count: int = 1) -> None:
        """`count` samples skipped because they could not be used (`reason`: a short word, e.g. decode)."""

    def kmeans(self, iteration: int, objective: float) -> None:
        """A k-means iteration finished with this objective (sum of squared distances)."""

    def close(self) -> None:
        """Stop serving and remove the target file (idempotent)."""

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NULL = Metrics()


class PrometheusMetrics(Metrics):
    """The contract's metrics for one (stage, rank, job), on a registry of their own. `serve()` starts
    the HTTP endpoint; without it the metrics are only recorded (tests read `registry` directly)."""

    def __init__(self, stage: str, rank: int, job: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"stage": stage, "rank": str(rank), "job": job}
        self.address: tuple[str, int] | None = None  # (host, port) a scraper connects to, once served
        self.target_file: Path | None = None
        self._target_text = ""  # what this process wrote there: close() removes the file only if it still is
        self._server = self._thread = None
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux /proc): the host-memory
        # counterpart of gpu_memory_bytes, and a CPU-time view of a stalled job
        ProcessCollector(registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()):
            return Counter(name, doc, LABELS + extra, registry=self.registry)

        def gauge(name: str, doc: str):
            # The parent: its one series appears on the first set(), so a stage without k-means (or before
            # its first step) exports no kmeans_objective / loss rather than a misleading 0.
            return Gauge(name, doc, LABELS, registry=self.registry)

        self._samples = counter("unfused_samples_total", "Training clips consumed").labels(**self.labels)
        self._audio = counter("unfused_audio_seconds_total",
                              "Seconds of audio consumed (rate() of it is the throughput)").labels(**self.labels)
        self._steps = counter("unfused_steps_total", "Training micro-steps").labels(**self.labels)
        self._data_wait = counter("unfused_data_wait_seconds_total",
                                  "Seconds the training loop waited for the next batch").labels(**self.labels)
        self._step_time = counter("unfused_step_seconds_total",
                                  "Seconds of forward, backward and optimizer step").labels(**self.labels)
        self._checkpoints = counter("unfused_checkpoints_total", "Checkpoints saved").labels(**self.labels)
        self._bad = counter("unfused_bad_samples_total", "Samples skipped as unusable, by reason", ("reason",))
        self._loss = gauge("unfused_loss", "Training loss of the last step")
        self._lr = gauge("unfused_learning_rate", "Learning rate of the last step")
        self._last_step = gauge("unfused_last_step_timestamp_seconds",
                                "Unix time of the last finished step (time() minus it: a stall)")
        self._gpu = gauge("unfused_gpu_memory_bytes",
                          "Peak GPU memory allocated by torch in this process (torch.cuda.max_memory_allocated); "
                          "0 without CUDA, see process_resident_memory_bytes for host memory")
        self._kmeans_iteration = gauge("unfused_kmeans_iteration", "Last finished k-means iteration (1-based)")
        self._kmeans_objective = gauge("unfused_kmeans_objective",
                                       "k-means objective (sum of squared distances) of the last iteration")
        self._set(self._gpu, _gpu_memory_bytes())  # known from the start, not only after a step

    # --- recording ---------------------------------------------------------------------------------
    def step(self, samples: int, audio_seconds: float, step_s: float, data_s: float, loss: float,
             lr: float) -> None:
        self._samples.inc(samples)
        self._audio.inc(audio_seconds)
        self._steps.inc()
        self._data_wait.inc(max(data_s, 0.0))  # a counter refuses negative increments
        self._step_time.inc(max(step_s, 0.0))
        self._set(self._loss, loss)
        self._set(self._lr, lr)
        self._set(self._gpu, _gpu_memory_bytes())
        self._set(self._last_step, time.time())

    def checkpoint(self) -> None:
        self._checkpoints.inc()

    def bad_sample(self, reason: str, count: int = 1) -> None:
        if count > 0:
            self._bad.labels(**self.labels, reason=reason).inc(count)

    def kmeans(self, iteration: int, objective: float) -> None:
        self._set(self._kmeans_iteration, iteration)
        self._set(self._kmeans_objective, objective)

    def _set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(**self.labels).set(value)

    # --- serving -----------------------------------------------------------------------------------
    def serve(self, addr: str, port: int) -> tuple[str, int]:
        """Serve /metrics on addr:port (port 0: one the OS picks); returns (host, port) to scrape."""
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        bound = self._server.server_address[1]  # the real port, also when the OS chose it
        self.address = (scrape_host(addr), bound)
        return self.address

    def write_target(self, targets_dir: Path, key: str = "") -> Path:
        """Write (atomically: Prometheus re-reads the file on change) this rank's file_sd target,
        <job>-<stage>-rank<rank>-<key>.json. `key` tells runs apart in a targets directory they share (the
        run directory's hash: a restarted job replaces its own file); without one, the served host and
        port, which no other live exporter has."""
        host, port = self.address
        host = f"[{host}]" if ":" in host else host  # an IPv6 literal
        key = key or f"{host}_{port}"
        name = "-".join(_safe(s) for s in (self.labels["job"], self.labels["stage"], f"rank{self.labels['rank']}",
                                            key)) + ".json"
        self.target_file = Path(targets_dir) / name
        self._target_text = json.dumps([{"targets": [f"{host}:{port}"], "labels": self.labels}], indent=1) + "\n"
        atomic_write_text(self.target_file, self._target_text)
        return self.target_file

    def close(self) -> None:
        # Target file first: Prometheus then drops the target instead of reporting it down.
        if self.target_file is not None:
            self._remove_own_target()
            self.target_file = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None


    def _remove_own_target(self) -> None:
        """Remove the target file unless another exporter has replaced it meanwhile (a requeued or
        relaunched job of the same run, on another port): its target must stay."""
        try:
            if self.target_file.read_text() == self._target_text:
                self.target_file.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def start_exporter(cfg: MetricsConfig, stage: str, rank: int, local_rank: int, job: str,
                   targets_dir: Path, run_key: str = "") -> Metrics:
    """This rank's metrics, served on cfg.addr : cfg.port + local_rank (every port the OS's choice when
    cfg.port is 0), with its target file in `targets_dir`; `NULL` when metrics are disabled.
    `run_key` tells runs apart in a shared targets directory (see write_target).
    Use as a context manager (or call close()) so the endpoint and the target file go away with the job."""
    if not cfg.enabled:
        return NULL
    metrics = PrometheusMetrics(stage, rank, job)
    port = cfg.port + local_rank if cfg.port else 0
    try:
        metrics.serve(cfg.addr, port)
        metrics.write_target(targets_dir, run_key)
    except OSError as e:
        metrics.close()
        raise ExporterError(f"metrics exporter of {stage} rank {rank}: cannot serve on {cfg.addr}:{port} or write "
                            f"a target file in {targets_dir} ({e}); change metrics.addr / metrics.port (0: any "
                            "free port) / metrics.targets_dir, or set metrics.enabled=false") from e
    return metrics


def stage_metrics(cfg: Config, stage: str) -> Metrics:
    """start_exporter for a pipeline stage in this process: rank and local rank from torchrun's environment
    (0 when absent), job = job_label(cfg), target files in metrics.targets_dir or RUN/metrics/targets, named
    after the run directory too, so runs sharing metrics.targets_dir neither replace nor remove each other's."""
    targets = RunLayout.of(cfg).metrics_targets(cfg.metrics.targets_dir)
    from ..engine.distributed import launch_rank

    me = launch_rank()
    return start_exporter(cfg.metrics, stage, me.rank, me.local_rank,
                          job_label(cfg), targets, run_key=run_key(cfg))


def run_key(cfg: Config) -> str:
    """8 hex digits of the resolved run directory: the same for every job (and restart) of a run."""
    return RunLayout.of(cfg).key


def job_label(cfg: Config) -> str:
    """The `job` label: the run's name; when that is the default one ('demo') but the run has a directory of
    its own, the name plus run_key, so that runs given only run.dir are told apart in Prometheus."""
    if cfg.run.name == RunConfig.name and cfg.run.dir:
        return f"{cfg.run.name}-{run_key(cfg)}"
    return cfg.run.name


def scrape_host(addr: str) -> str:
    """The host a scraper connects to for a server bound to `addr`: the node's name when bound to every
    interface (a scraper cannot connect to 0.0.0.0), else the address itself."""
    return socket.gethostname() if addr in _ANY_ADDRESS else addr


def _gpu_memory_bytes() -> int:
    # Never import torch, nor initialise CUDA, just for this: a process that has not touched CUDA holds none.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return 0


def _safe(s: str) -> str:
    """A label value as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", s) or "_"

"""Prometheus metrics (metrics/exporter.py): the exporter serves the contract's metrics with stage/rank/job
labels and a file_sd target file; and a real Prometheus server discovers a running job through that file
and computes its throughput."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from unfused_dist.config import MetricsConfig, load_config
from unfused_dist.metrics.exporter import NULL, PrometheusMetrics, scrape_host, stage_metrics, start_exporter

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ["unfused_samples_total", "unfused_audio_seconds_total", "unfused_steps_total",
            "unfused_data_wait_seconds_total", "unfused_step_seconds_total", "unfused_checkpoints_total",
            "unfused_bad_samples_total", "unfused_loss", "unfused_learning_rate",
            "unfused_last_step_timestamp_seconds", "unfused_gpu_memory_bytes", "unfused_kmeans_iteration",
            "unfused_kmeans_objective"]


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """GET /metrics over HTTP and parse it: sample name -> [(labels, value)]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels) -> float:
    (v,) = [v for lab, v in samples[name] if labels.items() <= lab.items()]
    return v


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# ---- the exporter -------------------------------------------------------------------------------------

def test_exporter_serves_the_contract_with_labels(tmp_path):
    before = time.time()
    with start_exporter(MetricsConfig(), "pretrain", rank=1, local_rank=0, job="j1", targets_dir=tmp_path) as m:
        for i in range(3):
            m.step(samples=4, audio_seconds=4 * 1.5, step_s=0.25, data_s=0.5, loss=2.0 - i, lr=1e-3 * (i + 1))
        m.checkpoint()
        m.bad_sample("decode", 2)
        m.bad_sample("decode")
        m.kmeans(iteration=7, objective=12.5)
        got = scrape(m.address[1])
    ours = {"stage": "pretrain", "rank": "1", "job": "j1"}
    for name in CONTRACT:
        assert name in got, f"{name} not served"
        assert all(ours.items() <= labels.items() for labels, _ in got[name]), (name, got[name])
    expected = {"unfused_samples_total": 12, "unfused_audio_seconds_total": 18, "unfused_steps_total": 3,
                "unfused_data_wait_seconds_total": 1.5, "unfused_step_seconds_total": 0.75,
                "unfused_checkpoints_total": 1, "unfused_loss": 0.0, "unfused_learning_rate": 3e-3,
                "unfused_kmeans_iteration": 7, "unfused_kmeans_objective": 12.5, "unfused_gpu_memory_bytes": 0}
    for name, v in expected.items():
        assert value(got, name, **ours) == pytest.approx(v), name
    assert value(got, "unfused_bad_samples_total", reason="decode", **ours) == 3
    assert before <= value(got, "unfused_last_step_timestamp_seconds") <= time.time()
    assert got["process_resident_memory_bytes"][0][1] > 0  # host memory, from the process collector


def test_gauges_appear_only_once_set(tmp_path):
    """A stage without k-means, or before its first step, exports no loss or objective (not a fake 0)."""
    with start_exporter(MetricsConfig(), "distill", 0, 0, "j2", tmp_path) as m:
        got = scrape(m.address[1])
    for name in ("unfused_loss", "unfused_learning_rate", "unfused_kmeans_objective",
                 "unfused_last_step_timestamp_seconds"):
        assert name not in got
    assert value(got, "unfused_steps_total") == 0  # counters start at 0, so rate() works from the first step


def test_target_file_written_atomically_and_removed_on_close(tmp_path):
    targets = tmp_path / "targets"  # created on demand
    m = start_exporter(MetricsConfig(), "pseudolabel", 3, 0, "job/a b", targets)
    port = m.address[1]
    assert port > 0 and not refused(port)
    files = sorted(p.name for p in targets.iterdir())
    assert files == [f"job_a_b-pseudolabel-rank3-127.0.0.1_{port}.json"]  # no temporary file left behind
    groups = json.loads((targets / files[0]).read_text())
    assert groups == [{"targets": [f"127.0.0.1:{port}"],
                       "labels": {"stage": "pseudolabel", "rank": "3", "job": "job/a b"}}]
    m.close()
    m.close()  # idempotent
    assert list(targets.iterdir()) == []
    assert refused(port)


def test_port_plus_local_rank_and_separate_registries(tmp_path, free_port):
    """Two ranks (or stages) in one process: own ports, own registries, no name collisions."""
    cfg = MetricsConfig(port=free_port)
    with start_exporter(cfg, "finetune", 0, 0, "j", tmp_path) as a, \
            start_exporter(cfg, "finetune", 1, 1, "j", tmp_path) as b:
        assert (a.address[1], b.address[1]) == (free_port, free_port + 1)
        a.step(2, 2.0, 0.1, 0.1, 1.0, 0.1)
        assert value(scrape(free_port), "unfused_samples_total") == 2
        assert value(scrape(free_port + 1), "unfused_samples_total", rank="1") == 0
        assert len(list(tmp_path.iterdir())) == 2


def test_stage_metrics_from_the_run_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = load_config(overrides=[f"run.dir={tmp_path / 'run'}", "run.name=exp"])
    with stage_metrics(cfg, "distill") as m:
        assert m.labels == {"stage": "distill", "rank": "5", "job": "exp"}
        key = hashlib.sha1(str((tmp_path / "run").resolve()).encode()).hexdigest()[:8]
        assert m.target_file == tmp_path / "run" / "metrics" / "targets" / f"exp-distill-rank5-{key}.json"
    cfg = load_config(overrides=[f"metrics.targets_dir={tmp_path / 'shared'}", "metrics.enabled=false"])
    assert stage_metrics(cfg, "distill") is NULL


def test_runs_sharing_a_targets_dir_keep_their_own_targets(tmp_path):
    """Two runs given only run.dir (both named 'demo'), one shared metrics.targets_dir: each has its own
    target file and job label, and a run that stops removes its own target only."""
    shared = tmp_path / "shared"
    cfgs = [load_config(overrides=[f"run.dir={tmp_path / r}", f"metrics.targets_dir={shared}"]) for r in "ab"]
    a, b = (stage_metrics(cfg, "distill") for cfg in cfgs)
    try:
        assert a.target_file != b.target_file and a.labels["job"] != b.labels["job"]
        assert a.labels["job"].startswith("demo-") and set(a.labels) == {"stage", "rank", "job"}
        b.close()
        assert [p.name for p in shared.iterdir()] == [a.target_file.name]
        assert json.loads(a.target_file.read_text())[0]["targets"] == [f"127.0.0.1:{a.address[1]}"]
        again = stage_metrics(cfgs[0], "distill")  # run a's job restarted: its new exporter takes the file over
        assert again.target_file == a.target_file
        a.close()  # the old exporter leaves the restarted one's target in place
        assert json.loads(again.target_file.read_text())[0]["targets"] == [f"127.0.0.1:{again.address[1]}"]
        again.close()
        assert list(shared.iterdir()) == []
    finally:
        a.close(), b.close()


def test_disabled_serves_nothing(tmp_path, free_port):
    m = start_exporter(MetricsConfig(enabled=False, port=free_port), "pretrain", 0, 0, "j", tmp_path)
    assert m is NULL and not isinstance(m, PrometheusMetrics)
    m.step(1, 1.0, 0.1, 0.1, 1.0, 0.1)  # the same interface, recording nothing
    m.checkpoint(), m.bad_sample("decode"), m.kmeans(1, 1.0), m.close()
    assert refused(free_port)
    assert list(tmp_path.iterdir()) == []


def test_never_every_interface_by_default():
    assert MetricsConfig().addr == "127.0.0.1"
    assert scrape_host("127.0.0.1") == "127.0.0.1"
    assert scrape_host("0.0.0.0") == socket.gethostname()  # a scraper cannot connect to 0.0.0.0


# ---- a real Prometheus server ----------------------------------------------------------------------------

def poll(what: str, fn, timeout: float, log: Path):
    """fn() until it returns something truthy; fails naming `what` (with Prometheus's log) at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = fn()
        except (urllib.error.URLError, ConnectionError):
            result = None
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:.0f} s; Prometheus log:\n{log.read_text()[-3000:]}")


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    body = json.load(urllib.request.urlopen(url, timeout=10))
    assert body["status"] == "success", body
    return body["data"]


def prometheus_config(targets: Path) -> dict:
    """The shipped example config (configs/prometheus.yml), scraping every second from `targets`."""
    config = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (scrape_config,) = config["scrape_configs"]
    scrape_config["file_sd_configs"] = [{"files": [str(targets / "*.json")], "refresh_interval": "1s"}]
    return config


def job_loop(metrics, stop: threading.Event) -> None:
    """A training job's metrics at a steady pace: 4 one-second clips per step, 20 steps a second."""
    step = 0
    while not stop.wait(0.05):
        step += 1
        metrics.step(samples=4, audio_seconds=4.0, step_s=0.04, data_s=0.01, loss=1 / step, lr=1e-3)


def check_dashboard_queries(port: int) -> None:
    """Every query of the Grafana dashboard is valid PromQL (Prometheus answers it), and the job's panels
    that need no k-means, checkpoint or bad sample show data."""
    dashboard = json.loads((ROOT / "configs" / "grafana" / "unfused.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$job", ".*").replace("$stage", ".*")
            result = api(port, "/api/v1/query", query=expr)["result"]  # a syntax error fails here
            if panel["title"].startswith(("Throughput", "Samples", "Data-wait", "Steps", "Loss", "Seconds since")):
                assert result, (panel["title"], expr)


def test_prometheus_discovers_a_job_and_computes_its_throughput(tmp_path, free_port):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` server binary is not installed: run `make setup` (it installs Debian's "
                    "prometheus package; CI does)")
    targets, log_path = tmp_path / "targets", tmp_path / "prometheus.log"
    targets.mkdir()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets)))
    log = open(log_path, "w")
    t0 = time.monotonic()
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{free_port}"], stdout=log, stderr=subprocess.STDOUT)
    metrics, stop, job = None, threading.Event(), None
    try:
        poll("Prometheus ready", lambda: urllib.request.urlopen(f"http://127.0.0.1:{free_port}/-/ready",
                                                                 timeout=5).status == 200, 60, log_path)
        started = time.monotonic() - t0
        # The job starts after Prometheus, as on a cluster: Prometheus must discover its target file.
        t1 = time.monotonic()
        metrics = start_exporter(MetricsConfig(), "pretrain", 0, 0, "itest", targets)
        job = threading.Thread(target=job_loop, args=(metrics, stop), daemon=True)
        job.start()
        query = "rate(unfused_audio_seconds_total[30s]) > 0"
        (series,) = poll(f"a non-empty `{query}`",
                         lambda: api(free_port, "/api/v1/query", query=query)["result"], 60, log_path)
        rate_after = time.monotonic() - t1
        # our own labels, not exported_stage / exported_job (honor_labels in configs/prometheus.yml)
        assert {"stage": "pretrain", "rank": "0", "job": "itest"}.items() <= series["metric"].items(), series
        assert not any(k.startswith("exported_") for k in series["metric"]), series
        # The unit is audio-seconds per second: ~80 here, minus the loop's overhead. (The 30 s window first
        # holds only a few seconds of samples, and rate() then underestimates: a short window checks the value.)
        poll("rate(unfused_audio_seconds_total[5s]) near 80",
             lambda: 40 < float(api(free_port, "/api/v1/query", query="rate(unfused_audio_seconds_total[5s])")
                                ["result"][0]["value"][1]) < 120, 30, log_path)
        check_dashboard_queries(free_port)
        (target,) = api(free_port, "/api/v1/targets", state="active")["activeTargets"]
        assert target["health"] == "up", target
        assert {"stage": "pretrain", "rank": "0", "job": "itest"}.items() <= target["labels"].items(), target
        assert target["scrapeUrl"] == f"http://127.0.0.1:{metrics.address[1]}/metrics"
        # close() removes the target file: Prometheus drops the target
        stop.set()
        job.join()
        metrics.close()
        t2 = time.monotonic()
        poll("the closed exporter's target dropped",
             lambda: api(free_port, "/api/v1/targets", state="active")["activeTargets"] == [], 30, log_path)
        print(f"\nPrometheus ready after {started:.1f} s; rate() non-empty {rate_after:.1f} s after the job "
              f"started; target dropped {time.monotonic() - t2:.1f} s after close()")
    finally:
        stop.set()
        if job is not None:
            job.join()
        if metrics is not None:
            metrics.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            pytest.fail("Prometheus did not exit within 30 s of SIGTERM (killed)")
        finally:
            log.close()
    assert server.returncode == 0, log_path.read_text()[-3000:]


@pytest.mark.slow
def test_prometheus_discovers_a_real_pretraining_run_which_sigterm_stops_after_a_checkpoint(tmp_path, free_port,
                                                                                           ci_data):
    """The real thing: `unfused run pretrain` on the ci corpus (SSL, 2 DataLoader workers) is found by a real
    Prometheus through its target file and shows a positive audio-seconds rate; SIGTERM then makes it save a
    checkpoint, exit 0 and remove its target, and the same command resumes from that checkpoint."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` server binary is not installed: run `make setup`")
    targets, log_path = tmp_path / "targets", tmp_path / "prometheus.log"
    targets.mkdir()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets)))
    cmd = [sys.executable, "-m", "unfused_dist.cli", "run", "pretrain", "-c", "configs/ci.yaml",
           f"run.dir={tmp_path / 'run'}", "run.nproc=1", "data.num_workers=2", "pretrain.max_steps=40",
           "pretrain.batch_size=8", "audio.norm_clips=16",
           "engine.save_every_steps=0", f"metrics.targets_dir={targets}"]
    with open(log_path, "w") as log:
        server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{free_port}"], stdout=log, stderr=subprocess.STDOUT)
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            query = 'rate(unfused_audio_seconds_total{stage="pretrain"}[30s]) > 0'
            (series,) = poll(f"a non-empty `{query}`", lambda: job.poll() is None and
                             api(free_port, "/api/v1/query", query=query)["result"], 180, log_path)
            assert series["metric"]["job"] == "ci" and float(series["value"][1]) > 0
            job.send_signal(signal.SIGTERM)
            out, _ = job.communicate(timeout=120)
            assert job.returncode == 0, out[-3000:]
            assert "stopping on SIGTERM" in out and not list(targets.glob("*.json"))
        finally:
            if job.poll() is None:
                job.kill()
            server.terminate()
            server.wait(timeout=30)
    assert server.returncode == 0
    step = json.loads(next((tmp_path / "run/pretrain/ckpt").glob("step*/unfused.json")).read_text())["global_step"]
    assert 0 < step < 40
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # the same command
    assert resumed.returncode == 0 and f"step {step})" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run/pretrain/done.json").read_text())["steps"] == 40

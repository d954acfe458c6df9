"""The launcher's job graph and resources (the SLURM runs themselves: test_launch_slurm.py)."""
from __future__ import annotations

import pytest

from launchers.resources import load_resources
from launchers.submit import job_graph
from unfused_dist.artefacts import mark_done
from unfused_dist.config import ConfigError, load_config


def _graph(cfg, target="pipeline"):
    return {j.name: (j.after, j.array) for j in job_graph(cfg, target, parts=3)}


def test_the_pipeline_is_a_chain_of_jobs_with_arrays_for_embedding_and_assignment(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    g = _graph(cfg)
    assert list(g)[:6] == ["pretrain", "pseudolabel-embed", "pseudolabel-fit", "pseudolabel-assign",
                           "pseudolabel-finish", "distill"]
    assert g["pseudolabel-embed"] == (["pretrain"], 3) and g["pseudolabel-assign"] == (["pseudolabel-fit"], 3)
    assert g["distill"] == (["pseudolabel-finish"], 0)
    assert g["finetune-scratch"][0] == [] and g["finetune-teacher_probe"][0] == ["pretrain"]
    assert g["finetune-unfused_finetune"][0] == ["distill"]
    assert set(g["evaluate"][0]) == {f"finetune-{r}" for r in cfg.finetune.rows}

    mark_done(tmp_path / "pretrain", {})  # a finished stage is not submitted, nor waited for
    g = _graph(cfg)
    assert "pretrain" not in g and g["pseudolabel-embed"][0] == [] and g["finetune-teacher_probe"][0] == []
    assert list(_graph(cfg, "distill")) == ["distill"]
    with pytest.raises(Exception, match="unknown stage 'pretrian'"):
        _graph(cfg, "pretrian")


def test_resources_override_the_default_per_job_and_bad_keys_name_the_file(tmp_path):
    res = load_resources("configs/slurm/default.yaml")
    assert res.for_job("pretrain").nodes == 2 and res.for_job("evaluate").nodes == 1
    params = res.for_job("pretrain").executor_parameters("x")
    assert params["tasks_per_node"] == 8 and params["slurm_signal_delay_s"] == 120
    bad = tmp_path / "r.yaml"
    bad.write_text("pretrain: {gpus_per_nod: 4}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'pretrain.gpus_per_nod' \(did you mean"):
        load_resources(bad)
    bad.write_text("pretrian: {nodes: 2}\n")
    with pytest.raises(ConfigError, match="unknown section 'pretrian'"):
        load_resources(bad)


def test_launch_local_runs_the_pseudolabel_jobs_arrays_included(tmp_path):
    """`--cluster local`: the same jobs as on SLURM (embed array of 2, a 2-task fit, assign array, finish),
    one after another on this machine through submitit's local executor."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import build_noise_dataset
    from test_pseudolabel import _stage_run

    from launchers.submit import latest_jobs
    from shards_tools.verify import verify_split

    split = build_noise_dataset(tmp_path / "data", 24, shard_samples=4)
    cfg = _stage_run(tmp_path, split)
    # a fresh job's environment: earlier tests ran stages in this process, which set the rendezvous variables
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "launchers.cli", "launch", "pseudolabel", "-c", str(cfg), "--cluster",
                        "local", "--resources", "configs/slurm/ci.yaml", "pseudolabel.backend=distributed"],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    jobs = latest_jobs(run)
    assert list(jobs) == ["pseudolabel-embed", "pseudolabel-fit", "pseudolabel-assign", "pseudolabel-finish"]
    assert len(jobs["pseudolabel-embed"]["job_ids"]) == 2 and jobs["pseudolabel-fit"]["after"] == ["pseudolabel-embed"]
    assert (run / "pseudolabel/done.json").is_file()
    verify_split(split)  # label shards align with the audio shards
    (meta,) = split.glob("labels/*/meta.json")  # the run's label folder (its name is pseudolabel's business)
    assert json.loads(meta.read_text())["backend"] == "distributed (faiss-cpu)"


@pytest.mark.parametrize("text, message", [
    ("array_parts: many\n", r"r.yaml: array_parts must be a whole number >= 1, got 'many'"),
    ("array_parts: 0\n", r"r.yaml: array_parts must be a whole number >= 1, got 0"),
    ("default: {nodes: 0}\n", r"r.yaml: 'default.nodes' must be >= 1, got 0"),
    ("default: {time_min: -5}\n", r"r.yaml: 'default.time_min' must be >= 1, got -5"),
    ("pretrain: {gpus_per_node: -2}\n", r"r.yaml: 'pretrain.gpus_per_node' must be >= 0, got -2"),
    ("finetune: {mem_gb: 0}\n", r"r.yaml: 'finetune.mem_gb' must be > 0, got 0"),
    ("finetune: {mem_gb: .nan}\n", r"r.yaml: 'finetune.mem_gb' must be > 0, got nan"),
    ("- default\n", r"r.yaml: a resources file is a mapping of sections .*, not a list"),
    ("pretrain: 4\n", r"r.yaml: section 'pretrain' must be a mapping of keys .*, got 4"),
])
def test_resources_refuse_values_sbatch_cannot_use_naming_file_section_and_key(tmp_path, text, message):
    bad = tmp_path / "r.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_resources(bad)

"""The stage table is the one place stages and rows are declared: a stage and a row added to a table of a
project's own (named by run.stages, in a temporary module) reach the local pipeline, the SLURM job graph,
`unfused status` and config validation, with nothing else edited."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launchers.status import status_lines
from launchers.submit import job_graph
from unfused_dist.artefacts import is_done, mark_done, read_done
from unfused_dist.cli import prepare_run_dir
from unfused_dist.config import ConfigError, load_config
from unfused_dist.run_layout import RunLayout
from unfused_dist.stage_table import STAGES, Row, StageTable

ROOT = Path(__file__).resolve().parents[1]

EXTRA = textwrap.dedent('''
    from unfused_dist.artefacts import mark_done
    from unfused_dist.run_layout import RunLayout
    from unfused_dist.stage_table import STAGES, Row, Stage, StageTable

    def listen(cfg):
        """A stage of this project: writes its done.json, with the run's seed in it."""
        mark_done(RunLayout.of(cfg).stage("listen"), {"seed": cfg.run.seed})

    LISTEN = Stage("listen", "extra_stages:listen", "listen", ranked=False, after=("pretrain",))
    TABLE = STAGES.with_stage(LISTEN, before="evaluate").with_row(Row("teacher_probe_again", "pretrain", "probe"))
    SMALL = StageTable([STAGES.stage("pretrain"), LISTEN])  # a pipeline cheap enough to run here
''')


@pytest.fixture
def extra(tmp_path, monkeypatch):
    """extra_stages.py importable here and in the processes the pipeline starts."""
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "extra_stages.py").write_text(EXTRA)
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mod"), os.environ.get("PYTHONPATH", "")]))
    yield
    sys.modules.pop("extra_stages", None)


def test_a_row_and_a_stage_added_to_a_table_reach_the_job_graph_status_and_validation(extra, tmp_path):
    rows = "finetune.rows=[scratch,teacher_probe_again]"
    # the built-in table does not know the new row; the project's table does
    with pytest.raises(ConfigError, match="'finetune.rows' has 'teacher_probe_again'"):
        load_config(None, [f"run.dir={tmp_path / 'run'}", rows])
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "run.stages=extra_stages:TABLE", rows])

    graph = {j.name: j.after for j in job_graph(cfg, "pipeline", parts=2)}
    assert graph["listen"] == ["pretrain"] and graph["finetune-teacher_probe_again"] == ["pretrain"]
    assert set(graph["evaluate"]) == {"finetune-scratch", "finetune-teacher_probe_again"}
    assert "finetune-teacher_finetune" not in graph  # only the rows the run names

    prepare_run_dir(cfg)
    mark_done(RunLayout.of(cfg).stage("listen"), {})
    shown = {line.split()[0]: line.split()[1] for line in status_lines(cfg.run.path)[1:]}
    assert list(shown)[-4:] == ["finetune-scratch", "finetune-teacher_probe_again", "listen", "evaluate"]
    assert shown["listen"] == "done" and shown["finetune-teacher_probe_again"] == "-"
    assert RunLayout.of(cfg).row("teacher_probe_again") == cfg.run.path / "finetune" / "teacher_probe_again"


def test_the_local_pipeline_runs_a_stage_declared_in_a_table_of_ones_own(extra, tmp_path, ci_data):
    run = tmp_path / "run"
    mark_done(run / "pretrain", {})  # done: skipped, so that only the new stage runs
    r = subprocess.run([sys.executable, "-m", "unfused_dist.cli", "run", "pipeline", "-c", "configs/ci.yaml",
                        f"run.dir={run}", "run.stages=extra_stages:SMALL", "finetune.rows=[]", "run.seed=7"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[pipeline] pretrain: done already" in r.stdout and "[pipeline] listen: " in r.stdout
    assert is_done(run / "listen") and read_done(run / "listen")["seed"] == 7


def test_a_table_that_cannot_be_loaded_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run.stages=nowhere:TABLE: cannot load a stage table"):
        load_config(None, [f"run.dir={tmp_path}", "run.stages=nowhere:TABLE"])
    with pytest.raises(ConfigError, match="is not a StageTable"):
        load_config(None, [f"run.dir={tmp_path}", "run.stages=unfused_dist.stage_table:Row"])


def test_the_built_in_table_declares_each_stage_once_and_its_dependencies_exist():
    names = [s.name for s in STAGES.stages]
    for s in STAGES.stages:
        assert all(a in names or a == "finetune-*" for a in s.after), s
    assert list(STAGES.rows) == ["scratch", "teacher_probe", "teacher_finetune", "unfused_probe", "unfused_finetune"]
    with pytest.raises(ValueError, match="declared twice"):
        StageTable([STAGES.stage("pretrain"), STAGES.stage("pretrain")])
    with pytest.raises(ValueError, match="mode must be"):
        Row("x", None, "linear")

"""What a user sees when a stage cannot start or is stopped: one line saying what to do, and an exit code
that tells a stop after saving (0) from a stage killed before it could save (non-zero)."""
import sys

import pytest

from unfused_dist import pipeline
from unfused_dist.cli import main
from unfused_dist.config import load_config
from unfused_dist.errors import UnfusedError


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_a_directory_as_config_is_one_line(capsys, tmp_path):
    assert "configs: is a directory; give a YAML file" in _cli_error(capsys, ["run", "evaluate", "-c", "configs"])


def test_a_misspelt_finetune_stage_lists_the_stages(capsys, tmp_path):
    err = _cli_error(capsys, ["run", "finetune-teacher_prob", f"run.dir={tmp_path}"])
    assert "unknown stage 'finetune-teacher_prob'; stages: pretrain," in err and "finetune-teacher_probe" in err


def test_missing_encoder_names_the_stage_to_run_first(tmp_path):
    from unfused_dist.engine.export import load_encoder

    with pytest.raises(UnfusedError, match=f"{tmp_path}/distill/encoder.json: no exported encoder; "
                                           "run `unfused run distill`"):
        load_encoder(tmp_path / "distill")


def test_evaluate_before_the_rows_names_the_row_to_run_first(capsys, tmp_path):
    err = _cli_error(capsys, ["run", "evaluate", f"run.dir={tmp_path}"])
    assert "row 'scratch' has not finished; run `unfused run finetune-scratch`" in err


# A stand-in stage process: it waits for the pipeline's forwarded SIGTERM (or, with `saved`, leaves the
# marker a preempted stage leaves and exits 1 as torchrun does after its workers saved).
STAGE = """
import signal, sys, time
from pathlib import Path
if sys.argv[1] == "saved":
    Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
    (Path(sys.argv[2]) / "stopped.json").write_text("{}")
    sys.exit(1)
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # killed before it could save: no handler yet
time.sleep(0.3)  # the pipeline's forwarding handler is installed by now
import os; os.kill(os.getppid(), signal.SIGTERM)
time.sleep(30)
"""


def _pipeline_with_stage(monkeypatch, tmp_path, mode: str):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    monkeypatch.setattr(pipeline, "stage_command", lambda cfg, name, *a: [sys.executable, "-c", STAGE, mode,
                                                                           str(pipeline.stage_dir(cfg, name))])
    pipeline.run_pipeline(cfg, tmp_path / "config.yaml")


def test_a_stage_killed_before_saving_is_a_failure(monkeypatch, tmp_path, capsys):
    with pytest.raises(UnfusedError, match=r"stage 'pretrain' was stopped by SIGTERM before it saved a checkpoint "
                                           r"\(exit -15\)"):
        _pipeline_with_stage(monkeypatch, tmp_path, "killed")
    assert "after saving" not in capsys.readouterr().out


def test_a_stage_that_saved_and_stopped_is_a_clean_stop_whatever_torchrun_exits(monkeypatch, tmp_path, capsys):
    _pipeline_with_stage(monkeypatch, tmp_path, "saved")
    assert "pretrain: stopped by a signal after saving a checkpoint" in capsys.readouterr().out

"""scripts/gpu_check.sh, the one-command check for the day a GPU is lent, runs here in its tiny CPU form
(`--cpu`): the ci pipeline in bf16 on one process and the step benchmark, ending in gpu_check.json."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_writes_its_figures(ci_data, tmp_path):
    # a fresh process's environment: stages run in this process earlier leave their rendezvous variables
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(summary["ci_rows"]) == {"unfused_probe"}
    assert all(0 <= row["test_acc"] <= 1 for row in summary["ci_rows"].values())
    assert [s["stage"] for s in summary["steps"]] == ["pretrain", "distill"]
    for s in summary["steps"]:
        assert s["precision"] == "bf16" and s["clips_s"] > 0 and 0 <= s["data_wait_share"] <= 1
    assert "[gpu_steps] pretrain: batch 4, bf16" in r.stdout

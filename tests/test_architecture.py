"""docs/ARCHITECTURE.md stays true, and the codebase keeps the shape issue 20 gave it: every stage and
SLURM job of the stage table and every module of the library is named in the document; no file of the
library over 400 lines; data/ imports nothing from engine/; the run-directory paths, the launcher's rank and
the library's messages each have one place."""
from __future__ import annotations

import re
from pathlib import Path

from unfused_dist.stage_table import STAGES

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "unfused_dist"
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()


def _sources(*more: str):
    return sorted(p for d in (LIBRARY, *(ROOT / m for m in more)) for p in d.rglob("*.py"))


def test_every_stage_and_job_of_the_stage_table_is_documented():
    table = DOC.split("## The stage table", 1)[1].split("\n## ", 1)[0]
    for stage in STAGES.stages:
        assert f"| `{stage.name}` |" in table, f"stage {stage.name} is missing from docs/ARCHITECTURE.md"
        for job in stage.slurm_jobs():
            assert f"`{job.name}`" in table, f"SLURM job {job.name} is missing from docs/ARCHITECTURE.md"


def test_every_module_of_the_library_is_documented():
    for path in _sources():
        if path.name != "__init__.py":
            assert path.name in DOC, f"{path.relative_to(ROOT)} is not in docs/ARCHITECTURE.md's map"


def test_no_library_file_is_over_400_lines_and_data_imports_nothing_from_engine():
    for path in _sources():
        n = len(path.read_text().splitlines())
        assert n <= 400, f"{path.relative_to(ROOT)} has {n} lines"
    for path in (LIBRARY / "data").glob("*.py"):
        assert not re.search(r"^\s*from \.\.engine|^\s*(from|import) unfused_dist\.engine", path.read_text(), re.M), path


def test_one_place_for_run_paths_the_launchers_rank_and_messages():
    for path in _sources("launchers"):
        text, rel = path.read_text(), path.relative_to(ROOT)
        if rel.parts[0] == "unfused_dist":  # the launchers' own output is the console's, not the library's
            assert not re.search(r"\bprint\(", text), f"{rel}: print( (use unfused_dist.log)"
        if path.name != "distributed.py":
            assert not re.search(r"environ(\.get\(|\[)\s*[\"'](RANK|LOCAL_RANK|WORLD_SIZE)[\"']", text), \
                f"{rel}: reads the launcher's rank itself (ask engine.distributed.launch_rank)"
        if path.name != "run_layout.py":
            assert not re.search(r"run\.path\s*/|\.root\s*/", text), f"{rel}: joins a run-directory path itself"

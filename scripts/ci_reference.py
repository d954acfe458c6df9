"""Write tests/ci_reference.json, the bands the ci pipeline's accuracies must fall in, from measured runs.

    .venv/bin/python scripts/ci_reference.py REFERENCE_RUN OTHER_RUN ... --note "why" > tests/ci_reference.json

Each RUN is a run dir of `configs/ci.yaml` (its results.json and config.yaml); the first is the reference (run
as the test runs it), the others measure the run-to-run spread. On one machine the ci pipeline is
deterministic, so the spread that matters is what an irrelevant change does: another CPU's kernels, another
sample order. Runs with other `run.seed` values, or the same clips in other shards, stand for that. Each
row's band is [lowest - margin, highest + margin] over all the runs, the margin being `--margin-clips` clips
of the split (2 by default), so that a model that learns clearly worse than every measured run, or clearly
better, fails. Committing a new reference is a deliberate change: `--note` says why.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unfused_dist.config import load_config  # noqa: E402
from unfused_dist.data.manifest import DatasetManifest  # noqa: E402

SPLITS = ("val", "test")


def accuracies(run_dir: Path) -> dict[str, dict[str, float]]:
    """row (and "baseline") -> {"val_acc", "test_acc"} of one run."""
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["row"]: {f"{s}_acc": r[f"{s}_acc"] for s in SPLITS} for r in results["rows"]}
    return rows | {"baseline": {f"{s}_acc": results["baseline"][f"{s}_acc"] for s in SPLITS}}


def bands(runs: list[dict], clips: dict[str, int], margin_clips: float) -> dict:
    out = {}
    for row in runs[0]:
        out[row] = {}
        for s in SPLITS:
            values = [run[row][f"{s}_acc"] for run in runs]
            margin = margin_clips / clips[s]
            # rounded outwards: a value exactly on the band's edge is inside it
            out[row][f"{s}_acc"] = [max(0.0, math.floor((min(values) - margin) * 1e4) / 1e4),
                                    min(1.0, math.ceil((max(values) + margin) * 1e4) / 1e4)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run dirs: the reference run first, then the others")
    p.add_argument("--names", nargs="*", help="a name per run, for the record (default: the run dir's name)")
    p.add_argument("--margin-clips", type=float, default=2.0, help="clips of slack beyond the runs' range (2)")
    p.add_argument("--above-baseline", nargs="*", default=[],
                   help="fine-tuned rows that must beat the simple baseline on test (none if the task cannot)")
    p.add_argument("--min-nmi", type=float, default=0.05, help="pseudo-labels' NMI against the true labels")
    p.add_argument("--note", required=True, help="why this reference: what was measured, what moved")
    args = p.parse_args(argv)
    cfg = load_config(args.runs[0] / "config.yaml")
    clips = {s: DatasetManifest.load(Path(cfg.data.target) / s).num_samples for s in SPLITS}
    runs = [accuracies(r) for r in args.runs]
    reference = {
        "note": args.note,
        "made": date.today().isoformat(),
        "clips": clips,
        "margin_clips": args.margin_clips,
        "bands": bands(runs, clips, args.margin_clips),
        "above_baseline": args.above_baseline,
        "min_nmi": args.min_nmi,
        "runs": dict(zip(args.names or [r.name for r in args.runs], runs)),
    }
    print(json.dumps(reference, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

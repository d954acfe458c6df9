"""The `unfused` command: `run` (this machine), `launch` (SLURM or local jobs), `status`, `cancel`.

    unfused run STAGE|pipeline -c CONFIG [key=value ...] [--reshard]
    unfused launch STAGE|pipeline -c CONFIG --cluster slurm|local [--resources configs/slurm/X.yaml] [key=value ...]
    unfused status RUN
    unfused cancel RUN

It lives in launchers/ because the library (unfused_dist/) imports nothing from launchers/; `run` is the
library's own command (unfused_dist.cli), which the jobs and the local pipeline call too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unfused_dist import cli as library_cli
from unfused_dist.config import load_config
from unfused_dist.errors import UnfusedError


def main(argv: list[str] | None = None) -> None:
    from unfused_dist.log import setup

    setup()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return library_cli.main(argv)
    parser = argparse.ArgumentParser(prog="unfused", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run one stage or the whole pipeline on this machine (see `unfused run -h`)")
    launch = sub.add_parser("launch", help="submit a stage or the whole pipeline as jobs")
    launch.add_argument("stage", help="pipeline | pretrain | pseudolabel | distill | finetune-<row> | evaluate")
    launch.add_argument("-c", "--config", default=None, help="YAML config")
    launch.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="slurm: submit and return; local: the same jobs on this machine, one after another")
    launch.add_argument("--resources", default=None, help="per-job resources (configs/slurm/*.yaml)")
    launch.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.dir=runs/x")
    for name, text in (("status", "stages, jobs and their states, progress of a run"),
                       ("cancel", "cancel a run's unfinished SLURM jobs")):
        sub.add_parser(name, help=text).add_argument("run", help="the run directory")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and args.command != "launch"):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    try:
        if args.command == "launch":
            _launch(args, list(args.overrides) + extra)
        elif args.command == "status":
            from .status import status_lines
            print("\n".join(status_lines(Path(args.run))))
        else:
            _cancel(Path(args.run))
    except UnfusedError as e:
        print(f"unfused: error: {e}", file=sys.stderr)
        sys.exit(2)


def _cancel(run: Path) -> None:
    from .queue import describe_failures
    from .status import cancel

    ids, failed = cancel(run)
    if ids or not failed:
        print(f"cancelled {', '.join(ids)}" if ids else "no unfinished jobs")
    if failed:
        raise UnfusedError(f"scancel could not cancel {describe_failures(failed)}")


def _launch(args, overrides: list[str]) -> None:
    from unfused_dist.stage_table import table_of

    from .resources import load_resources
    from .submit import launch

    cfg = load_config(args.config, overrides)
    if args.stage == "pipeline":
        from unfused_dist.pipeline import check_inputs
        check_inputs(cfg)
    config_path = library_cli.prepare_run_dir(cfg)
    launch(cfg, config_path.resolve(), args.stage, args.cluster, load_resources(args.resources, table_of(cfg)))


if __name__ == "__main__":
    main()

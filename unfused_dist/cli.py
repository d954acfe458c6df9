"""`unfused run STAGE|pipeline -c CONFIG [key=value ...] [--reshard]`: the library's own command, which jobs and
the local pipeline call (`python -m unfused_dist.cli run ...`). The `unfused` console script (launchers/cli.py)
adds launch, status and cancel."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config, save_config
from .errors import UnfusedError
from .run_layout import RunLayout


def prepare_run_dir(cfg: Config) -> Path:
    """Save the resolved config in the run dir; refuse a run dir that holds a different run (Config.hash:
    runtime keys and the run dir's own spelling do not count), since its finished stages would be skipped
    and silently reused."""
    from .engine.distributed import launch_rank

    path = RunLayout.of(cfg).config
    if launch_rank().rank != 0:
        return path
    if path.exists():
        old = load_config(path)
        if old.hash() != cfg.hash():
            diff = _diff(old.identity(), cfg.identity())
            raise ConfigError(f"{path}: this run dir holds a run with a different config ({', '.join(diff[:4])}); "
                              f"choose another run.dir, or continue that run with -c {path} run.dir={cfg.run.path}")
    try:  # the same run; runtime keys (process count, checkpoint cadence) and run.dir's spelling may have changed
        save_config(cfg, path)
    except OSError as e:
        raise ConfigError(f"run.dir {cfg.run.path}: cannot write the run dir ({e.strerror}); "
                          "set run.dir to a writable directory") from None
    return path


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in a.keys() | b.keys():
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], prefix + k + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return sorted(out)


def cmd_run(args) -> None:
    from .engine.device import choose_device
    from .engine.distributed import launch_rank
    from .pipeline import check_inputs, run_pipeline, run_stage

    cfg = load_config(args.config, args.overrides)
    # a job given GPUs on a torch without CUDA stops here, before the run dir
    choose_device(cfg.run.device, launch_rank().local_rank)
    if args.stage == "pipeline":
        check_inputs(cfg)  # before the run dir is created, so a corrected command is not refused
    config_path = prepare_run_dir(cfg)
    if args.stage == "pipeline":
        run_pipeline(cfg, config_path, reshard=args.reshard)
    else:
        run_stage(cfg, args.stage, reshard=args.reshard)


def main(argv: list[str] | None = None) -> None:
    from .log import setup

    setup()
    parser = argparse.ArgumentParser(prog="unfused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage or the whole pipeline on this machine")
    run.add_argument("stage", help="pipeline | pretrain | pseudolabel | distill | finetune-<row> | evaluate")
    run.add_argument("-c", "--config", default=None, help="YAML config (default: built-in defaults)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.dir=runs/x pretrain.epochs=3")
    run.add_argument("--reshard", action="store_true",
                     help="resume a checkpoint written by a different number of processes from its fp32 weights, "
                          "at the start of its epoch (optimizer moments restart)")
    # Overrides may stand before or after -c: argparse leaves the later ones unparsed, so collect them.
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if args.command == "run":
        args.overrides = list(args.overrides) + extra
    try:
        cmd_run(args)
    except UnfusedError as e:
        sys.stderr.write(f"unfused: error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()

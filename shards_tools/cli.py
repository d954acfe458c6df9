"""`unfused-shards`: build, verify and inspect WebDataset audio shards.

Exit codes:
  build   0 all inputs built; 3 built, but some inputs were rejected (see OUT/rejected.jsonl);
          2 the source itself is unusable (missing, no path column, ...) or another build holds OUT;
          130 interrupted: the same command again writes only the shards still missing
  verify  0 every split matches its manifest (a split sorted by label is a warning); 1 a mismatch (one
          line per bad split, naming the shard); 2 no dataset found
  stats   0; 2 no dataset found or an unreadable shard
  merge   0 merged; 2 bad input (no dataset, different sample rate/codec, a key in two inputs,
          OUT already holds a dataset without --overwrite)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from shards_tools.sources import SourceError
from unfused_dist.audio.io import CODECS, TARGET_SR
from unfused_dist.data.manifest import ManifestError

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unfused-shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{build,verify,stats,merge}")

    b = sub.add_parser("build", help="build OUT/<split>/ shards from a folder, CSV or JSONL manifest")
    b.add_argument("src", help="folder of audio (recursive), CSV with a path/files/wav column [+ label] "
                               "[+ split], or JSONL with path or audio_filepath [+ label] [+ split]")
    b.add_argument("out", help="output folder; one sub-folder per split")
    b.add_argument("--workers", type=int, default=None, help="decode processes (default: all CPUs)")
    b.add_argument("--shard-samples", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--shard-mb", type=float, default=None,
                   help="also start a new shard before this size (MB), estimated from the files' durations")
    b.add_argument("--sample-rate", type=int, default=TARGET_SR, help=f"output rate (default {TARGET_SR})")
    b.add_argument("--codec", choices=sorted(CODECS), default="flac",
                   help="shard audio codec: flac (default, ~half the bytes) or wav (16-bit PCM, cheapest decode)")
    b.add_argument("--segment-seconds", type=float, default=None,
                   help="cut longer recordings into segments of this length (the tail joins the last segment "
                        "when under half a segment)")
    b.add_argument("--labels-from-dirs", action="store_true", help="folder source: label = parent folder name")
    b.add_argument("--keep-order", action="store_true",
                   help="deal samples to shards in the source's order (default: a seeded random order, so that no "
                        "shard is a run of one class or source; training batches are only as mixed as the shards)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random shard order (default 0)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    v.add_argument("out", help="a split dir or a folder of split dirs")

    s = sub.add_parser("stats", help="clips, hours, per-label counts, duration min/mean/max")
    s.add_argument("out", help="a split dir or a folder of split dirs")

    m = sub.add_parser(
        "merge", help="concatenate built datasets into OUT/<split>/ (shards copied byte for byte)",
        description="Merge built datasets: for every split, OUT/<split>/ gets the inputs' shards in input "
                    "order, renumbered, copied unchanged (same sha256), with a new manifest (summed counts, "
                    "union of label vocabularies). Label shards (labels/ dirs) are NOT merged: re-run the "
                    "pseudolabel stage on OUT.")
    m.add_argument("inputs", nargs="+", metavar="INPUT", help="a built dataset folder or a single split dir")
    m.add_argument("out", metavar="OUT", help="output folder; one sub-folder per split")
    m.add_argument("--overwrite", action="store_true", help="replace the splits of a dataset already in OUT")
    return p


def _build(args: argparse.Namespace, argv: list[str]) -> int:
    from shards_tools.build import REJECTED_NAME, build

    positive = {"--shard-samples": args.shard_samples, "--shard-mb": args.shard_mb, "--workers": args.workers,
                "--segment-seconds": args.segment_seconds, "--sample-rate": args.sample_rate}
    bad = [flag for flag, v in positive.items() if v is not None and v <= 0]
    if bad:
        print(f"unfused-shards build: {bad[0]} must be positive", file=sys.stderr)
        return EXIT_USAGE
    if not 1000 <= args.sample_rate <= 384000:  # libsndfile's range: outside it every file would be rejected
        print(f"unfused-shards build: --sample-rate {args.sample_rate} is outside 1000-384000 Hz", file=sys.stderr)
        return EXIT_USAGE
    summaries = build(args.src, args.out, workers=args.workers, shard_samples=args.shard_samples,
                      shard_mb=args.shard_mb, segment_seconds=args.segment_seconds, sample_rate=args.sample_rate,
                      codec=args.codec,
                      labels_from_dirs=args.labels_from_dirs, keep_order=args.keep_order, seed=args.seed,
                      command=_recorded(argv, args.src, args.out),
                      progress=not args.quiet)
    for s in summaries:
        print(s.line())
    rejected = sum(s.rejected for s in summaries)
    if rejected:
        print(f"{rejected} inputs rejected: see {Path(args.out) / REJECTED_NAME} (exit code 3)",
              file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


def _recorded(argv: list[str], *paths: str) -> str:
    """The command as the manifest records it, SRC and OUT made absolute: verify's repair advice quotes it,
    and it must work from any folder."""
    return shlex.join(["unfused-shards", *(os.path.abspath(a) if a in paths else a for a in argv)])


def _verify(args: argparse.Namespace) -> int:
    from shards_tools.verify import verify

    reports, errors = verify(args.out)
    for r in reports:
        print(r.line())
    for r in reports:
        for w in r.warnings:
            print(f"{r.split}: WARNING {w}", file=sys.stderr)
    for e in errors:
        print(e, file=sys.stderr)
    return EXIT_MISMATCH if errors else EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    from shards_tools.stats import stats
    from shards_tools.verify import VerifyError

    try:
        result = stats(args.out)
    except VerifyError as e:
        print(f"unfused-shards stats: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not result:
        print(f"unfused-shards stats: {args.out}: no manifest.json here or in its sub-folders", file=sys.stderr)
        return EXIT_USAGE
    for st in result:
        print("\n".join(st.lines()))
    return EXIT_OK


def _merge(args: argparse.Namespace, argv: list[str]) -> int:
    from shards_tools.merge import MergeError, merge

    try:
        summaries = merge(args.inputs, args.out, overwrite=args.overwrite,
                          command=shlex.join(["unfused-shards", *argv]))
    except MergeError as e:
        print(f"unfused-shards merge: {e}", file=sys.stderr)
        return EXIT_USAGE
    for s in summaries:
        print(s.line())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "build":
            return _build(args, argv)
        if args.cmd == "verify":
            return _verify(args)
        if args.cmd == "stats":
            return _stats(args)
        return _merge(args, argv)
    except (SourceError, ManifestError) as e:
        print(f"unfused-shards {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        again = "; run the same command again to finish (finished shards are kept)" if args.cmd == "build" else ""
        print(f"unfused-shards {args.cmd}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Demo corpora (raw audio + CSV manifests) and their WebDataset shards, built once into data/<size>/.
# Usage: scripts/make_data.sh ci|demo
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:?usage: make_data.sh ci|demo}
root=data/$size
py=.venv/bin/python
case $size in ci) shard_samples=25 ;; *) shard_samples=250 ;; esac
$py -m shards_tools.datasets "$size" --out "$root/raw"
# What the shards were built with: shards from an older build (the source's order, sorted by label) are
# rebuilt, so `make demo` on an existing checkout measures what a fresh clone does.
build_args="--shard-samples $shard_samples --seed 0"
for task in kws langid instrument pool; do
  out=$root/shards/$task
  if [ -f "$out/.built" ] && [ "$out/.built" -nt "$root/raw/$task/manifest.csv" ] \
     && [ "$(cat "$out/.built")" = "$build_args" ]; then continue; fi
  rc=0
  .venv/bin/unfused-shards build "$root/raw/$task/manifest.csv" "$out" $build_args --quiet || rc=$?
  # exit 3: built, some inputs rejected (listed in rejected.jsonl): the demo goes on with the rest
  [ $rc = 0 ] || [ $rc = 3 ] || exit $rc
  echo "$build_args" > "$out/.built"
done
echo "[data] $root/shards ready: $(ls $root/shards | tr '\n' ' ')"

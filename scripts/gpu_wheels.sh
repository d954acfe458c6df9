#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (Python 3.12, torch with CUDA, no network; see the device tool's
# KINDS.md), fetched here into wheels/gpu/ for scripts/gpu_check.sh to install there. Carry them with
# the run: carry=["wheels/gpu", "data/ci/shards"] (64 MiB at most in all).
#   scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dest=wheels/gpu
rm -rf "$dest" && mkdir -p "$dest"
py=.venv/bin/python
# DeepSpeed is an sdist: a wheel with no compiled ops (they JIT-build on first use), built in our venv.
$py -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==$($py -m pip show deepspeed | sed -n 's/^Version: //p')"
$py -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d "$dest" \
    soundfile soxr cffi pycparser hjson pydantic pydantic-core annotated-types typing-inspection
du -sh "$dest"
ls "$dest"

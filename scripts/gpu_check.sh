#!/usr/bin/env bash
# The GPU check, one command (under 8 minutes on one H100):
#   scripts/gpu_check.sh [--cpu] [--out DIR]
# 1. installs the carried wheels (wheels/gpu/*.whl, made here by scripts/gpu_wheels.sh) when DeepSpeed,
#    soundfile or soxr are missing: the lent GPU machine has torch with CUDA but no network;
# 2. runs the device tests (tests/test_device.py: meta placement, a module that checks its inputs' device
#    through the real engine, bf16 autocast and the fp32 EMA) on this machine's device;
# 3. runs the ci pipeline (data/ci/shards, carried) in bf16 on one device, k-means on the GPU
#    (pseudolabel.backend=gpu: faiss-gpu if installed, else the torch search), and prints its table;
# 4. times SSL and distillation steps at batch 256 (benchmarks/gpu_steps.py): clips/s, data-wait share,
#    peak GPU memory.
# Everything it measured goes to DIR/gpu_check.json (default: $OUT if set, else runs/gpu_check).
# --cpu: the same on the CPU, tiny (one step per training stage, batch 4, the student's probe as the only
# row; the device tests are left to the test suite, which runs them anyway), so CI keeps it from rotting
# (tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=0
out=${OUT:-runs/gpu_check}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=1 ;;
    --out) out=$2; shift ;;
    *) echo "usage: scripts/gpu_check.sh [--cpu] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
mkdir -p "$out"
out=$(cd "$out" && pwd)
start=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - start ))s] $*"; }

if ! $py -c "import deepspeed, soundfile, soxr" 2>/dev/null; then
  ls wheels/gpu/*.whl >/dev/null 2>&1 || { echo "gpu_check: DeepSpeed/soundfile/soxr missing and no wheels/gpu/*.whl: run scripts/gpu_wheels.sh where a registry is reachable, and carry wheels/gpu" >&2; exit 2; }
  say "installing $(ls wheels/gpu/*.whl | wc -l) carried wheels"
  $py -m pip install -q --no-index --no-deps wheels/gpu/*.whl
fi
[ -f data/ci/shards/langid/train/manifest.json ] || { echo "gpu_check: data/ci/shards missing: run 'make data' and carry data/ci/shards" >&2; exit 2; }

if [ $cpu = 1 ]; then
  # bf16 on a CPU without bf16 instructions is 10-20x slower than fp32: a handful of tiny steps per stage
  device=cpu; backend=distributed; batch=4; steps=1; workers=1
  tiny="pretrain.batch_size=4 pretrain.max_steps=1 distill.batch_size=4 distill.max_steps=1 finetune.batch_size=4
        finetune.labels_per_class=1 finetune.epochs=1 finetune.probe_epochs=2 finetune.rows=[unfused_probe]"
else
  device=cuda; backend=gpu; batch=256; steps=30; workers=8
  tiny=""
  $py -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('[gpu_check]', torch.__version__, torch.cuda.get_device_name())"
fi

if [ $cpu = 0 ]; then
  say "device tests"
  $py -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -3
fi

say "ci pipeline in bf16 on $device"
rm -rf "$out/ci"
# shellcheck disable=SC2086
$py -m unfused_dist.cli run pipeline -c configs/ci.yaml run.dir="$out/ci" run.nproc=1 run.device=$device \
    engine.precision=bf16 pseudolabel.backend=$backend data.num_workers=$workers metrics.enabled=false $tiny \
    > "$out/pipeline.log" 2>&1 || { tail -30 "$out/pipeline.log"; exit 1; }
cat "$out/ci/results.md"

say "SSL and distillation steps at batch $batch"
$py benchmarks/gpu_steps.py --batch $batch --steps $steps --warmup $(( steps > 5 ? 5 : 1 )) --clips $(( cpu ? 16 : 0 )) --precision bf16 \
    --workers $workers --device $device --json "$out/steps.json"

$py - "$out" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path
out, wall = Path(sys.argv[1]), int(sys.argv[2])
results = json.loads((out / "ci" / "results.json").read_text())
summary = {"wall_s": wall, "ci_rows": {r["row"]: {"val_acc": r["val_acc"], "test_acc": r["test_acc"]} for r in results["rows"]},
           "baseline": results["baseline"], "pseudolabels": results["pseudolabels"],
           "steps": json.loads((out / "steps.json").read_text())}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"[gpu_check] wrote {out / 'gpu_check.json'} ({wall} s)")
EOF

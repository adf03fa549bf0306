#!/usr/bin/env bash
# Every GPU benchmark of docs/performance.md, one after another on one GPU (one machine, nothing else on it):
#   experiments/bench/gpu.sh OUT_DIR OFFICIAL_LINEARPATCH_CHECKOUT [BENCH ...]   (default: all four, in this order)
# Each writes OUT_DIR/bench_<name>_gpu.json and OUT_DIR/<name>.log; a failing one does not stop the others.
set -uo pipefail
out=${1:?an output folder}; official=${2:?a checkout of github.com/chenxinrui-tsinghua/LinearPatch}; shift 2
only=" ${*:-generation calibration selection protocol} "
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/gpu.txt" 2>&1
bench() {
  local name=$1; shift
  [[ $only == *" $name "* ]] || return 0
  echo "== $name start $(date -u +%T)"
  python3 -m "experiments.bench.$name" "$@" --out "$out/bench_${name}_gpu.json" > "$out/$name.log" 2>&1
  echo "== $name rc=$? end $(date -u +%T)"
}
bench generation                        # 9 cells x 3 variants, decode steps as CUDA graph replays
bench calibration --official "$official"
bench selection
bench protocol                          # the paper's 5,000 x 2048 teacher cache and one epoch of distillation

#!/usr/bin/env bash
# One GPU block: the zero-shot evaluation benchmark (HFLM and lp's engine, the float32 comparison), then the
# Qwen2.5-Coder-1.5B depth grid with resume=true (docs/results.md section 3), one after another on one GPU:
#   experiments/bench/gpu_grid.sh OUT_DIR [engine] [grid]      (default: both, in this order)
# The model is found as model=qwen2.5_coder_1.5b finds it (~/.cache/lp/models/, SHA-256 checked); records go to
# $RESULTS_DIR (default results/; the grid's run ids are those of the same command anywhere); logs and the
# benchmark to OUT_DIR.
set -uo pipefail
out=${1:?an output folder}; shift
only=" ${*:-engine grid} "
mkdir -p "$out"
C="model=qwen2.5_coder_1.5b data.seqlen=2048 data.calib_samples=128 data.calib_batch_size=8 eval=local \
eval.limit=null eval.max_windows=null eval.batch_size=4 ++eval.zeroshot_batch_size=16 logger=none progress=false"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/gpu.txt" 2>&1
if [[ $only == *" engine "* ]]; then
  echo "== engine start $(date -u +%T)"
  python3 -m experiments.bench.engine --removed 12-18 --fp32-limit 250 --out "$out/bench_engine_gpu.json" $C \
    > "$out/engine.log" 2>&1
  echo "== engine rc=$? end $(date -u +%T)"
fi
if [[ $only == *" grid "* ]]; then
  echo "== grid start $(date -u +%T)"
  python3 -m experiments.batch experiments/sweeps/depth_qwen1.5b.txt $C results_dir=${RESULTS_DIR:-results} resume=true \
    > "$out/grid.log" 2>&1
  echo "== grid rc=$? end $(date -u +%T)"
fi

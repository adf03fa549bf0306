#!/usr/bin/env bash
# One GPU block: the zero-shot evaluation benchmark (HFLM and lp's engine with both attention kernels, the float32
# comparison), the EvoPress search's cost on the 1.5B shape, and the Qwen2.5-Coder-1.5B depth grid with
# resume=true (docs/results.md section 3), one after another on one GPU, in the order given:
#   experiments/bench/gpu_grid.sh OUT_DIR [engine] [attention] [evopress] [grid] [grid-0.5b] [grid-gemma]
# (default: engine evopress grid). grid-0.5b and grid-gemma: the Qwen2.5-Coder-0.5B and Gemma-3-270M depth grids,
# same settings, in bfloat16 on the GPU as the 1.5B's config has it (two such scripts may share one GPU: the small
# models leave most of it idle).
# A model is found as its model= config finds it (~/.cache/lp/models/, SHA-256 checked); records go to
# $RESULTS_DIR (default results/; the grid's run ids are those of the same command anywhere; resume=true skips
# only runs whose records are there, so copy results/records into another RESULTS_DIR first); logs and the
# benchmarks to OUT_DIR. FP32_LIMIT: documents a task for the float32 comparison (default 250); ATTENTION: the
# engine step's kernels (default sdpa,flex); TOKEN_BUDGETS: its lp token budgets (default: the config's, 16384).
# PARTS: processes a grid step runs side by side on the GPU (default 1), each a share of the file
# (experiments.batch --part K/PARTS; logs STEP.K.log): the small models leave one process's GPU mostly idle.
# RUNS: instead of PARTS, one process per space-separated group of run numbers (experiments.batch --runs), e.g.
# RUNS="86,96 89,97" runs 86 then 96 beside 89 then 97 (logs STEP.86,96.log): the last rows of a file, spread.
# Two grid-gemma processes beside two grid-0.5b ones filled an H100 (80,706 MiB used, 2026-12-07, before perplexity
# and the EvoPress teacher stopped casting a whole batch of logits to float32).
# Since, three grid-gemma processes beside two grid-0.5b ones (RUNS, EvoPress searches among them) ran with
# nothing out of memory (74,112 MiB used at one look, 2026-12-07).
set -uo pipefail
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # processes sharing a GPU
out=${1:?an output folder}; shift
mkdir -p "$out"
C="data.seqlen=2048 data.calib_samples=128 data.calib_batch_size=8 eval=local \
eval.limit=null eval.max_windows=null eval.batch_size=4 ++eval.zeroshot_batch_size=16 logger=none progress=false"
grid() {  # STEP SWEEP MODEL_OVERRIDES...: one depth file, resume=true, in PARTS (or RUNS) processes; 1 if any failed
  local step=$1 sweep=$2 parts=${PARTS:-1} k share pids=() rc=0; shift 2
  for k in ${RUNS:-$(seq 1 "$parts")}; do
    if [ -n "${RUNS:-}" ]; then share="--runs $k"; else share="--part $k/$parts"; fi
    python3 -m experiments.batch $share experiments/sweeps/$sweep.txt "$@" $C \
      results_dir=${RESULTS_DIR:-results} resume=true > "$out/$step.$k.log" 2>&1 &
    pids+=($!)
  done
  for k in "${pids[@]}"; do wait "$k" || rc=1; done
  return $rc
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$out/gpu.txt" 2>&1
for step in ${*:-engine evopress grid}; do
  echo "== $step start $(date -u +%T)"
  case $step in
    engine) python3 -m experiments.bench.engine --removed 12-18 --attention ${ATTENTION:-sdpa,flex} ${TOKEN_BUDGETS:+--token-budgets $TOKEN_BUDGETS} --fp32-limit ${FP32_LIMIT:-250} \
              --out "$out/bench_engine_gpu.json" model=qwen2.5_coder_1.5b $C > "$out/engine.log" 2>&1 ;;
    attention) # lp's engine, sdpa vs FlexAttention, on a random Qwen2.5-1.5B-shape model with the default model's
               # tokenizer (SMOL_DIR: a folder holding the default model's GGUF as smol.gguf): no 1.1 GB model to carry
      python3 -m experiments.bench.engine --shape qwen2.5_1.5b --skip-hflm --removed 12-18 --attention sdpa,flex \
        --out "$out/bench_engine_attention_gpu.json" model.name_or_path=${SMOL_DIR:?} model.gguf_file=smol.gguf \
        model.device=cuda model.dtype=bfloat16 eval=local eval.limit=null eval.max_windows=null \
        ++eval.zeroshot_batch_size=16 logger=none progress=false > "$out/attention.log" 2>&1 ;;
    evopress) python3 -m experiments.bench.evopress --out "$out/bench_evopress_gpu.json" > "$out/evopress.log" 2>&1 ;;
    grid) grid $step depth_qwen1.5b model=qwen2.5_coder_1.5b ;;
    grid-0.5b) grid $step depth_qwen0.5b model=qwen2.5_coder_0.5b model.device=cuda model.dtype=bfloat16 ;;
    grid-gemma) grid $step depth_gemma3_270m model=gemma3_270m model.device=cuda model.dtype=bfloat16 ;;
    *) echo "unknown step $step (engine, attention, evopress, grid, grid-0.5b, grid-gemma)"; continue ;;
  esac
  echo "== $step rc=$? end $(date -u +%T)"
done

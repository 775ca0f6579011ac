#!/usr/bin/env bash
# One-shot GPU check for an offline GPU host (Python 3.12, torch, cupy; no deepspeed/ffcv):
# installs the kit (.whl/, built here by `make gpu-kit`) with benchmarks/gpu_kit_install.sh into
# ${SITE:-/tmp/site}, then, each stage within what is left of one deadline (DEADLINE, default 540 s, so the
# whole check fits one 10-minute device call):
#   1. the GPU tests (kernels against their references, the fused window attention in both kernel modes);
#   2. the throughput benchmark, --quick: LoMaR vs MAE ViT-B/16 at 224/384/448 through ds_configs/zero2.json,
#      each model at its best (the rows issue-level targets are read from), with a GPU-time profile of LoMaR 224
#      compiled (where the step's time goes, and how busy the device is);
#   3. the kernel benchmark, --quick (each kernel, and the explicit-logits attention path, vs its eager and
#      compiled reference);
#   4. LoMaR at 224, compiled, with the explicit-logits attention path (LOMAR_ATTN_PATH=math);
#   5. with the time left, LoMaR at 224 in DeepSpeed's bf16 mode and without DeepSpeed, then at micro-batch 512
#      with compiled blocks, the whole model compiled, and the fused kernels.
# Every benchmark rewrites its JSON after each row, so a stage cut short keeps what it measured.
# Results go under ${OUT:-benchmarks/results/gpu_check}; environment.txt and stages.txt say what ran.
#   usage: bash benchmarks/gpu_check.sh [--no-throughput]
#   env:   OUT, SITE, DEADLINE (seconds for the whole check), THROUGHPUT_ARGS (extra flags for stage 2), PY
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
DEADLINE="${DEADLINE:-540}"
PY="${PY:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
site="${SITE:-/tmp/site}"
if [ -f .whl/kit.json ]; then
  SITE="$site" bash benchmarks/gpu_kit_install.sh --report "$OUT/kit_install.json" || { echo "kit install failed"; exit 1; }
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export LOMAR_KERNELS=auto
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import cupy; print('cupy', cupy.__version__)" 2>&1
  git rev-parse HEAD 2>/dev/null
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

status=0
left() { echo $(( DEADLINE - (SECONDS - t0) )); }
# stage NAME CAP RESERVE CMD...: run CMD with a time limit of min(CAP, what is left minus RESERVE for the
# stages after it); skipped (and recorded) when under 30 s would remain for it
stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local limit=$(( $(left) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then
    echo "$name skipped: ${limit}s left for it" | tee -a "$OUT/stages.txt"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local s=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -30 "$OUT/$name.log"
  echo "$name rc=$rc seconds=$(( SECONDS - s )) limit=$limit" | tee -a "$OUT/stages.txt"
  [ "$rc" = 0 ] || status=1
}
# the benchmark's own time budget: stop starting rows in time to write its report within the stage's limit
budget() { local b=$(( $(left) - $1 - 40 )); [ "$b" -gt "$2" ] && b=$2; echo $(( b > 30 ? b : 30 )); }

: > "$OUT/stages.txt"
stage gpu_tests 180 360 "$PY" -m pytest tests/test_kernels.py tests/test_window_attention.py tests/test_randaugment.py \
  -m gpu -q -rfE --tb=short -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

if [ "${1:-}" != "--no-throughput" ]; then
  # shellcheck disable=SC2086
  stage throughput 330 120 "$PY" -m benchmarks.throughput --quick --out "$OUT/throughput" \
    --profile --profile_target lomar:224:compile --time_budget "$(budget 120 280)" ${THROUGHPUT_ARGS:-}
fi

stage kernels 150 60 "$PY" -m benchmarks.kernels --out "$OUT/kernels" --quick

if [ "${1:-}" != "--no-throughput" ]; then
  # the explicit-logits attention (batched GEMMs + fp32 softmax) in the shipped step; the baseline is stage 2's
  # lomar 224 compile row, timed in this call
  stage attention_math 120 0 env LOMAR_ATTN_PATH=math "$PY" -m benchmarks.throughput --quick --models lomar \
    --sizes 224 --variants compile --profile --out "$OUT/throughput" --name attention_math --time_budget "$(budget 0 80)"
  stage engine_modes 150 0 "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 --variants compile \
    --engine_mode torch_autocast bf16 no_deepspeed --out "$OUT/throughput" --name engine_modes \
    --time_budget "$(budget 0 110)"
  stage batch512 150 0 "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 \
    --variants compile compile-model compile+kernels --lomar_batch 512 --out "$OUT/throughput" --name batch512 \
    --time_budget "$(budget 0 110)"
fi
echo "gpu_check exit $status after $(( SECONDS - t0 ))s"
exit $status

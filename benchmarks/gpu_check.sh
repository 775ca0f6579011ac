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
#   4. LoMaR at 224, compiled, with the explicit-logits attention path (LOMAR_ATTN_PATH=math), then with ZeRO's
#      contiguous gradient buffer on (one rank leaves it off by default);
#   5. with the time left, LoMaR at 224 in DeepSpeed's bf16 mode and without DeepSpeed, then at micro-batch 512
#      with compiled blocks, the whole model compiled, and the fused kernels.
# Every benchmark rewrites its JSON after each row, so a stage cut short keeps what it measured.
# Everything goes under RESULTS (default: a new /tmp/lomar_gpu_check.XXXXXX); after every stage OUT (default
# benchmarks/results/gpu_check) receives at most six files: stages.txt, environment.txt, throughput.json,
# kernels.json, attention_math.json and gpu_check.tgz (all of RESULTS: logs, tables, plots, profiles, the
# other runs' JSON). A device call returns at most 8 files from its output folder, hence the archive.
# Without the kit (no .whl/, or its install failed) the GPU tests and the kernel benchmark still run; the
# stages that need DeepSpeed are skipped and say so in stages.txt.
# CHECK_CPU=1 rehearses the whole script on a CPU (DS_ACCELERATOR=cpu, tiny models at 224, 2 timed steps, the
# kernel benchmark's --cpu-smoke; the -m gpu tests are collected and skip): every stage's command line as the GPU
# runs it, with the CPU flags after it, so an argument or packing mistake shows before a GPU call is spent.
#   usage: bash benchmarks/gpu_check.sh [--no-throughput]
#   env:   OUT, RESULTS, SITE, DEADLINE (seconds for the whole check), THROUGHPUT_ARGS (extra flags for stage 2), PY,
#          CHECK_CPU, CHECK_KIT=0 (skip the kit install: the Python in PY has DeepSpeed already)
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
DEADLINE="${DEADLINE:-540}"
PY="${PY:-python3}"
OUT="${OUT:-benchmarks/results/gpu_check}"
RESULTS="${RESULTS:-$(mktemp -d /tmp/lomar_gpu_check.XXXXXX)}"
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1  # a stage's log holds what it printed up to a kill
: > "$RESULTS/stages.txt"
site="${SITE:-/tmp/site}"
have_ds=1
if [ -f .whl/kit.json ] && [ "${CHECK_KIT:-1}" != 0 ]; then
  if PYTHON="$PY" SITE="$site" bash benchmarks/gpu_kit_install.sh --report "$RESULTS/kit_install.json" \
      > "$RESULTS/kit_install.log" 2>&1; then
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    tail -20 "$RESULTS/kit_install.log"
    echo "kit_install failed: see kit_install.log; the stages that need DeepSpeed are skipped" | tee -a "$RESULTS/stages.txt"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import deepspeed" > /dev/null 2>&1 || have_ds=0
[ "$have_ds" = 1 ] || echo "no deepspeed importable (make gpu-kit builds .whl/; carry it): the throughput stages are skipped" \
  | tee -a "$RESULTS/stages.txt"
export LOMAR_KERNELS=auto
# the CPU rehearsal's flags, appended to each benchmark's GPU command line (argparse keeps the last value)
cpu_tp=() cpu_k=(--quick)
if [ -n "${CHECK_CPU:-}" ] && [ "$CHECK_CPU" != 0 ]; then
  export DS_ACCELERATOR=cpu
  cpu_tp=(--device cpu --tiny --sizes 224 --lomar_batch 4 --mae_batch 4 --steps 2 --warmup 1 --matmul_size 256)
  cpu_k=(--cpu-smoke)
  echo "CHECK_CPU: a CPU rehearsal; no figure here is a GPU figure" | tee -a "$RESULTS/stages.txt"
fi
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import cupy; print('cupy', cupy.__version__)" 2>&1
  "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  git rev-parse HEAD 2>/dev/null
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

# OUT: copies of the summaries and one archive of RESULTS, rewritten after every stage (at most 6 files)
pack() {
  local f
  for f in stages.txt environment.txt throughput/throughput.json kernels/kernels.json \
           throughput/attention_math.json; do
    if [ -f "$RESULTS/$f" ]; then
      local name; name=$(basename "$f")
      cp -f "$RESULTS/$f" "$OUT/$name.partial" && mv -f "$OUT/$name.partial" "$OUT/$name"
    fi
  done
  tar -czf "$OUT/gpu_check.tgz.partial" -C "$RESULTS" . 2>/dev/null && mv -f "$OUT/gpu_check.tgz.partial" "$OUT/gpu_check.tgz"
}
trap pack EXIT
pack

status=0
left() { echo $(( DEADLINE - (SECONDS - t0) )); }
# stage NAME CAP RESERVE CMD...: run CMD with a time limit of min(CAP, what is left minus RESERVE for the
# stages after it); skipped (and recorded) when under 30 s would remain for it
stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local limit=$(( $(left) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then
    echo "$name skipped: ${limit}s left for it" | tee -a "$RESULTS/stages.txt"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local s=$SECONDS
  # SIGINT first (pytest writes its report, a benchmark keeps the rows it wrote), SIGKILL 15 s later
  timeout -s INT -k 15 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  tail -30 "$RESULTS/$name.log"
  echo "$name rc=$rc seconds=$(( SECONDS - s )) limit=$limit" | tee -a "$RESULTS/stages.txt"
  [ "$rc" = 0 ] || status=1
  pack
}
# a stage that needs DeepSpeed: skipped, and recorded, without it
ds_stage() {
  if [ "$have_ds" != 1 ]; then
    echo "$1 skipped: no deepspeed" | tee -a "$RESULTS/stages.txt"
    status=1
    return 0
  fi
  stage "$@"
}
# the benchmark's own time budget: stop starting rows in time to write its report within the stage's limit
budget() { local b=$(( $(left) - $1 - 40 )); [ "$b" -gt "$2" ] && b=$2; echo $(( b > 30 ? b : 30 )); }

stage gpu_tests 180 360 "$PY" -m pytest tests/test_kernels.py tests/test_window_attention.py tests/test_randaugment.py \
  -m gpu -q -rfE --tb=short -p no:cacheprovider --junitxml="$RESULTS/gpu_tests.xml"

if [ "${1:-}" != "--no-throughput" ]; then
  # shellcheck disable=SC2086
  # the variants are the GPU defaults, named so that the CPU rehearsal runs them too, and the profile's target
  # is a row of this plan; with THROUGHPUT_ARGS the benchmark's defaults and its own profile choice apply
  plan=(--variants eager compile compile+kernels --mae_variants eager compile compile-model
        --profile --profile_target lomar:224:compile)
  [ -n "${THROUGHPUT_ARGS:-}" ] && plan=(--profile)
  ds_stage throughput 330 120 "$PY" -m benchmarks.throughput --quick --out "$RESULTS/throughput" \
    --name throughput "${plan[@]}" --time_budget "$(budget 120 280)" ${THROUGHPUT_ARGS:-} ${cpu_tp[@]+"${cpu_tp[@]}"}
fi

stage kernels 150 60 "$PY" -m benchmarks.kernels --out "$RESULTS/kernels" "${cpu_k[@]}"

if [ "${1:-}" != "--no-throughput" ]; then
  # the explicit-logits attention (batched GEMMs + fp32 softmax) in the shipped step; the baseline is stage 2's
  # lomar 224 compile row, timed in this call
  ds_stage attention_math 120 0 env LOMAR_ATTN_PATH=math "$PY" -m benchmarks.throughput --quick --models lomar \
    --sizes 224 --variants compile --profile --out "$RESULTS/throughput" --name attention_math --time_budget "$(budget 0 80)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the same with ZeRO's contiguous gradient buffer, which the shipped JSON leaves off on one rank
  ds_stage gradient_buffer 130 0 "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 --variants compile \
    --contiguous_gradients true --out "$RESULTS/throughput" --name gradient_buffer --time_budget "$(budget 0 90)" \
    ${cpu_tp[@]+"${cpu_tp[@]}"}
  ds_stage engine_modes 150 0 "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 --variants compile \
    --engine_mode torch_autocast bf16 no_deepspeed --out "$RESULTS/throughput" --name engine_modes \
    --time_budget "$(budget 0 110)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  ds_stage batch512 150 0 "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 \
    --variants compile compile-model compile+kernels --lomar_batch 512 --out "$RESULTS/throughput" --name batch512 \
    --time_budget "$(budget 0 110)" ${cpu_tp[@]+"${cpu_tp[@]}"}
fi
echo "gpu_check exit $status after $(( SECONDS - t0 ))s"
exit $status

#!/usr/bin/env bash
# One-shot GPU check for an offline GPU host (Python 3.12, torch, cupy; no deepspeed/ffcv):
# installs the kit (.whl/, built here by `make gpu-kit`) with benchmarks/gpu_kit_install.sh into
# ${SITE:-/tmp/site}, then runs these stages in this order, each within what is left of one deadline (DEADLINE,
# default 540 s, so the whole check fits one 10-minute device call):
#   gpu_tests       the GPU tests (kernels against their references, the fused window attention in both kernel
#                   modes, RandAugment on the GPU); GPU_TESTS replaces the test files/ids;
#   throughput      the issue-level rows, --quick: LoMaR (compiled blocks, the default, and the whole model
#                   compiled) against MAE at its best (the whole model compiled), ViT-B/16 at 224/384/448 through
#                   ds_configs/zero2.json, with a GPU-time profile of LoMaR 224 with the whole model compiled;
#   attention_flex  the same step with FlexAttention's kernels taking the iRPE term (LOMAR_ATTN_PATH=flex), compiled
#                   blocks and the whole model compiled;
#   attention_mma   the same step with the kernels on and the warp-tiled attention kernels (LOMAR_WA_KERNEL=mma),
#                   compiled blocks and the whole model compiled;
#   irpe_aligned    the same step (compiled blocks) with the iRPE bias in SDPA's aligned layout
#                   (LOMAR_IRPE_PATH=bmm_aligned);
#   engine_modes    LoMaR at 224, compiled blocks, in DeepSpeed's bf16 mode and without DeepSpeed (the shipped
#                   torch_autocast row is the throughput stage's);
#   attention_math  LoMaR at 224, compiled blocks, with the explicit-logits attention (LOMAR_ATTN_PATH=math);
#   gradient_buffer the same step with ZeRO's contiguous gradient buffer (one rank leaves it off by default);
#   batch512        LoMaR at 224 at micro-batch 512, compiled blocks and the whole model compiled;
#   combined        LoMaR at 224 with every lever that beat its baseline in the stages before, together
#                   (benchmarks/combine.py; its choice in throughput/combined_plan.json), when no stage measured
#                   that combination already;
#   kernels         the kernel benchmark, --quick (each kernel, and the explicit-logits path, vs its eager and
#                   compiled reference); KERNEL_CASES (case names, comma-separated) runs only those cases;
#   autotune        LoMaR at 224, compiled blocks in inductor's max-autotune mode (GEMMs against Triton templates
#                   that take the bias/GELU epilogues); last, as it runs only in the time the others leave.
# The order is what issue-level figures still need first: the acceptance rows, then the levers that could move
# them (FlexAttention, the warp-tiled kernels, the aligned iRPE bias), then the rows that explain the step (engine
# modes, the explicit-logits attention, the gradient buffer, micro-batch 512), the winners together, the kernels,
# max-autotune.
# STAGES="engine_modes batch512" runs only the stages named (in the order above), e.g. for a second
# call on the same machine; a stage that does not run (not named, --no-throughput, no DeepSpeed) keeps no time
# back from the stages before it. Naming a DeepSpeed stage with --no-throughput is an error.
# Every benchmark rewrites its JSON after each row, so a stage cut short keeps what it measured. nvidia-smi logs
# the GPU's clocks, power and throttle reasons once a second into gpu_telemetry.csv, and each stage notes the
# busiest host processes at its start (NAME.ps).
# Everything goes under RESULTS (default: a new /tmp/lomar_gpu_check.XXXXXX); after every stage OUT (default
# benchmarks/results/gpu_check) receives at most eight files: stages.txt, environment.txt, throughput.json,
# kernels.json, attention_math.json, attention_flex.json, attention_mma.json and gpu_check.tgz (all of RESULTS:
# logs, tables, plots, profiles, the other runs' JSON). A device call returns at most 8 files from its output folder, hence the archive.
# Without the kit (no .whl/, or its install failed) the GPU tests and the kernel benchmark still run; the
# stages that need DeepSpeed are skipped and say so in stages.txt.
# CHECK_CPU=1 rehearses the whole script on a CPU (DS_ACCELERATOR=cpu, tiny models at 224, 2 timed steps, the
# kernel benchmark's --cpu-smoke; the -m gpu tests are collected and skip): every stage's command line as the GPU
# runs it, with the CPU flags after it, so an argument or packing mistake shows before a GPU call is spent.
#   usage: bash benchmarks/gpu_check.sh [--no-throughput]
#   env:   OUT, RESULTS, SITE, DEADLINE (seconds for the whole check), STAGES, GPU_TESTS, THROUGHPUT_ARGS (extra
#          flags for the throughput stage), KERNEL_CASES, PY, CHECK_CPU, CHECK_KIT=0 (skip the kit install: the
#          Python in PY has DeepSpeed already)
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
ALL_STAGES="gpu_tests throughput attention_flex attention_mma irpe_aligned engine_modes attention_math gradient_buffer batch512 combined kernels autotune"
DS_STAGES="throughput attention_flex attention_mma irpe_aligned engine_modes attention_math gradient_buffer batch512 combined autotune"  # need DeepSpeed; --no-throughput skips
no_tp=0
[ "${1:-}" = "--no-throughput" ] && no_tp=1
wanted=""
for s in ${STAGES:-}; do
  case " $ALL_STAGES " in *" $s "*) ;; *) echo "STAGES: unknown stage '$s'; the stages are: $ALL_STAGES"; exit 2;; esac
  if [ "$no_tp" = 1 ] && [[ " $DS_STAGES " == *" $s "* ]]; then
    echo "STAGES: '$s' is one of the stages --no-throughput skips ($DS_STAGES)"; exit 2
  fi
  wanted="$wanted $s"
done
STAGES="${wanted# }"  # the names one space apart, whatever separated them (tabs, newlines): matched on spaces below
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
cpu_tp=() cpu_k=(--quick) rehearsal=0
if [ -n "${CHECK_CPU:-}" ] && [ "$CHECK_CPU" != 0 ]; then
  rehearsal=1
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
  echo "busiest host processes:"
  ps -eo pid,pcpu,pmem,etime,comm --sort=-pcpu 2>/dev/null | head -8
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"
# the GPU's clocks, power, temperature and throttle reasons once a second for the whole check, so that a slow or
# noisy row can be read against them (each throughput row also records them once, after its timed steps)
telemetry_pid=""
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
    --format=csv -l 1 > "$RESULTS/gpu_telemetry.csv" 2>&1 &
  telemetry_pid=$!
fi

# OUT: copies of the summaries and one archive of RESULTS, rewritten after every stage (at most 8 files)
pack() {
  local f
  for f in stages.txt environment.txt throughput/throughput.json kernels/kernels.json \
           throughput/attention_math.json throughput/attention_flex.json throughput/attention_mma.json; do
    if [ -f "$RESULTS/$f" ]; then
      local name; name=$(basename "$f")
      cp -f "$RESULTS/$f" "$OUT/$name.partial" && mv -f "$OUT/$name.partial" "$OUT/$name"
    fi
  done
  tar -czf "$OUT/gpu_check.tgz.partial" -C "$RESULTS" . 2>/dev/null && mv -f "$OUT/gpu_check.tgz.partial" "$OUT/gpu_check.tgz"
}
trap '[ -n "$telemetry_pid" ] && kill "$telemetry_pid" 2>/dev/null; pack' EXIT
pack

status=0
left() { echo $(( DEADLINE - (SECONDS - t0) )); }
# whether stage $1 runs in this check: named in STAGES (or STAGES empty) and, for the DeepSpeed stages, not
# --no-throughput and DeepSpeed importable
selected() { [ -z "$STAGES" ] || [[ " $STAGES " == *" $1 "* ]]; }  # named by STAGES, or no STAGES given
will_run() {
  selected "$1" || return 1
  if [[ " $DS_STAGES " == *" $1 "* ]]; then [ "$have_ds" = 1 ] && [ "$no_tp" != 1 ]; fi
}
# the seconds a stage keeps from the stages before it; a stage's limit leaves the shares of the later stages that
# run (reserve), so a stage not run (STAGES, --no-throughput, no DeepSpeed) holds no time back. With every stage
# run: gpu_tests leaves 480 s, throughput 170, attention_flex 130, attention_mma and irpe_aligned 110,
# engine_modes 60, attention_math 40
share() {
  case $1 in throughput) echo 310;; engine_modes) echo 50;; attention_math) echo 20;; attention_flex) echo 40;;
    attention_mma) echo 20;;
    gradient_buffer) echo 40;; *) echo 0;; esac
}
reserve() {
  local s r=0 after=0
  for s in $ALL_STAGES; do
    if [ "$after" = 1 ] && will_run "$s"; then r=$(( r + $(share "$s") )); fi
    [ "$s" = "$1" ] && after=1
  done
  echo "$r"
}
# stage NAME CAP RESERVE CMD...: run CMD with a time limit of min(CAP, what is left minus RESERVE for the
# stages after it); skipped (and recorded) when under 30 s would remain for it
stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  selected "$name" || return 0
  local limit=$(( $(left) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then
    echo "$name skipped: ${limit}s left for it" | tee -a "$RESULTS/stages.txt"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  ps -eo pid,pcpu,pmem,etime,comm --sort=-pcpu 2>/dev/null | head -6 > "$RESULTS/$name.ps"  # who else is busy
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
  selected "$1" || return 0
  if [ "$have_ds" != 1 ]; then
    echo "$1 skipped: no deepspeed" | tee -a "$RESULTS/stages.txt"
    status=1
    return 0
  fi
  stage "$@"
}
# the benchmark's own time budget: stop starting rows in time to write its report within the stage's limit
budget() { local b=$(( $(left) - $1 - 40 )); [ "$b" -gt "$2" ] && b=$2; echo $(( b > 30 ? b : 30 )); }

# shellcheck disable=SC2206
tests=(${GPU_TESTS:-tests/test_kernels.py tests/test_window_attention.py tests/test_randaugment.py})
stage gpu_tests 180 "$(reserve gpu_tests)" "$PY" -m pytest "${tests[@]}" -m gpu -q -rfE --tb=short -p no:cacheprovider \
  --junitxml="$RESULTS/gpu_tests.xml"

if [ "$no_tp" != 1 ]; then
  # shellcheck disable=SC2086
  # the variants are named, so that the CPU rehearsal runs them too, and the profile's target is a row of this
  # plan; with THROUGHPUT_ARGS the benchmark's defaults and its own profile choice apply
  # rows in the order the figures are needed: the shipped step and both models' best at each size first; then
  # LoMaR's whole model under CUDA graphs (the compiled step left the device idle 13% of the time, 2026-11-27);
  # LoMaR's whole-model rows at 384 and 448 (its windows do not depend on the image size) last
  plan=(--rows lomar:224:compile lomar:224:compile-model mae:224:compile-model lomar:384:compile
        mae:384:compile-model lomar:448:compile mae:448:compile-model lomar:224:compile-model-cudagraphs
        lomar:384:compile-model lomar:448:compile-model --profile --profile_target lomar:224:compile-model)
  [ -n "${THROUGHPUT_ARGS:-}" ] && plan=(--profile)
  ds_stage throughput 430 "$(reserve throughput)" "$PY" -m benchmarks.throughput --quick --out "$RESULTS/throughput" \
    --name throughput "${plan[@]}" --time_budget "$(budget "$(reserve throughput)" 380)" ${THROUGHPUT_ARGS:-} ${cpu_tp[@]+"${cpu_tp[@]}"}
  # FlexAttention's fused kernels with the iRPE term as their score modification (no (N, H, L, L) bias), compiled
  # blocks then the whole model compiled; the baselines are the throughput stage's lomar 224 compile and
  # compile-model rows
  ds_stage attention_flex 150 "$(reserve attention_flex)" env LOMAR_ATTN_PATH=flex "$PY" -m benchmarks.throughput --quick \
    --models lomar --sizes 224 --variants compile compile-model --out "$RESULTS/throughput" \
    --name attention_flex --time_budget "$(budget "$(reserve attention_flex)" 110)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the kernels on, with the warp-tiled attention kernels (ldmatrix, scores and softmax in registers), in the
  # shipped step, compiled blocks then the whole model compiled; the baselines are the throughput stage's lomar
  # 224 compile and compile-model rows
  ds_stage attention_mma 150 "$(reserve attention_mma)" env LOMAR_WA_KERNEL=mma "$PY" -m benchmarks.throughput --quick \
    --models lomar --sizes 224 --variants compile+kernels compile-model+kernels --out "$RESULTS/throughput" \
    --name attention_mma --time_budget "$(budget "$(reserve attention_mma)" 110)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the iRPE bias by batched matmuls into the padded layout SDPA's memory-efficient kernel reads without a copy
  # (LOMAR_IRPE_PATH=bmm_aligned: 16-byte-aligned GEMM rows); the baseline is the throughput stage's lomar 224
  # compile row (LOMAR_IRPE_PATH=bmm)
  ds_stage irpe_aligned 80 "$(reserve irpe_aligned)" env LOMAR_IRPE_PATH=bmm_aligned "$PY" -m benchmarks.throughput --quick \
    --models lomar --sizes 224 --variants compile --out "$RESULTS/throughput" --name irpe_aligned \
    --time_budget "$(budget "$(reserve irpe_aligned)" 40)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the engine modes the shipped configs left: DeepSpeed's bf16 (bf16 weights, ZeRO's fp32 master copy) and none
  ds_stage engine_modes 110 "$(reserve engine_modes)" "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 --variants compile \
    --engine_mode bf16 no_deepspeed --out "$RESULTS/throughput" --name engine_modes \
    --time_budget "$(budget "$(reserve engine_modes)" 70)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the explicit-logits attention (batched GEMMs + fp32 softmax) in the shipped step; the baseline is the
  # throughput stage's lomar 224 compile row, timed in this call
  ds_stage attention_math 80 "$(reserve attention_math)" env LOMAR_ATTN_PATH=math "$PY" -m benchmarks.throughput --quick --models lomar \
    --sizes 224 --variants compile --out "$RESULTS/throughput" --name attention_math \
    --time_budget "$(budget "$(reserve attention_math)" 40)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the same with ZeRO's contiguous gradient buffer, which the shipped JSON leaves off on one rank
  ds_stage gradient_buffer 80 "$(reserve gradient_buffer)" "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 --variants compile \
    --contiguous_gradients true --out "$RESULTS/throughput" --name gradient_buffer --time_budget "$(budget "$(reserve gradient_buffer)" 40)" \
    ${cpu_tp[@]+"${cpu_tp[@]}"}
  ds_stage batch512 150 "$(reserve batch512)" "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 \
    --variants compile compile-model --lomar_batch 512 --out "$RESULTS/throughput" --name batch512 \
    --time_budget "$(budget "$(reserve batch512)" 110)" ${cpu_tp[@]+"${cpu_tp[@]}"}
  # the levers that beat their baselines in the stages before, together (benchmarks/combine.py): one more row,
  # unless a stage measured that combination already (one lever won, or none)
  if will_run combined; then
    combo=()
    mapfile -t combo < <("$PY" -m benchmarks.combine --results "$RESULTS/throughput" \
      --plan "$RESULTS/throughput/combined_plan.json" 2>> "$RESULTS/combine.log")
    if [ "${#combo[@]}" = 2 ]; then
      read -r -a combo_env <<< "${combo[0]}"
      read -r -a combo_args <<< "${combo[1]}"
      ds_stage combined 150 "$(reserve combined)" env ${combo_env[@]+"${combo_env[@]}"} "$PY" -m benchmarks.throughput \
        --quick "${combo_args[@]}" --out "$RESULTS/throughput" --name combined \
        --time_budget "$(budget "$(reserve combined)" 110)" ${cpu_tp[@]+"${cpu_tp[@]}"}
    else
      echo "combined skipped: $("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["skip"])' \
        "$RESULTS/throughput/combined_plan.json" 2>/dev/null || echo "no plan: see combine.log")" | tee -a "$RESULTS/stages.txt"
    fi
  fi
fi

# KERNEL_CASES: names with spaces and brackets (e.g. "irpe_attention[compiled aligned bmm path]"), so commas part them
# (not in the CPU rehearsal: its float32 smoke run has no bf16-only case, such as the [mma] rows)
kcases=()
if [ -n "${KERNEL_CASES:-}" ] && [ "$rehearsal" = 0 ]; then
  IFS=, read -ra kcases <<< "$KERNEL_CASES"
  kcases=(--cases "${kcases[@]}")
fi
stage kernels 150 "$(reserve kernels)" "$PY" -m benchmarks.kernels --out "$RESULTS/kernels" "${cpu_k[@]}" \
  ${kcases[@]+"${kcases[@]}"}
if [ "$no_tp" != 1 ]; then
  # shellcheck disable=SC2086
  ds_stage autotune 240 0 "$PY" -m benchmarks.throughput --quick --models lomar --sizes 224 --variants compile-autotune \
    --out "$RESULTS/throughput" --name autotune --time_budget "$(budget 0 200)" ${cpu_tp[@]+"${cpu_tp[@]}"}
fi
echo "gpu_check exit $status after $(( SECONDS - t0 ))s"
exit $status

#!/usr/bin/env bash
# One-shot GPU check for an offline GPU host (Python 3.12, torch, cupy; no deepspeed/ffcv):
# installs the kit (.whl/, built here by `make gpu-kit`) with benchmarks/gpu_kit_install.sh into
# ${SITE:-/tmp/site}, runs the GPU tests, then the kernel and throughput benchmarks.
# Results go under ${OUT:-benchmarks/results/gpu_check}.
#   usage: bash benchmarks/gpu_check.sh [--no-throughput]
#   env:   OUT (results folder), SITE (kit target), TEST_TIMEOUT, KERNEL_TIMEOUT, THROUGHPUT_TIMEOUT (seconds)
set -uo pipefail
cd "$(dirname "$0")/.."
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
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import cupy; print('cupy', cupy.__version__)" 2>&1
  git rev-parse HEAD 2>/dev/null
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

status=0
echo "== GPU tests"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/test_kernels.py tests/test_window_attention.py tests/test_randaugment.py \
  -m gpu -q -rfE \
  --tb=short -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== kernel benchmark"
timeout "${KERNEL_TIMEOUT:-150}" python3 -m benchmarks.kernels --out "$OUT/kernels" --quick 2>&1 | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ "${1:-}" != "--no-throughput" ]; then
  echo "== throughput benchmark"
  timeout "${THROUGHPUT_TIMEOUT:-400}" python3 -m benchmarks.throughput --quick --out "$OUT/throughput" \
    ${THROUGHPUT_ARGS:-} 2>&1 | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
echo "gpu_check exit $status"
exit $status

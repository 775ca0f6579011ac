#!/usr/bin/env bash
# The main job on a GPU, end to end, in about 9 minutes: installs the offline kit (.whl/, from `make gpu-kit`)
# into /tmp/site, then runs benchmarks/e2e.py: 20,000 synthetic photo-like JPEGs -> .beton, ViT-B/16 LoMaR
# pretraining through the deepspeed launcher (ZeRO-2, bf16) with its images/sec against the synthetic-batch step
# and the loader alone, a SIGKILL in mid-epoch and --resume auto, fine-tuning with ZeRO-3 bf16, --eval, k-NN.
# Results are written as they come: $OUT/e2e.json (schema lomar_fast.e2e/1), $OUT/e2e/<stage>.json, logs.
#   usage: bash benchmarks/gpu_e2e.sh [benchmarks.e2e flags, e.g. --steps 20 --deadline 420]
#   env:   OUT (results, default benchmarks/results/e2e), PYTHON (default python3), SITE (default /tmp/site),
#          E2E_CPU=1 (the scaled-down CPU mode: tiny models, DS_ACCELERATOR=cpu), E2E_KIT=0 (skip the kit install)
# Exit 0 when every stage passed; 1 when one failed, ran out of time or was skipped; 2 when the kit cannot work.
set -uo pipefail
cd "$(dirname "$0")/.."
export E2E_T0="${E2E_T0:-$(date +%s.%N)}"   # the deadline counts from here, kit install included
OUT="${OUT:-benchmarks/results/e2e}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT
py="${PYTHON:-python3}"
site="${SITE:-/tmp/site}"

if [ "${E2E_KIT:-1}" != "0" ] && [ -f .whl/kit.json ]; then
  echo "== kit: installing .whl/ into $site"
  if ! PYTHON="$py" SITE="$site" bash benchmarks/gpu_kit_install.sh --report "$OUT/kit_install.json"; then
    echo "the kit did not install; see $OUT/kit_install.json"
    exit 2
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
  export E2E_KIT_REPORT="$OUT/kit_install.json"
else
  [ "${E2E_KIT:-1}" != "0" ] && echo "== kit: no .whl/kit.json here (make gpu-kit builds it); using this environment as it is"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export LOMAR_KERNELS="${LOMAR_KERNELS:-auto}"
cpu_flag=()
[ -n "${E2E_CPU:-}" ] && [ "${E2E_CPU}" != "0" ] && cpu_flag=(--cpu)
exec "$py" -m benchmarks.e2e --out "$OUT" "${cpu_flag[@]}" "$@"

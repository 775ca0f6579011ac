#!/usr/bin/env bash
# The main job on a GPU, end to end, in about 9 minutes: installs the offline kit (.whl/, from `make gpu-kit`)
# into /tmp/site, then runs benchmarks/e2e.py: 20,000 synthetic photo-like JPEGs -> .beton, ViT-B/16 LoMaR
# pretraining through the deepspeed launcher (ZeRO-2, bf16) with its images/sec against the synthetic-batch step
# and the loader alone, a SIGKILL in mid-epoch and --resume auto, fine-tuning with ZeRO-3 bf16, --eval, k-NN.
# Results are written as they come under RESULTS (default: a new /tmp/lomar_e2e_results.XXXXXX): e2e.json
# (schema lomar_fast.e2e/1), e2e/<stage>.json, logs; after every stage OUT (default benchmarks/results/e2e)
# receives e2e.json and e2e.tgz (all of RESULTS), two files (a device call returns at most 8).
#   usage: bash benchmarks/gpu_e2e.sh [benchmarks.e2e flags, e.g. --steps 20 --deadline 420]
#   env:   OUT, RESULTS, PYTHON (default python3), SITE (default /tmp/site),
#          E2E_CPU=1 (the scaled-down CPU mode: tiny models, DS_ACCELERATOR=cpu), E2E_KIT=0 (skip the kit install)
# Exit 0 when every stage passed; 1 when one failed, ran out of time or was skipped; 2 when the kit cannot work.
set -uo pipefail
cd "$(dirname "$0")/.."
export E2E_T0="${E2E_T0:-$(date +%s.%N)}"   # the deadline counts from here, kit install included
OUT="${OUT:-benchmarks/results/e2e}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RESULTS="${RESULTS:-$(mktemp -d /tmp/lomar_e2e_results.XXXXXX)}"
mkdir -p "$RESULTS"
py="${PYTHON:-python3}"
site="${SITE:-/tmp/site}"
give_up() {  # the kit cannot work: say why, hand over what there is, exit 2
  echo "$1"
  tar -czf "$OUT/e2e.tgz" -C "$RESULTS" . 2>/dev/null
  exit 2
}

if [ "${E2E_KIT:-1}" != "0" ] && [ -f .whl/kit.json ]; then
  echo "== kit: installing .whl/ into $site"
  if ! PYTHON="$py" SITE="$site" bash benchmarks/gpu_kit_install.sh --report "$RESULTS/kit_install.json"; then
    give_up "the kit did not install; see kit_install.json in $OUT/e2e.tgz"
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
  export E2E_KIT_REPORT="$RESULTS/kit_install.json"
else
  [ "${E2E_KIT:-1}" != "0" ] && echo "== kit: no .whl/kit.json here (make gpu-kit builds it); using this environment as it is"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export LOMAR_KERNELS="${LOMAR_KERNELS:-auto}"
cpu_flag=()
[ -n "${E2E_CPU:-}" ] && [ "${E2E_CPU}" != "0" ] && cpu_flag=(--cpu)
"$py" -c "import deepspeed, ffcv" > "$RESULTS/imports.log" 2>&1 \
  || give_up "deepspeed or ffcv cannot be imported (make gpu-kit builds .whl/; carry it): $(tail -1 "$RESULTS/imports.log")"
exec "$py" -m benchmarks.e2e --out "$RESULTS" --pack "$OUT" "${cpu_flag[@]}" "$@"

#!/usr/bin/env bash
# Install the offline GPU kit (.whl/, built by `make gpu-kit`) for this host's python3 into a target folder,
# then import ffcv and deepspeed from it to prove it works. The GPU scripts call this and then put the target
# and the repository on PYTHONPATH.
#   usage: bash benchmarks/gpu_kit_install.sh [--kit DIR] [--target DIR] [--all] [--report FILE] [--check-only]
#   env:   PYTHON (default python3), KIT (default .whl), SITE (default /tmp/site)
# deepspeed and ffcv are always installed; each other wheel only where the host lacks it or has an older
# version (--all: every wheel). Exit 0 on success, 2 with one message when the kit cannot work here.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
args=(--kit "${KIT:-$repo/.whl}" --target "${SITE:-/tmp/site}")
exec "$py" "$repo/benchmarks/gpu_kit.py" install "${args[@]}" "$@"

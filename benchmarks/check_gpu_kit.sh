#!/usr/bin/env bash
# Proves the offline GPU kit (.whl/, `make gpu-kit`) on this CPU machine, the way the GPU host will use it:
#  1. a clean Python 3.12 venv with only what the host has (torch, numpy, numba, opencv-python-headless, Pillow,
#     PyYAML, timm, matplotlib), made once and kept in $KITCHECK_VENV;
#  2. benchmarks/gpu_kit_install.sh installs the kit into a fresh --target folder, as on the host;
#  3. in a private mount namespace where the system's copies of the libraries the kit vendors are replaced by
#     /dev/null (so loading one would fail; those the interpreter and the host's packages load anyway, such as
#     zlib, stay), with LD_DEBUG=libs: `gpu_kit selftest` writes a small .beton with
#     the kit's ffcv and reads two epochs of the pretraining pipeline, and a tiny LoMaR pretraining runs for
#     2 steps through the kit's DeepSpeed (DS_ACCELERATOR=cpu);
#  4. the same .beton read by the project's own environment (.venv, the system libraries) must give the same
#     pixels (SHA-256), and the loader's trace must show every OpenCV/libjpeg-turbo load coming from ffcv.libs.
# Writes $OUT/kit_check.json (default build/gpu_kit/check). Exit 0 when every check holds.
#   usage: bash benchmarks/check_gpu_kit.sh
#   env:   PYTHON312, KITCHECK_VENV (default ~/.cache/lomar_fast/kitcheck-py312), REF_PYTHON (default .venv/bin/python),
#          OUT, KITCHECK_HIDE=0 (do not hide the system libraries)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
OUT="${OUT:-$repo/build/gpu_kit/check}"
mkdir -p "$OUT"
fail() { echo "kit check FAILED: $*"; exit 1; }
[ -f .whl/kit.json ] || fail "no .whl/kit.json: build the kit with make gpu-kit"

py312="${PYTHON312:-$(command -v python3.12 || ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1)}"
[ -n "$py312" ] && [ -x "$py312" ] || fail "no Python 3.12 (set PYTHON312=/path/to/python3.12)"
venv="${KITCHECK_VENV:-$HOME/.cache/lomar_fast/kitcheck-py312}"
if [ ! -f "$venv/.kitcheck-ready" ]; then
  echo "== making the host-like Python 3.12 venv $venv (once)"
  rm -rf "$venv" && "$py312" -m venv "$venv" || fail "venv"
  "$venv/bin/pip" install -q ${KITCHECK_TORCH:-torch} numpy numba opencv-python-headless pillow pyyaml timm matplotlib \
    || fail "pip install of the host-like packages"
  touch "$venv/.kitcheck-ready"
fi
vpy="$venv/bin/python"
for d in ffcv deepspeed hjson pydantic; do
  "$vpy" -c "import importlib.metadata as m; m.version('$d')" 2>/dev/null \
    && fail "$venv has $d installed; it must lack what the kit brings"
done

tmp="$(mktemp -d /tmp/kitcheck.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
echo "== installing the kit into $tmp/site"
PYTHON="$vpy" SITE="$tmp/site" bash benchmarks/gpu_kit_install.sh --report "$OUT/install.json" || fail "install"

# the system copies of the vendored libraries (the files their sonames resolve to), less those the interpreter
# and the host's own packages load without ffcv (zlib, for one: Python's zlib module needs it on every host)
mapfile -t hide < <("$vpy" - <<'EOF'
import json, os
import PIL.Image, cv2, numba, numpy, timm, torch, yaml  # what the host imports without the kit
baseline = {os.path.realpath(l.split()[-1]) for l in open("/proc/self/maps") if len(l.split()) >= 6}
m = json.load(open(".whl/kit.json"))
for v in m["ffcv"]["vendored"]:
    real = os.path.realpath(v["from"])
    if os.path.exists(real) and real not in baseline:
        print(real)
EOF
)
hidden=0
printf '%s\n' "${hide[@]}" > "$OUT/hidden.txt"
inner="$tmp/inner.sh"
cat > "$inner" <<EOF
set -uo pipefail
for f in ${hide[*]}; do mount --bind /dev/null "\$f" || exit 97; done
cd "$repo"
export PYTHONPATH="$repo:$tmp/site" DS_ACCELERATOR=cpu OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
LD_DEBUG=libs LD_DEBUG_OUTPUT="$tmp/ld" "$vpy" -m benchmarks.gpu_kit selftest --work "$tmp/data" --out "$OUT/selftest_kit.json" >/dev/null || exit 11
"$vpy" -m lomar_fast.pretrain --deepspeed_config ds_configs/cpu.json --data_path "$tmp/data/data/train.beton" \
  --model lomar_vit_tiny_patch16 --input_size 64 --window_size 3 --num_window 2 --batch_size 16 --epochs 1 \
  --warmup_epochs 0 --max_steps_per_epoch 2 --num_workers 2 --log_every 1 --output_dir "$tmp/run" > "$OUT/pretrain.log" 2>&1 || exit 12
EOF
if [ "${KITCHECK_HIDE:-1}" != "0" ] && [ "$(id -u)" = 0 ] && unshare -m --propagation private true 2>/dev/null; then
  echo "== selftest and a 2-step pretraining with ${#hide[@]} system libraries hidden (private mount namespace)"
  unshare -m --propagation private bash "$inner"; rc=$?
  hidden=1
else
  echo "== selftest and a 2-step pretraining (system libraries NOT hidden: needs root and unshare)"
  sed -i '/mount --bind/d' "$inner"
  bash "$inner"; rc=$?
fi
[ "$rc" = 97 ] && fail "could not hide the system libraries"
[ "$rc" = 11 ] && fail "selftest with the kit's ffcv (see above)"
[ "$rc" = 12 ] && fail "2-step pretraining with the kit (log: $OUT/pretrain.log)"
[ "$rc" = 0 ] || fail "inner check exit $rc"

ref="${REF_PYTHON:-$repo/.venv/bin/python}"
[ -x "$ref" ] || ref=""
if [ -n "$ref" ]; then
  echo "== the same .beton through the project's environment ($ref, system libraries)"
  PYTHONPATH="$repo" "$ref" -m benchmarks.gpu_kit selftest --beton "$tmp/data/data/train.beton" \
    --out "$OUT/selftest_reference.json" >/dev/null || fail "reference selftest"
fi
cat "$tmp"/ld.* > "$OUT/ld_debug.txt" 2>/dev/null

"$vpy" - "$OUT" "$hidden" "$ref" "$tmp" <<'EOF'
import json, re, sys
from pathlib import Path
out, hidden, ref, tmp = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
kit = json.loads((out / "selftest_kit.json").read_text())
inits = re.findall(r"calling init: (\S+)", (out / "ld_debug.txt").read_text())
image_libs = [p for p in inits if re.search(r"lib(opencv_\w+|turbojpeg)", p.rsplit("/", 1)[-1])]
manifest = json.load(open(".whl/kit.json"))
log = (out / "pretrain.log").read_text()
checks = {
    "ffcv imported from the kit": kit["ffcv_file"].startswith(tmp + "/site/"),
    "OpenCV and libjpeg-turbo initialised from ffcv.libs only": bool(image_libs) and all("/ffcv.libs/" in p for p in image_libs),
    "every vendored library with a NEEDED entry mapped": len(kit["vendored_loaded"]) >= len(
        [v for v in manifest["ffcv"]["vendored"] if "opened_by" not in v]),
    "two epochs read": kit["images"] == 2 * 64,
    "2-step pretraining through the kit's deepspeed": "loss by epoch: 0:" in log,
}
res = {"python": kit["python"], "system_copies_hidden": hidden,
       "hidden": [l for l in (out / "hidden.txt").read_text().splitlines() if l] if hidden else [],
       "image_libraries_initialised": image_libs, "kit_pixels_sha256": kit["pixels_sha256"]}
if ref:
    r = json.loads((out / "selftest_reference.json").read_text())
    res.update(reference_python=r["python"], reference_pixels_sha256=r["pixels_sha256"])
    checks["same pixels as the project's environment"] = r["pixels_sha256"] == kit["pixels_sha256"]
res["checks"] = checks
(out / "kit_check.json").write_text(json.dumps(res, indent=1) + "\n")
for k, v in checks.items():
    print(f"  {'ok ' if v else 'NO '} {k}")
sys.exit(0 if all(checks.values()) else 1)
EOF
rc=$?
[ "$rc" = 0 ] && echo "kit check passed: $OUT/kit_check.json" || echo "kit check FAILED: $OUT/kit_check.json"
exit $rc

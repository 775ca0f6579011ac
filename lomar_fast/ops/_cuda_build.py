"""Run-time build and launch of the CUDA sources in ``cuda/``.

Each kernel is compiled at its first launch in a process, with NVRTC through CuPy (``cupy.RawModule``): a module
of its own, the ``.cu`` file without its explicit instantiations (those are for nvcc) and the kernel's name
expression. CuPy compiles a module with name expressions anew in every process (it reads its disk cache only for
modules without them, since the cache holds no mangled names), so only the kernels a run uses are built: 0.06-2.8 s
each to sm_90 on a 2-core CPU, where window_attention.cu with every template variant took 61 s. Kernels are
launched on PyTorch's current stream of the tensors' device.

Where the sources are found, first match wins:

1. ``$LOMAR_CUDA_DIR`` (a directory holding the ``.cu`` files);
2. ``cuda/`` next to the package directory (the repository root of a source or editable install);
3. ``lomar_fast/cuda/`` inside the package (a wheel that ships the sources as package data).

CuPy is imported lazily: importing this module needs neither CuPy nor a GPU.
"""
from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Options given to NVRTC (CuPy adds the target architecture and ``-ftz=true``). The tests compile the
# sources with exactly these options plus an architecture, so NVRTC-only problems show up on CPU.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

# torch dtype -> the C++ type name the kernels use for it
CUDA_TYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.bfloat16: "lomar_bf16",
    torch.float16: "lomar_f16",
    torch.uint8: "unsigned char",
}

_lock = threading.Lock()
_modules: dict[tuple[str, int, tuple[str, ...], tuple[str, ...]], object] = {}
_sm_counts: dict[int, int] = {}


def cuda_source_dirs() -> list[Path]:
    """Candidate directories for the ``.cu`` sources, in search order."""
    dirs: list[Path] = []
    env = os.environ.get("LOMAR_CUDA_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    package_dir = Path(__file__).resolve().parent.parent  # .../lomar_fast
    dirs.append(package_dir.parent / "cuda")
    dirs.append(package_dir / "cuda")
    return dirs


def cuda_source_path(filename: str) -> Path:
    """Path of ``filename`` (e.g. ``"irpe.cu"``), or FileNotFoundError naming where it was looked for."""
    tried = []
    for d in cuda_source_dirs():
        p = d / filename
        if p.is_file():
            return p
        tried.append(str(p))
    raise FileNotFoundError(
        f"CUDA source {filename!r} not found; looked at: {', '.join(tried)}. "
        "Set LOMAR_CUDA_DIR to the directory holding the lomar_fast .cu files, or set LOMAR_KERNELS=off."
    )


_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


def cuda_source(filename: str) -> str:
    """Text of a CUDA source file, with ``#include "x.cuh"`` of files beside it inlined (each once).

    NVRTC compiles a string with no directory of its own, so local headers are pasted in here; nvcc
    finds them beside the file as usual.
    """
    path = cuda_source_path(filename)
    seen: set[str] = set()

    def expand(text: str, where: Path) -> str:
        def paste(m: re.Match) -> str:
            name = m.group(1)
            header = where / name
            if not header.is_file():
                raise FileNotFoundError(f"{filename}: #include \"{name}\" not found beside it in {where}")
            if name in seen:
                return ""
            seen.add(name)
            body = header.read_text().replace("#pragma once\n", "")
            return f"// ---- {name}\n" + expand(body, header.parent) + f"// ---- end of {name}"

        return _LOCAL_INCLUDE.sub(paste, text)

    return expand(path.read_text(), path.parent)


EXPLICIT_INSTANTIATIONS = "// Explicit instantiations"  # where a .cu file's nvcc-only part starts


def runtime_source(filename: str) -> str:
    """:func:`cuda_source` up to its explicit instantiations: what NVRTC compiles at run time, each kernel
    instantiated by its name expression alone."""
    return cuda_source(filename).split(EXPLICIT_INSTANTIATIONS)[0]


def _import_cupy():
    try:
        import cupy  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lomar_fast CUDA kernels need CuPy (pip install 'lomar_fast[gpu]', i.e. cupy-cuda12x); "
            "or set LOMAR_KERNELS=off to use the PyTorch reference paths"
        ) from e
    return cupy


def get_module(filename: str, name_expressions: tuple[str, ...], device: torch.device,
               options: tuple[str, ...] = ()):
    """The compiled ``cupy.RawModule`` of :func:`runtime_source` ``(filename)`` with the kernels
    ``name_expressions`` for ``device``, built with :data:`NVRTC_OPTIONS` plus ``options`` (such as
    ``-DNAME=VALUE``); compiled once per process, device, kernels and options."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (filename, index, tuple(name_expressions), tuple(options))
    mod = _modules.get(key)
    if mod is not None:
        return mod
    cupy = _import_cupy()
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            with cupy.cuda.Device(index):
                mod = cupy.RawModule(
                    code=runtime_source(filename),
                    options=NVRTC_OPTIONS + tuple(options),
                    name_expressions=list(name_expressions),
                )
                for name in name_expressions:  # compile and load now, not inside a timed launch
                    mod.get_function(name)
            _modules[key] = mod
    return mod


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(index)
    if n is None:
        n = torch.cuda.get_device_properties(index).multi_processor_count
        _sm_counts[index] = n
    return n


# Kernel-argument helpers: explicit numpy scalars so every argument has the C++ parameter's width.
def ptr(t: torch.Tensor) -> np.uint64:
    """Device address of a tensor's first element, for a pointer parameter."""
    return np.uint64(t.data_ptr())


def i32(x: int) -> np.int32:
    return np.int32(x)


def i64(x: int) -> np.int64:
    return np.int64(x)


def f32(x: float) -> np.float32:
    return np.float32(x)


def launch(filename: str, name_expressions: tuple[str, ...], kernel: str, device: torch.device,
           grid: int, block: int, args: tuple, shared_mem: int = 0, options: tuple[str, ...] = ()) -> None:
    """Launch ``kernel`` (one of ``filename``'s ``name_expressions``, built alone with ``options``:
    :func:`get_module`) on the current PyTorch stream of ``device``."""
    if kernel not in name_expressions:
        raise ValueError(f"{filename} has no kernel {kernel!r}; its kernels: {', '.join(name_expressions)}")
    if grid <= 0:
        return
    cupy = _import_cupy()
    mod = get_module(filename, (kernel,), device, options)
    fn = mod.get_function(kernel)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index), _external_stream(cupy, stream, index):
        fn((int(grid),), (int(block),), args, shared_mem=int(shared_mem))


_STREAMS: dict[tuple[int, int], Any] = {}


def _external_stream(cupy, stream: int, index: int):
    """CuPy's handle on PyTorch's stream ``stream`` of GPU ``index``, made once per stream (it owns nothing).
    CuPy 14 marks ``ExternalStream`` deprecated; its warning is kept out of the users' logs."""
    ext = _STREAMS.get((stream, index))
    if ext is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                ext = cupy.cuda.ExternalStream(stream, index)
            except TypeError:  # older CuPy: no device_id argument
                ext = cupy.cuda.ExternalStream(stream)
        _STREAMS[(stream, index)] = ext
    return ext

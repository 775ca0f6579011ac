"""Kernel switch shared by the ops: ``LOMAR_KERNELS=on|off|auto`` or :func:`set_kernels`.

* ``off``  - always the pure-PyTorch reference path.
* ``on``   - the CUDA kernel for every CUDA tensor (an error if it cannot be built).
* ``auto`` - the kernel only where a committed GPU benchmark showed it correct and faster
  (each op names its own ``auto`` choice) and CuPy is installed; otherwise the PyTorch path.

CPU tensors always take the reference path.
"""
from __future__ import annotations

import os

_VALID = ("on", "off", "auto")
_override: str | None = None


def set_kernels(mode: str | None) -> None:
    """Set the kernel mode for this process (``None`` returns to the environment variable)."""
    global _override
    if mode is not None and mode not in _VALID:
        raise ValueError(f"kernel mode {mode!r} is not one of {_VALID}; pass on, off or auto")
    _override = mode


def kernel_mode() -> str:
    """The active mode: the value given to :func:`set_kernels`, else ``$LOMAR_KERNELS``, else ``auto``."""
    if _override is not None:
        return _override
    mode = os.environ.get("LOMAR_KERNELS", "auto").strip().lower()
    if mode not in _VALID:
        raise ValueError(f"LOMAR_KERNELS={mode!r} is not one of {_VALID}; set it to on, off or auto")
    return mode


def use_kernel(*tensors, auto_default: bool) -> bool:
    """Whether an op should launch its CUDA kernel for these tensors."""
    return all(t.is_cuda for t in tensors) and kernel_chosen(auto_default)


def kernel_chosen(auto_default: bool) -> bool:
    """Whether the mode picks an op's CUDA kernel for CUDA inputs (``auto_default``: the op's ``auto`` choice)."""
    mode = kernel_mode()
    if mode == "off":
        return False
    if mode == "on":
        return True
    return auto_default and cupy_available()


_cupy_ok: bool | None = None


def cupy_available() -> bool:
    """Whether CuPy (which compiles and launches the kernels) can be imported and the ``.cu`` sources
    are found (see ``_cuda_build.cuda_source_dirs``); ``auto`` needs both."""
    global _cupy_ok
    if _cupy_ok is None:
        import importlib.util

        from ._cuda_build import cuda_source_dirs

        has_sources = any((d / "window_gather.cu").is_file() for d in cuda_source_dirs())
        _cupy_ok = importlib.util.find_spec("cupy") is not None and has_sources
    return _cupy_ok

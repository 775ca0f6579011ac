"""Contextual iRPE on keys: ``bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)]``.

This file owns the operation: :func:`irpe_key_bias` dispatches to the fused CUDA kernel for CUDA
tensors when kernels are enabled (see :mod:`lomar_fast.ops._dispatch`), and to a pure-PyTorch path
otherwise: the reference path (an indexing gather, which defines the meaning) or its batched-matmul
reformulation :func:`irpe_key_bias_bmm` (``DEFAULT_PATH`` or ``$LOMAR_IRPE_PATH``), which is tested equal to it,
plain or into SDPA's aligned bias layout.
Both live in :mod:`lomar_fast.ops.irpe_ref`, with the input checks.
"""
from __future__ import annotations

import os

import torch

from ._dispatch import use_kernel
from .irpe_ref import SDPA_BIAS_ALIGN, check_irpe_inputs, irpe_key_bias_bmm, irpe_key_bias_reference

__all__ = ["irpe_key_bias", "irpe_key_bias_bmm", "irpe_key_bias_reference", "irpe_path", "check_irpe_inputs",
           "IRPE_PATHS", "SDPA_BIAS_ALIGN"]

# A kernel becomes the ``auto`` default only after a committed GPU benchmark shows it correct and faster.
# benchmarks/results/h200/kernels.md: correct, but slower than the compiled reference -> off.
AUTO_USES_KERNEL = False
# Without the kernel: "bmm" (batched-matmul formulation, no scatter), "bmm_aligned" (the same into the padded
# layout SDPA's memory-efficient kernel reads without a copy, rows a multiple of 8 wide) or "reference"
# (gather); $LOMAR_IRPE_PATH overrides.
# "bmm" by default: benchmarks/results/h200/throughput_irpe_{reference,bmm}.md measure the compiled
# LoMaR ViT-B step at 2194 -> 2639 img/s (224) and 2143 -> 2411 img/s (448) on one H200. "bmm_aligned" has no
# GPU figure yet (benchmarks/gpu_check.sh, stage irpe_aligned, times it against "bmm").
IRPE_PATHS = ("bmm", "bmm_aligned", "reference")
DEFAULT_PATH = "bmm"


def irpe_path() -> str:
    """``$LOMAR_IRPE_PATH``, else the default; anything but :data:`IRPE_PATHS` is a ValueError."""
    path = os.environ.get("LOMAR_IRPE_PATH", DEFAULT_PATH).strip().lower()
    if path not in IRPE_PATHS:
        raise ValueError(f"LOMAR_IRPE_PATH={path!r} must be one of {', '.join(IRPE_PATHS)}")
    return path


def irpe_key_bias(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """The iRPE key term for ``scaled_dot_product_attention``'s additive mask.

    Shapes as in :func:`irpe_key_bias_reference`. Differentiable in ``q`` and ``table``.
    """
    check_irpe_inputs(q, table, buckets)
    if use_kernel(q, table, auto_default=AUTO_USES_KERNEL):
        from . import _irpe_cuda  # imported lazily: needs CuPy and a GPU

        return _irpe_cuda.irpe_key_bias(q, table, buckets.to(q.device))  # the kernel reads it on the device
    path = irpe_path()
    if path == "bmm":
        return irpe_key_bias_bmm(q, table, buckets)
    if path == "bmm_aligned":
        return irpe_key_bias_bmm(q, table, buckets, align=SDPA_BIAS_ALIGN)
    return irpe_key_bias_reference(q, table, buckets)

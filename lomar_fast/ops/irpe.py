"""Contextual iRPE on keys: ``bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)]``.

This file owns the operation: :func:`irpe_key_bias` dispatches to the fused CUDA kernel for CUDA
tensors when kernels are enabled (see :mod:`lomar_fast.ops._dispatch`), and to a pure-PyTorch path
otherwise: the reference path (an indexing gather, which defines the meaning) or its batched-matmul
reformulation :func:`irpe_key_bias_bmm` (``DEFAULT_PATH`` or ``$LOMAR_IRPE_PATH``), which is tested equal to it.
"""
from __future__ import annotations

import os

import torch

from ._dispatch import use_kernel

# A kernel becomes the ``auto`` default only after a committed GPU benchmark shows it correct and faster.
# benchmarks/results/h200/kernels.md: correct, but slower than the compiled reference -> off.
AUTO_USES_KERNEL = False
# Without the kernel: "bmm" (batched-matmul formulation, no scatter) or "reference" (gather);
# $LOMAR_IRPE_PATH overrides.
# "bmm" by default: benchmarks/results/h200/throughput_irpe_{reference,bmm}.md measure the compiled
# LoMaR ViT-B step at 2194 -> 2639 img/s (224) and 2143 -> 2411 img/s (448) on one H200.
DEFAULT_PATH = "bmm"


def irpe_path() -> str:
    path = os.environ.get("LOMAR_IRPE_PATH", DEFAULT_PATH).strip().lower()
    if path not in ("bmm", "reference"):
        raise ValueError(f"LOMAR_IRPE_PATH={path!r} must be 'bmm' or 'reference'")
    return path


def irpe_key_bias_reference(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """Reference path: project queries onto every bucket, then look each pair's bucket up.

    Args:
        q: (N, H, L, D) queries, any float dtype.
        table: (D, NB) lookup table shared by all heads (``lookup_table_weight[0]``).
        buckets: (L, L) int64 bucket of each (query, key) pair, values in ``[0, NB)``.
    Returns:
        (N, H, L, L) bias in ``q``'s dtype.
    """
    qt = torch.matmul(q, table.to(q.dtype))  # (N, H, L, NB)
    n, h, l, _ = qt.shape
    index = buckets.view(1, 1, l, l).expand(n, h, l, l)
    return torch.gather(qt, -1, index)


def irpe_key_bias_bmm(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """The same term as one batched matmul per query position, with no activation-sized scatter.

    With M[i, :, j] = T[:, bucket(i, j)] (a (L, D, L) tensor built from the small table),
    bias[n, h, i, :] = q[n, h, i, :] @ M[i]: a bmm over i of (N*H, D) x (D, L). Its backward is two
    more bmms plus a scatter into the (D, NB) table from the (L, D, L) gradient of M, instead of the
    reference's scatter-add of an (N, H, L, L) gradient into (N, H, L, NB) (atomics on activations).
    Shapes and dtypes as :func:`irpe_key_bias_reference`; the result is an (N, H, L, L) view whose
    last dimension is contiguous.
    """
    n, h, l, d = q.shape
    m = table.to(q.dtype)[:, buckets].permute(1, 0, 2)  # (L, D, L)
    qi = q.permute(2, 0, 1, 3).reshape(l, n * h, d)
    return torch.bmm(qi, m).view(l, n, h, l).permute(1, 2, 0, 3)


def _check(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"irpe_key_bias: q must be (N, H, L, D), got shape {tuple(q.shape)}")
    if table.dim() != 2 or table.shape[0] != q.shape[-1]:
        raise ValueError(
            f"irpe_key_bias: table must be (head_dim={q.shape[-1]}, buckets), got {tuple(table.shape)}"
        )
    L = q.shape[-2]
    if buckets.shape != (L, L) or buckets.dtype != torch.long:
        raise ValueError(
            f"irpe_key_bias: buckets must be int64 ({L}, {L}), got {buckets.dtype} {tuple(buckets.shape)}"
        )


def irpe_key_bias(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """The iRPE key term for ``scaled_dot_product_attention``'s additive mask.

    Shapes as in :func:`irpe_key_bias_reference`. Differentiable in ``q`` and ``table``.
    """
    _check(q, table, buckets)
    if use_kernel(q, table, auto_default=AUTO_USES_KERNEL):
        from . import _irpe_cuda  # imported lazily: needs CuPy and a GPU

        return _irpe_cuda.irpe_key_bias(q, table, buckets)
    if irpe_path() == "bmm":
        return irpe_key_bias_bmm(q, table, buckets)
    return irpe_key_bias_reference(q, table, buckets)

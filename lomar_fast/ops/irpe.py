"""Contextual iRPE on keys: ``bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)]``.

This file owns the operation: :func:`irpe_key_bias` dispatches to the fused CUDA kernel for CUDA
tensors when kernels are enabled (see :mod:`lomar_fast.ops._dispatch`), and to the reference path
below otherwise. The reference path defines the meaning.
"""
from __future__ import annotations

import torch

from ._dispatch import use_kernel

# A kernel becomes the ``auto`` default only after a committed GPU benchmark shows it correct and faster.
AUTO_USES_KERNEL = False


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
    return irpe_key_bias_reference(q, table, buckets)

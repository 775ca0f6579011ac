"""Meaning and input checks of the contextual iRPE key term, shared by the op's owner
(:mod:`lomar_fast.ops.irpe`) and its CUDA wrapper (:mod:`lomar_fast.ops._irpe_cuda`).

``bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)]``: :func:`irpe_key_bias_reference` (an indexing
gather) defines it; :func:`irpe_key_bias_bmm` computes the same term as batched matmuls (tested equal).
"""
from __future__ import annotations

import torch


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


def check_irpe_inputs(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> None:
    """Raise ValueError naming the input when q, table and buckets do not fit together."""
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

"""Meaning and input checks of the contextual iRPE key term, shared by the op's owner
(:mod:`lomar_fast.ops.irpe`) and its CUDA wrapper (:mod:`lomar_fast.ops._irpe_cuda`).

``bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)]``: :func:`irpe_key_bias_reference` (an indexing
gather) defines it; :func:`irpe_key_bias_bmm` computes the same term as batched matmuls (tested equal), optionally
into the padded layout SDPA takes without a copy.
"""
from __future__ import annotations

import torch

# The bias layout SDPA's memory-efficient kernel (the only one taking a bias with a gradient) reads in place:
# every stride but the last a multiple of 8 elements (16 bytes in bf16). Any other bias is first copied into
# such a layout, by SDPA in eager (its mask preprocessing) and by inductor's SDPA stride constraint compiled.
SDPA_BIAS_ALIGN = 8


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


def irpe_key_bias_bmm(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor, align: int = 1) -> torch.Tensor:
    """The same term as one batched matmul per query position, with no activation-sized scatter.

    With M[i, :, j] = T[:, bucket(i, j)] (a (L, D, L) tensor built from the small table),
    bias[n, h, i, :] = q[n, h, i, :] @ M[i]: a bmm over i of (N*H, D) x (D, L). Its backward is two
    more bmms plus a scatter into the (D, NB) table from the (L, D, L) gradient of M, instead of the
    reference's scatter-add of an (N, H, L, L) gradient into (N, H, L, NB) (atomics on activations).
    Shapes and dtypes as :func:`irpe_key_bias_reference`; the result is an (N, H, L, L) view whose
    last dimension is contiguous.

    ``align`` > 1 pads M with zero key columns to a multiple of ``align`` (Lp): the products run on rows Lp
    wide, and the result is the view ``[..., :L]`` of an (L, N, H, Lp) buffer, so every stride but the last
    is a multiple of ``align``. With :data:`SDPA_BIAS_ALIGN` that is the layout SDPA's memory-efficient
    kernel takes as its bias without copying it (for L = 50 the GEMMs' rows are then 112 bytes, not 100).
    The padded columns are zeros and never part of the result; the values are those of ``align=1``.
    """
    if align < 1:
        raise ValueError(f"irpe_key_bias_bmm: align must be a positive number of elements, got {align}")
    n, h, l, d = q.shape
    lp = -(-l // align) * align
    m = table.to(q.dtype)[:, buckets].permute(1, 0, 2)  # (L, D, L)
    if lp != l:
        m = torch.nn.functional.pad(m, (0, lp - l))  # (L, D, Lp), zero columns past L
    qi = q.permute(2, 0, 1, 3).reshape(l, n * h, d)
    out = torch.bmm(qi, m).view(l, n, h, lp).permute(1, 2, 0, 3)
    return out if lp == l else out[..., :l]


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

"""Window attention with the contextual iRPE key term: input checks and the pure-PyTorch reference.

For queries, keys and values of N sequences, H heads, L tokens and head_dim D, a (D, NB) table T shared
by the heads and the (L, L) bucket ids of the token layout:

    s[n, h, i, j]  = scale * q[n, h, i] . k[n, h, j] + q[n, h, i] . T[:, bucket(i, j)]
    out[n, h, i]   = sum_j softmax_j(s[n, h, i, :])[j] v[n, h, j]

(the published LoMaR model multiplies the UNSCALED q with T; ``scale`` defaults to head_dim^-0.5).
:func:`window_attention_reference` defines the meaning: it computes in fp32 (fp64 for fp64 inputs) and
casts the result back to the input dtype. It imports nothing from the kernel modules, so both the
owner (:mod:`lomar_fast.ops.window_attention`) and the CUDA wrapper (:mod:`._window_attention_cuda`)
can import it.
"""
from __future__ import annotations

import torch


def default_scale(head_dim: int) -> float:
    """The logit scale of scaled dot-product attention, head_dim^-0.5."""
    return float(head_dim) ** -0.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_window_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                                  buckets: torch.Tensor) -> None:
    """Raise ValueError naming the bad input unless q, k, v are (N, H, L, D) of one floating dtype and
    device, table is (D, NB) floating and buckets is (L, L) int64."""
    if q.dim() != 4:
        raise ValueError(f"window_attention: q must be (N, H, L, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"window_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"window_attention: {name} must have q's dtype and device ({q.dtype}, {q.device}), "
                f"got ({t.dtype}, {t.device})"
            )
    if not q.dtype.is_floating_point:
        raise ValueError(f"window_attention: q, k, v must be floating point, got {q.dtype}")
    d, length = q.shape[-1], q.shape[-2]
    if table.dim() != 2 or table.shape[0] != d or not table.dtype.is_floating_point:
        raise ValueError(
            f"window_attention: table must be a floating (head_dim={d}, buckets) matrix "
            f"(lookup_table_weight[0]), got {table.dtype} {tuple(table.shape)}"
        )
    if buckets.shape != (length, length) or buckets.dtype != torch.long:
        raise ValueError(
            f"window_attention: buckets must be int64 ({length}, {length}), got {buckets.dtype} {tuple(buckets.shape)}"
        )


def window_attention_logits(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """The (N, H, L, L) logits ``scale q k^T + (q T)[..., bucket]`` in :func:`compute_dtype` of q."""
    acc = compute_dtype(q.dtype)
    qf, kf, tf = q.to(acc), k.to(acc), table.to(acc)
    n, h, length, _ = q.shape
    rpe = torch.gather(torch.matmul(qf, tf), -1, buckets.view(1, 1, length, length).expand(n, h, length, length))
    return torch.matmul(qf, kf.transpose(-1, -2)) * scale + rpe


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                               buckets: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale q k^T + gather(q T, buckets)) v``, computed in fp32 (fp64 for fp64), in q's dtype.

    Args:
        q, k, v: (N, H, L, D), one floating dtype, any strides.
        table: (D, NB) iRPE table shared by the heads (``lookup_table_weight[0]``), any floating dtype.
        buckets: (L, L) int64 bucket id of each (query, key) pair, in ``[0, NB)``.
        scale: the q k^T logit scale; None means head_dim^-0.5.
    Returns:
        (N, H, L, D) in q's dtype. Differentiable in q, k, v and table.
    """
    check_window_attention_inputs(q, k, v, table, buckets)
    s = default_scale(q.shape[-1]) if scale is None else float(scale)
    logits = window_attention_logits(q, k, table, buckets, s)
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)

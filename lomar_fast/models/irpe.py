"""Image relative position encoding (iRPE): contextual "product" buckets on keys.

Per axis an offset x (query minus key, in patches) maps to g(x) = x when |x| <= alpha, else
sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha))), truncated to an
integer, with alpha = ratio, beta = 2 ratio, gamma = 8 ratio. With b = int(beta) and s = 2b + 1 the
pair's bucket is (g(dr) + b) * s + g(dc) + b; every pair involving the cls token takes the extra last
bucket s*s. The term added to the attention logits is (q T)[..., bucket(i, j)] with one table
T (1, head_dim, s*s + 1) per block shared by all heads (zero init).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from lomar_fast.ops.irpe import irpe_key_bias

DEFAULT_RATIO = 1.9


def piecewise_offset(x: torch.Tensor, ratio: float = DEFAULT_RATIO) -> torch.Tensor:
    """g(x) of the piecewise product method, for integer offsets ``x`` (int64 -> int64)."""
    alpha, beta, gamma = ratio, 2.0 * ratio, 8.0 * ratio
    xf = x.to(torch.float64)
    ax = xf.abs()
    far = alpha + torch.log(ax.clamp(min=1e-12) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = torch.clamp(torch.round(far), max=beta) * torch.sign(xf)
    out = torch.where(ax <= alpha, xf, far)
    return out.trunc().to(torch.long)


def num_buckets(ratio: float = DEFAULT_RATIO, cls_token: bool = True) -> int:
    """Number of table entries: (2 int(2 ratio) + 1)^2, plus one for cls pairs."""
    s = 2 * int(2.0 * ratio) + 1
    return s * s + (1 if cls_token else 0)


@lru_cache(maxsize=64)
def _bucket_ids_cpu(height: int, width: int, ratio: float, cls_token: bool) -> torch.Tensor:
    b = int(2.0 * ratio)
    s = 2 * b + 1
    # explicit CPU: the result is cached, so it must not follow an ambient default device (meta, cuda)
    rows = torch.arange(height, device="cpu").repeat_interleave(width)
    cols = torch.arange(width, device="cpu").repeat(height)
    dr = piecewise_offset(rows[:, None] - rows[None, :], ratio)
    dc = piecewise_offset(cols[:, None] - cols[None, :], ratio)
    ids = (dr + b) * s + (dc + b)
    if cls_token:
        n = height * width
        full = torch.full((n + 1, n + 1), s * s, dtype=torch.long, device="cpu")
        full[1:, 1:] = ids
        ids = full
    return ids


def bucket_ids(height: int, width: int, ratio: float = DEFAULT_RATIO, cls_token: bool = True) -> torch.Tensor:
    """Bucket of every (query, key) pair of a ``height`` x ``width`` token grid in row-major order.

    Returns an int64 (L, L) tensor, L = height*width (+1 with ``cls_token``, which comes first).
    """
    if height < 1 or width < 1:
        raise ValueError(f"bucket_ids: grid must be at least 1x1, got {height}x{width}")
    if ratio <= 0:
        raise ValueError(f"bucket_ids: ratio must be positive, got {ratio}")
    return _bucket_ids_cpu(int(height), int(width), float(ratio), bool(cls_token)).clone()


class ContextualKeyRPE(nn.Module):
    """The ``rpe_k`` module of an attention block: holds ``lookup_table_weight`` (1, head_dim, NB).

    Call with queries (N, H, L, D) and buckets (L, L) to get the (N, H, L, L) logit bias. With
    ``scaled_query`` the queries are multiplied by head_dim^-0.5 first; the published code uses the
    unscaled queries (the default, for weight compatibility).
    """

    def __init__(self, head_dim: int, ratio: float = DEFAULT_RATIO, scaled_query: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.ratio = ratio
        self.scaled_query = scaled_query
        self.lookup_table_weight = nn.Parameter(torch.zeros(1, head_dim, num_buckets(ratio, cls_token=True)))

    def forward(self, q: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        if self.scaled_query:
            q = q * self.head_dim**-0.5
        return irpe_key_bias(q, self.lookup_table_weight[0], buckets)

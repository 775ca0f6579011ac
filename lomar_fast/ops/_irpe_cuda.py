"""CUDA side of the contextual iRPE key term (``cuda/irpe.cu``), as ``torch.library`` custom ops.

Ops (namespace ``lomar_fast``):

* ``irpe_key_bias(q, table, buckets) -> bias``: ``bias[n, h, i, j] = sum_d q[n, h, i, d] * table[d, bucket(i, j)]``.
  ``bias`` is (N, H, L, L) in ``q``'s dtype with strides (H*L*Lp, L*Lp, Lp, 1), Lp = L rounded up to a
  multiple of 8 (a view ``[..., :L]`` of a zero-padded buffer): the layout the memory-efficient
  ``scaled_dot_product_attention`` kernel takes as ``attn_mask`` without padding it again.
  Differentiable in ``q`` and ``table``.
* ``irpe_bucket_reduce(grad, buckets, num_buckets) -> G``: ``G[n, h, i, b] = sum_{j: bucket(i, j) = b} grad[n, h, i, j]``,
  (N, H, L, NB) contiguous in ``grad``'s dtype, accumulated in fp32. The backward of ``irpe_key_bias``
  is this reduction followed by two GEMMs: ``dq = G @ table^T`` and ``dtable = sum q^T G``.

Both ops run the CUDA kernel on CUDA tensors and an equivalent PyTorch computation on other devices
(so the registration, fake and autograd can be checked on CPU). Shapes the kernel does not cover
(head_dim not in 32/64/128, more than 256 buckets) use the PyTorch computation on the GPU too.
"""
from __future__ import annotations

import torch

from . import _cuda_build as cb
from .irpe_ref import SDPA_BIAS_ALIGN, check_irpe_inputs, irpe_key_bias_reference

SOURCE = "irpe.cu"
ROWS_PER_TILE = 32  # LOMAR_IRPE_ROWS in irpe.cu
FWD_THREADS = 256  # LOMAR_IRPE_THREADS in irpe.cu
BWD_THREADS = 128
FWD_HEAD_DIMS = (32, 64, 128)
MAX_BUCKETS = 32 * (FWD_THREADS // 32)
MAX_SHARED = 48 * 1024
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    [f"irpe_fwd<{cb.CUDA_TYPE_NAMES[dt]}, {d}>" for dt in KERNEL_DTYPES for d in FWD_HEAD_DIMS]
    + [f"irpe_bwd_reduce<{cb.CUDA_TYPE_NAMES[dt]}>" for dt in KERNEL_DTYPES]
)


def padded_length(length):
    """Row stride of the bias buffer: ``length`` rounded up to a multiple of :data:`SDPA_BIAS_ALIGN` (8; works on
    SymInts), the layout SDPA reads in place, as :func:`lomar_fast.ops.irpe_ref.irpe_key_bias_bmm` with ``align``."""
    return (length + SDPA_BIAS_ALIGN - 1) // SDPA_BIAS_ALIGN * SDPA_BIAS_ALIGN


def _fwd_shared_bytes(head_dim: int, num_buckets: int) -> int:
    return 4 * ROWS_PER_TILE * (head_dim + 32 * ((num_buckets + 31) // 32))


def _fwd_kernel_ok(q: torch.Tensor, table: torch.Tensor) -> bool:
    d, nb = table.shape
    return (
        q.is_cuda
        and q.dtype in KERNEL_DTYPES
        and d in FWD_HEAD_DIMS
        and 0 < nb <= MAX_BUCKETS
        and _fwd_shared_bytes(d, nb) <= MAX_SHARED
    )


def _bwd_tile(length: int, num_buckets: int) -> int | None:
    """Rows per tile of the backward reduction that fit the shared memory, or None."""
    ls, nbs = length | 1, num_buckets | 1
    for rows in (32, 16, 8, 4, 2, 1):
        if 4 * (2 * rows * ls + BWD_THREADS * nbs) <= MAX_SHARED:
            return rows
    return None


# ---------------------------------------------------------------------------------------------
# forward op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lomar_fast::irpe_key_bias", mutates_args=())
def irpe_key_bias_op(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """(N, H, L, D) q, (D, NB) table in q's dtype, (L, L) int64 buckets -> (N, H, L, L) padded-stride bias."""
    n, h, length, d = q.shape
    nb = table.shape[1]
    lp = padded_length(length)
    buf = q.new_empty((n, h, length, lp))
    out = buf[..., :length]
    if q.numel() == 0 or length == 0:
        buf.zero_()
        return out
    if _fwd_kernel_ok(q, table):
        table_c = table.contiguous()
        buckets_c = buckets.contiguous()
        m = n * h * length
        ntiles = (m + ROWS_PER_TILE - 1) // ROWS_PER_TILE
        grid = min(ntiles, 4 * cb.sm_count(q.device))
        kernel = f"irpe_fwd<{cb.CUDA_TYPE_NAMES[q.dtype]}, {d}>"
        args = (
            cb.ptr(q), cb.i64(q.stride(0)), cb.i64(q.stride(1)), cb.i64(q.stride(2)), cb.i64(q.stride(3)),
            cb.ptr(table_c), cb.ptr(buckets_c), cb.ptr(buf),
            cb.i32(h), cb.i32(length), cb.i32(nb), cb.i32(lp), cb.i64(m),
        )
        cb.launch(SOURCE, NAME_EXPRESSIONS, kernel, q.device, grid, FWD_THREADS, args, _fwd_shared_bytes(d, nb))
    else:
        buf[..., length:].zero_()
        out.copy_(irpe_key_bias_reference(q, table, buckets))
    return out


@irpe_key_bias_op.register_fake
def _irpe_key_bias_fake(q, table, buckets):
    n, h, length, _ = q.shape
    return q.new_empty((n, h, length, padded_length(length)))[..., :length]


# ---------------------------------------------------------------------------------------------
# backward: bucket reduction op + GEMMs
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lomar_fast::irpe_bucket_reduce", mutates_args=())
def irpe_bucket_reduce_op(grad: torch.Tensor, buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """(N, H, L, L) grad (any strides), (L, L) int64 buckets -> (N, H, L, NB) per-bucket row sums."""
    n, h, length, _ = grad.shape
    out = grad.new_empty((n, h, length, num_buckets))
    if out.numel() == 0:
        return out.zero_()
    rows = _bwd_tile(length, num_buckets)
    if grad.is_cuda and grad.dtype in KERNEL_DTYPES and rows is not None:
        buckets_c = buckets.contiguous()
        m = n * h * length
        ntiles = (m + rows - 1) // rows
        grid = min(ntiles, 8 * cb.sm_count(grad.device))
        shared = 4 * (2 * rows * (length | 1) + BWD_THREADS * (num_buckets | 1))
        kernel = f"irpe_bwd_reduce<{cb.CUDA_TYPE_NAMES[grad.dtype]}>"
        args = (
            cb.ptr(grad), cb.i64(grad.stride(0)), cb.i64(grad.stride(1)), cb.i64(grad.stride(2)), cb.i64(grad.stride(3)),
            cb.ptr(buckets_c), cb.ptr(out),
            cb.i32(h), cb.i32(length), cb.i32(num_buckets), cb.i64(m), cb.i32(rows), cb.i32(BWD_THREADS // rows),
        )
        cb.launch(SOURCE, NAME_EXPRESSIONS, kernel, grad.device, grid, BWD_THREADS, args, shared)
    else:
        index = buckets.view(1, 1, length, length).expand(n, h, length, length)
        acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        acc = torch.zeros((n, h, length, num_buckets), dtype=acc_dtype, device=grad.device)
        out.copy_(acc.scatter_add_(-1, index, grad.to(acc_dtype)))
    return out


@irpe_bucket_reduce_op.register_fake
def _irpe_bucket_reduce_fake(grad, buckets, num_buckets):
    n, h, length, _ = grad.shape
    return grad.new_empty((n, h, length, num_buckets))


def _setup_context(ctx, inputs, output):
    q, table, buckets = inputs
    ctx.save_for_backward(q, table, buckets)


def _backward(ctx, grad):
    q, table, buckets = ctx.saved_tensors
    d, nb = table.shape
    g = torch.ops.lomar_fast.irpe_bucket_reduce(grad, buckets, nb).to(q.dtype)  # (N, H, L, NB)
    dq = torch.matmul(g, table.t()) if ctx.needs_input_grad[0] else None
    dtable = None
    if ctx.needs_input_grad[1]:
        dtable = torch.matmul(q.reshape(-1, d).t(), g.reshape(-1, nb)).to(table.dtype)
    return dq, dtable, None


torch.library.register_autograd("lomar_fast::irpe_key_bias", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# entry point used by lomar_fast.ops.irpe
# ---------------------------------------------------------------------------------------------
def irpe_key_bias(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """Kernel path of :func:`lomar_fast.ops.irpe.irpe_key_bias` (same shapes and meaning).

    Args:
        q: (N, H, L, D) queries, fp32/fp16/bf16, any strides.
        table: (D, NB) lookup table (any float dtype; cast to ``q``'s dtype as the reference does).
        buckets: (L, L) int64 bucket ids in ``[0, NB)``.
    Returns:
        (N, H, L, L) bias in ``q``'s dtype, row stride padded to a multiple of 8.
    """
    check_irpe_inputs(q, table, buckets)
    return torch.ops.lomar_fast.irpe_key_bias(q, table.to(q.dtype).contiguous(), buckets.contiguous())

"""CUDA side of the fused window attention (``cuda/window_attention.cu``), as ``torch.library`` custom ops.

Ops (namespace ``lomar_fast``), meaning as :func:`lomar_fast.ops.window_attention_ref.window_attention_reference`:

* ``window_attention_fwd(q, k, v, table, buckets, scale) -> (out, lse)``:
  ``out`` (N, H, L, D) in q's dtype, laid out as an (N, L, H, D) buffer (strides (L*H*D, D, H*D, 1)), so
  ``out.transpose(1, 2).reshape(N, L, H*D)`` is a view; ``lse`` (N, H, L) contiguous, the log-sum-exp of
  each logit row, fp32 (fp64 for fp64 inputs), not differentiable. Differentiable in q, k, v and table.
* ``window_attention_bwd(grad_out, q, k, v, out, lse, table, buckets, scale) -> (dq, dk, dv, dtable)``:
  dq, dk, dv in q's dtype with ``out``'s layout; ``dtable`` (D, NB) fp32 (fp64 for fp64 inputs), the sum
  over every (n, h, i) of q_i G[i, :], accumulated per block and reduced in a fixed order
  (deterministic). The probabilities are recomputed from ``lse``.
* ``window_attention_qkv_fwd(qkv, table, buckets, scale) -> (out, lse)`` and
  ``window_attention_qkv_bwd(grad_out, qkv, out, lse, table, buckets, scale) -> (dqkv, dtable)``: the same for the
  q, k, v packed in the (N, L, 3, H, D) output of a fused qkv projection; ``dqkv`` comes back in that layout
  (contiguous), the kernels writing dq, dk, dv into it through one set of strides. The model's attention uses these.

All ops run the CUDA kernels on CUDA tensors and an equivalent PyTorch computation (the same
formulas, in fp32 or fp64) on other devices, so the registration, fake implementations and autograd can
be checked on CPU. Shapes the kernels do not cover (head_dim not in 32/64/80/128, L or NB above 64, or
more shared memory than the device allows) use the PyTorch computation on the GPU too.

The table is used in fp32 whatever its dtype (the reference computes in fp32), and its gradient is
returned in the table's dtype. bf16 inputs on sm_80 and newer take the tensor-core kernels (template argument
TC: bf16 mma.sync products, fp32 accumulation; the table, P and dS enter the products rounded to bf16, as under
autocast); LOMAR_WA_TENSOR_CORES=0 keeps them on the fp32 CUDA-core kernels, which fp32 and fp16 inputs use.
LOMAR_WA_KERNEL=mma takes the warp-tiled tensor-core kernels instead (``window_attention_mma_fwd`` / ``_bwd``: a
flash-attention layout with bf16 shared-memory tiles, ldmatrix, and the scores, softmax, P and dS in registers)
wherever they apply: bf16 with every row 16-byte aligned, sm_80 and newer. Their results equal the tile kernels'
within bf16 rounding (P and dS enter their products in bf16 in both); the default stays ``tiles`` until a
committed GPU result shows them faster. LOMAR_WM_FWD_BLOCKS=N (1-4) builds the module with N warp-tiled forward
blocks per SM at head_dim <= 64, and the register cap that follows (default 4 on sm_90, where head_dim 64 spills
48 bytes under the 128-register cap, and 3 on sm_80), so the benchmark can time one setting against another.
Inputs need a contiguous last dimension (:func:`window_attention` copies otherwise); rows are read with 16-byte
loads when every row is 16-byte aligned.
"""
from __future__ import annotations

import os

import torch

from . import _cuda_build as cb
from .window_attention_ref import (
    check_window_attention_inputs,
    compute_dtype,
    window_attention_logits,
)

SOURCE = "window_attention.cu"
THREADS = 256  # WA_THREADS in window_attention.cu
MAX_LEN = 64  # WA_MAX_L
MAX_BUCKETS = 64  # WA_MAX_NB
HEAD_DIMS = (32, 64, 80, 128)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # WA_F32, WA_BF16, WA_F16
DEFAULT_SHARED = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory
REDUCE_THREADS = 256

TENSOR_CORES_ENV = "LOMAR_WA_TENSOR_CORES"  # "0": bf16 inputs also take the CUDA-core (fp32 product) kernels

# The warp-tiled tensor-core kernels (window_attention_mma_fwd / _bwd): bf16, 16-byte aligned rows, sm_80 and
# newer. "tiles" (the default until a committed GPU result shows them faster and correct on a GPU) keeps the
# kernels above for every dtype; "mma" takes them wherever they apply.
KERNEL_ENV = "LOMAR_WA_KERNEL"
KERNEL_CHOICES = ("tiles", "mma")
DEFAULT_KERNEL = "tiles"
MMA_THREADS = 128  # WM_THREADS
MMA_ROWS = 64  # WM_ROWS
# The warp-tiled forward's blocks per SM at head_dim <= 64 (WM_FWD_BLOCKS; its register cap follows): unset, the
# source's default (4 on sm_90 and newer, 3 below); 1-4 compiles the module with -DWM_FWD_BLOCKS=N instead
FWD_BLOCKS_ENV = "LOMAR_WM_FWD_BLOCKS"
FWD_BLOCKS_CHOICES = ("1", "2", "3", "4")


def kernel_name(kind: str, head_dim: int, tensor_cores: bool) -> str:
    """The name expression of the ``"fwd"`` or ``"bwd"`` kernel (template arguments D, TC)."""
    return f"window_attention_{kind}<{head_dim}, {'true' if tensor_cores else 'false'}>"


def mma_kernel_name(kind: str, head_dim: int) -> str:
    """The name expression of the warp-tiled ``"fwd"`` or ``"bwd"`` kernel (template argument D)."""
    return f"window_attention_mma_{kind}<{head_dim}>"


NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    [kernel_name(kind, d, tc) for kind in ("fwd", "bwd") for tc in (False, True) for d in HEAD_DIMS]
    + [mma_kernel_name(kind, d) for kind in ("fwd", "bwd") for d in HEAD_DIMS]
    + ["window_attention_dtable_reduce"]
)


def kernel_choice() -> str:
    """``tiles`` or ``mma``: ``$LOMAR_WA_KERNEL``, else the default; anything else is a ValueError."""
    choice = os.environ.get(KERNEL_ENV, DEFAULT_KERNEL).strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r} must be one of {', '.join(KERNEL_CHOICES)}")
    return choice


def module_options() -> tuple[str, ...]:
    """The NVRTC options this module is built with beyond the shared ones: ``-DWM_FWD_BLOCKS=N`` where
    ``$LOMAR_WM_FWD_BLOCKS`` sets N, else none. Each setting is its own compiled module."""
    raw = os.environ.get(FWD_BLOCKS_ENV, "").strip()
    if not raw:
        return ()
    if raw not in FWD_BLOCKS_CHOICES:
        raise ValueError(f"{FWD_BLOCKS_ENV}={raw!r} must be one of {', '.join(FWD_BLOCKS_CHOICES)} (the warp-tiled "
                         "forward's blocks per SM); unset it for the default (4 on sm_90 and newer, 3 below)")
    return (f"-DWM_FWD_BLOCKS={raw}",)


def use_tensor_cores(q: torch.Tensor) -> bool:
    """Whether launches for ``q`` take the tensor-core kernels: bf16 inputs (bf16 mma.sync products with fp32
    accumulation, sm_80 and newer), unless the environment sets LOMAR_WA_TENSOR_CORES=0. fp32 and fp16 inputs
    keep the fp32 products on CUDA cores."""
    if q.dtype != torch.bfloat16 or os.environ.get(TENSOR_CORES_ENV, "1") == "0":
        return False
    return not q.is_cuda or torch.cuda.get_device_capability(q.device) >= (8, 0)


def use_mma(q: torch.Tensor, *rows: torch.Tensor) -> bool:
    """Whether launches for ``q`` take the warp-tiled kernels: ``$LOMAR_WA_KERNEL=mma``, bf16, a head_dim that is
    a multiple of 16, every row of ``q`` and ``rows`` 16-byte aligned, sm_80 and newer."""
    if kernel_choice() != "mma" or q.dtype != torch.bfloat16 or q.shape[-1] % 16 or not _aligned(q, *rows):
        return False
    return not q.is_cuda or torch.cuda.get_device_capability(q.device) >= (8, 0)


def mma_shared_bytes(kind: str, length: int, num_buckets: int, head_dim: int) -> int:
    """Dynamic shared memory in bytes of the warp-tiled ``"fwd"`` or ``"bwd"`` kernel (mirrors
    wm_*_shared_bytes in window_attention.cu): bf16 tiles of 64 rows, the fp32 q T scratch, the bucket bytes."""
    rs, ps, qs = head_dim + 8, MMA_ROWS + 8, MMA_ROWS + 4
    if kind == "fwd":
        return 2 * 3 * MMA_ROWS * rs + 4 * MMA_ROWS * qs + ((length * length + 15) & ~15)
    if kind == "bwd":
        return (2 * (5 * MMA_ROWS * rs + 3 * MMA_ROWS * ps) + 4 * (MMA_ROWS * qs + 2 * MMA_ROWS)
                + ((2 * length * length + length * (num_buckets + 1) + 15) & ~15))
    raise ValueError(f"kind must be 'fwd' or 'bwd', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# shared memory (mirrors wa_layout / wa_*_shared_bytes in window_attention.cu)
# ---------------------------------------------------------------------------------------------
def _round4(x: int) -> int:
    return (x + 3) & ~3


def shared_bytes(kind: str, length: int, num_buckets: int, head_dim: int) -> int:
    """Dynamic shared memory in bytes of the ``"fwd"`` or ``"bwd"`` kernel for (L, NB, D)."""
    l4, nb4, ds = _round4(length), _round4(num_buckets), head_dim + 4
    se = (l4 + nb4 + 8) | 4
    rows = l4 * ds
    if kind == "fwd":
        floats = max(2 * rows, length * se) + rows + nb4 * ds
        return 4 * floats + ((length * length + 15) & ~15)
    if kind == "bwd":
        floats = 4 * rows + nb4 * ds + length * se + 2 * MAX_LEN
        return 4 * floats + ((2 * length * length + length * (num_buckets + 1) + 15) & ~15)
    raise ValueError(f"kind must be 'fwd' or 'bwd', got {kind!r}")


def kernel_supports(q: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether the kernels cover this dtype, head_dim, length and bucket count (any device)."""
    length, d = q.shape[-2], q.shape[-1]
    nb = table.shape[-1]
    return q.dtype in KERNEL_DTYPES and d in HEAD_DIMS and 1 <= length <= MAX_LEN and 1 <= nb <= MAX_BUCKETS


_device_limits: dict[int, tuple[int, int]] = {}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _limits(device: torch.device) -> tuple[int, int]:
    """(largest dynamic shared memory a block may opt in to, shared memory per SM) of ``device``."""
    index = _device_index(device)
    lim = _device_limits.get(index)
    if lim is None:
        props = torch.cuda.get_device_properties(index)
        optin = int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SHARED)
        per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or optin)
        lim = (optin, per_sm)
        _device_limits[index] = lim
    return lim


def _kernel_ok(kind: str, q: torch.Tensor, table: torch.Tensor, mma: bool = False) -> bool:
    """Whether the ``kind`` kernel (the warp-tiled one with ``mma``) can run for q and table on q's GPU: the shapes
    and dtype are covered and its shared memory fits the device."""
    if not (q.is_cuda and kernel_supports(q, table) and q.numel() > 0):
        return False
    size = mma_shared_bytes if mma else shared_bytes
    return size(kind, q.shape[-2], table.shape[-1], q.shape[-1]) <= _limits(q.device)[0]


def _aligned(*tensors: torch.Tensor) -> bool:
    """Every row (last dimension) of every tensor starts on a 16-byte boundary."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------
_shared_set: dict[tuple[str, int, tuple[str, ...]], int] = {}
_blocks_per_sm: dict[tuple[str, int, int, tuple[str, ...]], int] = {}


def _function(kernel: str, device: torch.device):
    return cb.get_module(SOURCE, (kernel,), device, module_options()).get_function(kernel)


def _prepare(kernel: str, device: torch.device, shared: int) -> None:
    """Let ``kernel`` use ``shared`` bytes of dynamic shared memory (opt-in above 48 KB)."""
    index = _device_index(device)
    key = (kernel, index, module_options())  # the attribute belongs to one module's function
    if shared > DEFAULT_SHARED and _shared_set.get(key, 0) < shared:
        cupy = cb._import_cupy()
        with cupy.cuda.Device(index):
            _function(kernel, device).max_dynamic_shared_size_bytes = int(shared)
        _shared_set[key] = shared


def _grid(kernel: str, device: torch.device, shared: int, pairs: int, threads: int = THREADS) -> int:
    """Blocks for ``pairs`` (n, h) pairs: as many as fit on the device at once (each loops over pairs)."""
    index = _device_index(device)
    key = (kernel, index, shared, module_options())
    per_sm = _blocks_per_sm.get(key)
    if per_sm is None:
        _prepare(kernel, device, shared)  # the occupancy query needs the opt-in first
        per_sm = 0
        try:
            cupy = cb._import_cupy()
            with cupy.cuda.Device(index):
                fn = _function(kernel, device)
                per_sm = int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, shared))
        except Exception:  # older CuPy without the occupancy call: count by shared memory
            per_sm = _limits(device)[1] // (shared + 1024)
        per_sm = max(1, min(per_sm, 2048 // threads))
        _blocks_per_sm[key] = per_sm
    return max(1, min(pairs, per_sm * cb.sm_count(device)))


def _launch(kernel: str, device: torch.device, grid: int, block: int, args: tuple, shared: int) -> None:
    _prepare(kernel, device, shared)
    cb.launch(SOURCE, NAME_EXPRESSIONS, kernel, device, grid, block, args, shared, options=module_options())


def _strides3(t: torch.Tensor) -> tuple:
    return cb.i64(t.stride(0)), cb.i64(t.stride(1)), cb.i64(t.stride(2))


def _heads_empty(q: torch.Tensor) -> torch.Tensor:
    """An (N, H, L, D) tensor like q, laid out as (N, L, H, D) memory."""
    n, h, length, d = q.shape
    return q.new_empty((n, length, h, d)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# forward op
# ---------------------------------------------------------------------------------------------
def _forward_torch(q, k, v, table, buckets, scale):
    logits = window_attention_logits(q, k, table, buckets, scale)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return torch.matmul(probs, v.to(probs.dtype)), lse


def _kernel_launch(kind: str, q: torch.Tensor, nb: int, mma: bool) -> tuple[str, int, int]:
    """(kernel name, threads per block, dynamic shared bytes) of the ``kind`` kernel for q: the warp-tiled one with
    ``mma``, else the tile kernel (tensor cores or not, by :func:`use_tensor_cores`)."""
    length, d = q.shape[-2], q.shape[-1]
    if mma:
        return mma_kernel_name(kind, d), MMA_THREADS, mma_shared_bytes(kind, length, nb, d)
    return kernel_name(kind, d, use_tensor_cores(q)), THREADS, shared_bytes(kind, length, nb, d)


def _forward_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out, lse) for the (N, H, L, D) q: out with (N, L, H, D) memory, lse (N, H, L) in the compute dtype."""
    n, h, length, _ = q.shape
    return _heads_empty(q), q.new_empty((n, h, length), dtype=compute_dtype(q.dtype))


def _attend(q, k, v, table, buckets, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the attention of the (N, H, L, D) views q, k, v: the kernels where they apply, else the
    PyTorch formulas."""
    n, h, length, d = q.shape
    out, lse = _forward_outputs(q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    mma = use_mma(q, k, v, out) and _kernel_ok("fwd", q, table, mma=True)
    if not (mma or _kernel_ok("fwd", q, table)):
        o, lse_t = _forward_torch(q, k, v, table, buckets, scale)
        out.copy_(o)
        lse.copy_(lse_t)
        return out, lse
    table_f = table.to(device=q.device, dtype=torch.float32).contiguous()
    buckets_c = buckets.to(q.device).contiguous()
    nb = table.shape[1]
    args = (
        cb.ptr(q), *_strides3(q), cb.ptr(k), *_strides3(k), cb.ptr(v), *_strides3(v),
        cb.ptr(table_f), cb.ptr(buckets_c), cb.ptr(out), *_strides3(out), cb.ptr(lse),
        cb.i32(h), cb.i32(length), cb.i32(nb), cb.i64(n * h), cb.f32(scale),
    )
    kernel, threads, shared = _kernel_launch("fwd", q, nb, mma)
    if not mma:
        args += (cb.i32(DTYPE_CODES[q.dtype]), cb.i32(int(_aligned(q, k, v))))
    _launch(kernel, q.device, _grid(kernel, q.device, shared, n * h, threads), threads, args, shared)
    return out, lse


@torch.library.custom_op("lomar_fast::window_attention_fwd", mutates_args=())
def window_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                            buckets: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, L, D) q, k, v, (D, NB) table, (L, L) int64 buckets -> (out, lse); see the module docstring."""
    return _attend(q, k, v, table, buckets, scale)


@window_attention_fwd_op.register_fake
def _window_attention_fwd_fake(q, k, v, table, buckets, scale):
    return _forward_outputs(q)


# ---------------------------------------------------------------------------------------------
# backward op
# ---------------------------------------------------------------------------------------------
def _backward_torch(grad_out, q, k, v, out, lse, table, buckets, scale):
    """The backward formulas in fp32 (fp64): P from lse, dS = P (dP - rowsum(dO * O)), G by bucket."""
    acc = compute_dtype(q.dtype)
    n, h, length, d = q.shape
    nb = table.shape[1]
    probs = torch.exp(window_attention_logits(q, k, table, buckets, scale) - lse.to(acc).unsqueeze(-1))
    go = grad_out.to(acc)
    dv = torch.matmul(probs.transpose(-1, -2), go)
    dp = torch.matmul(go, v.to(acc).transpose(-1, -2))
    delta = (go * out.to(acc)).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    index = buckets.view(1, 1, length, length).expand(n, h, length, length)
    g = torch.zeros((n, h, length, nb), dtype=acc, device=q.device).scatter_add_(-1, index, ds)
    qf = q.to(acc)
    dq = torch.matmul(ds, k.to(acc)) * scale + torch.matmul(g, table.to(acc).t())
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dtable = torch.matmul(qf.reshape(-1, d).t(), g.reshape(-1, nb))
    return dq, dk, dv, dtable


def _fill_backward(grad_out, q, k, v, out, lse, table, buckets, scale, dq, dk, dv, dtable) -> None:
    """dq, dk, dv (views sharing one set of strides, last dimension contiguous) and dtable (D, NB) for
    ``grad_out``: the kernels where they apply, else the PyTorch formulas."""
    n, h, length, d = q.shape
    nb = table.shape[1]
    grad_out = grad_out.to(q.dtype)
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    mma = use_mma(q, k, v, out, grad_out, dq) and _kernel_ok("bwd", q, table, mma=True)
    if not (mma or _kernel_ok("bwd", q, table)):
        for dst, src in zip((dq, dk, dv, dtable), _backward_torch(grad_out, q, k, v, out, lse, table, buckets, scale)):
            dst.copy_(src)
        return
    table_f = table.to(device=q.device, dtype=torch.float32).contiguous()
    buckets_c = buckets.to(q.device).contiguous()
    lse_c = lse.to(torch.float32).contiguous()
    kernel, threads, shared = _kernel_launch("bwd", q, nb, mma)
    grid = _grid(kernel, q.device, shared, n * h, threads)
    part = torch.empty((grid, d, nb), dtype=torch.float32, device=q.device)
    args = (
        cb.ptr(q), *_strides3(q), cb.ptr(k), *_strides3(k), cb.ptr(v), *_strides3(v),
        cb.ptr(out), *_strides3(out), cb.ptr(grad_out), *_strides3(grad_out),
        cb.ptr(lse_c), cb.ptr(table_f), cb.ptr(buckets_c),
        cb.ptr(dq), cb.ptr(dk), cb.ptr(dv), *_strides3(dq), cb.ptr(part),
        cb.i32(h), cb.i32(length), cb.i32(nb), cb.i64(n * h), cb.f32(scale),
    )
    if not mma:
        args += (cb.i32(DTYPE_CODES[q.dtype]), cb.i32(int(_aligned(q, k, v, out, grad_out))))
    _launch(kernel, q.device, grid, threads, args, shared)
    count = d * nb
    _launch("window_attention_dtable_reduce", q.device, (count + REDUCE_THREADS - 1) // REDUCE_THREADS,
            REDUCE_THREADS, (cb.ptr(part), cb.ptr(dtable), cb.i32(grid), cb.i32(count)), 0)


@torch.library.custom_op("lomar_fast::window_attention_bwd", mutates_args=())
def window_attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, dtable) of ``window_attention_fwd`` for ``grad_out``; see the module docstring."""
    d, nb = table.shape
    dq, dk, dv = _heads_empty(q), _heads_empty(q), _heads_empty(q)
    dtable = torch.empty((d, nb), dtype=compute_dtype(q.dtype), device=q.device)
    _fill_backward(grad_out, q, k, v, out, lse, table, buckets, scale, dq, dk, dv, dtable)
    return dq, dk, dv, dtable


@window_attention_bwd_op.register_fake
def _window_attention_bwd_fake(grad_out, q, k, v, out, lse, table, buckets, scale):
    d, nb = table.shape
    return _heads_empty(q), _heads_empty(q), _heads_empty(q), q.new_empty((d, nb), dtype=compute_dtype(q.dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, table, buckets, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, buckets)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, table, buckets = ctx.saved_tensors
    dq, dk, dv, dtable = torch.ops.lomar_fast.window_attention_bwd(grad_out, q, k, v, out, lse, table, buckets,
                                                                   ctx.scale)
    return dq, dk, dv, dtable.to(table.dtype), None, None


torch.library.register_autograd("lomar_fast::window_attention_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# packed ops: q, k, v as the (N, L, 3, H, D) output of a fused qkv projection, and its gradient in that layout
# (the backward writes dq, dk, dv into one buffer: no stacking copy of three gradients into the projection's)
# ---------------------------------------------------------------------------------------------
def unpack_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, L, 3, H, D) -> q, k, v as (N, H, L, D) views."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("lomar_fast::window_attention_qkv_fwd", mutates_args=())
def window_attention_qkv_fwd_op(qkv: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``window_attention_fwd`` of the q, k, v of a packed (N, L, 3, H, D) tensor: (out, lse) as there."""
    return _attend(*unpack_qkv(qkv), table, buckets, scale)


@window_attention_qkv_fwd_op.register_fake
def _window_attention_qkv_fwd_fake(qkv, table, buckets, scale):
    return _forward_outputs(unpack_qkv(qkv)[0])


@torch.library.custom_op("lomar_fast::window_attention_qkv_bwd", mutates_args=())
def window_attention_qkv_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                table: torch.Tensor, buckets: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_qkv in qkv's (N, L, 3, H, D) layout, contiguous; dtable) of ``window_attention_qkv_fwd``."""
    d, nb = table.shape
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dtable = torch.empty((d, nb), dtype=compute_dtype(qkv.dtype), device=qkv.device)
    _fill_backward(grad_out, *unpack_qkv(qkv), out, lse, table, buckets, scale, *unpack_qkv(dqkv), dtable)
    return dqkv, dtable


@window_attention_qkv_bwd_op.register_fake
def _window_attention_qkv_bwd_fake(grad_out, qkv, out, lse, table, buckets, scale):
    d, nb = table.shape
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), qkv.new_empty(
        (d, nb), dtype=compute_dtype(qkv.dtype))


def _setup_context_qkv(ctx, inputs, output):
    qkv, table, buckets, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, table, buckets)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward_qkv(ctx, grad_out, grad_lse):
    qkv, out, lse, table, buckets = ctx.saved_tensors
    dqkv, dtable = torch.ops.lomar_fast.window_attention_qkv_bwd(grad_out, qkv, out, lse, table, buckets, ctx.scale)
    return dqkv, dtable.to(table.dtype), None, None


torch.library.register_autograd("lomar_fast::window_attention_qkv_fwd", _backward_qkv,
                                setup_context=_setup_context_qkv)


# ---------------------------------------------------------------------------------------------
# entry point used by lomar_fast.ops.window_attention
# ---------------------------------------------------------------------------------------------
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Kernel path of :func:`lomar_fast.ops.window_attention.window_attention` (same shapes and meaning).

    Args:
        q, k, v: (N, H, L, D) in one of fp32/bf16/fp16, any strides (a non-contiguous last dimension is
            copied).
        table: (D, NB) iRPE table, any float dtype (used in fp32; its gradient comes back in its dtype).
        buckets: (L, L) int64 bucket ids in ``[0, NB)`` (an id outside makes its row NaN in the kernel).
        scale: the q k^T logit scale.
    Returns:
        (N, H, L, D) in q's dtype, with (N, L, H, D) memory layout.
    """
    check_window_attention_inputs(q, k, v, table, buckets)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, _ = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, buckets, float(scale))
    return out


def window_attention_qkv(qkv: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor, scale: float) -> torch.Tensor:
    """Kernel path of :func:`lomar_fast.ops.window_attention.window_attention_qkv`: ``qkv`` (N, L, 3, H, D) with a
    contiguous last dimension; returns (N, H, L, D) with (N, L, H, D) memory layout. Its gradient comes back in
    qkv's layout."""
    q, k, v = unpack_qkv(qkv)
    check_window_attention_inputs(q, k, v, table, buckets)
    out, _ = torch.ops.lomar_fast.window_attention_qkv_fwd(_last_dim_contiguous(qkv), table, buckets, float(scale))
    return out

"""Window attention with the contextual iRPE key term: ``softmax(scale q k^T + (q' T)[bucket]) v``.

This file owns the operation: :func:`window_attention` dispatches to the fused CUDA kernel
(``cuda/window_attention.cu``: scores, iRPE term, softmax and P v in one pass per (sequence, head), and
its backward) for CUDA tensors when kernels are enabled (see :mod:`lomar_fast.ops._dispatch`), and
otherwise to a pure-PyTorch path chosen by ``$LOMAR_ATTN_PATH``:

- ``sdpa`` (default): ``scaled_dot_product_attention`` with the additive bias of
  :func:`lomar_fast.ops.irpe.irpe_key_bias`;
- ``math``, for sequences of up to ``MATH_MAX_TOKENS`` tokens (the pretraining windows): the logits as two
  explicit products, summed and soft-maxed in fp32, then times v (:func:`window_attention_math`). For
  50-token windows the (L, L) logits are small, and the products run as batched GEMMs instead of SDPA's
  memory-efficient kernel, the only SDPA kernel that takes a bias with a gradient. Longer sequences keep SDPA.
- ``flex``, for CUDA tensors: PyTorch's FlexAttention (:func:`window_attention_flex`), whose compiled Triton
  kernels add the iRPE term inside the attention from the small (N, H, L, NB) projection ``q T``: no (N, H, L, L)
  bias is written, read or differentiated. FlexAttention has no backward on CPU, so CPU tensors keep SDPA.
  Before torch 2.8 FlexAttention takes power-of-two head dims only: there the path refuses others (ViT-H's 80)
  with one error naming the way out.

The meaning is :func:`lomar_fast.ops.window_attention_ref.window_attention_reference`.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ._dispatch import use_kernel
from .irpe import irpe_key_bias
from .window_attention_ref import check_window_attention_inputs, compute_dtype, default_scale

# A kernel becomes the ``auto`` default only after a committed GPU benchmark shows it correct and faster
# than the compiled current path (benchmarks/kernels.py: window_attention_fwd, window_attention_fwd_bwd).
# No GPU result for it is committed yet -> off.
AUTO_USES_KERNEL = False

# The pure-PyTorch path when the kernel is not used. ``sdpa`` until a committed GPU result of the whole step
# (benchmarks/gpu_check.sh, stage attention_math) shows ``math`` faster; $LOMAR_ATTN_PATH overrides.
# ``flex`` likewise waits for a committed GPU result (stage attention_flex).
ATTENTION_PATHS = ("sdpa", "math", "flex")
DEFAULT_ATTENTION_PATH = "sdpa"
ATTN_PATH_ENV = "LOMAR_ATTN_PATH"
MATH_MAX_TOKENS = 64
# FlexAttention's tile sides for the flex path: unset leaves them to PyTorch's heuristics (tiles of up to 128
# rows for any length); a power of two from 16 to 128 sets every forward and backward tile side to it.
FLEX_BLOCK_ENV = "LOMAR_FLEX_BLOCK"
FLEX_BLOCKS = (16, 32, 64, 128)
# any other FlexAttention kernel options, as a JSON object (e.g. {"WRITE_DQ": false, "num_warps": 4}), over the above
FLEX_OPTIONS_ENV = "LOMAR_FLEX_OPTIONS"
# the devices the flex path runs on: FlexAttention has no CPU backward
FLEX_DEVICES = ("cuda",)
# the flex path's q T has its bucket count padded to a multiple of this (16-byte rows in bf16)
FLEX_QT_ALIGN = 8


def attention_path() -> str:
    """``sdpa``, ``math`` or ``flex``: ``$LOMAR_ATTN_PATH``, else the default; anything else is a ValueError."""
    path = os.environ.get(ATTN_PATH_ENV, DEFAULT_ATTENTION_PATH).strip().lower()
    if path not in ATTENTION_PATHS:
        raise ValueError(f"{ATTN_PATH_ENV}={path!r} must be one of {', '.join(ATTENTION_PATHS)}")
    return path


def _rpe_bias(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor, rpe_scale: float | None) -> torch.Tensor:
    """The iRPE logits term (N, H, L, L) of ``rpe_scale * q`` (the unscaled q for None)."""
    return irpe_key_bias(q if rpe_scale is None else q * rpe_scale, table, buckets)


def window_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          buckets: torch.Tensor, scale: float | None = None,
                          rpe_scale: float | None = None) -> torch.Tensor:
    """The current path: the iRPE bias from :func:`irpe_key_bias` as SDPA's additive mask.

    With ``scale=None`` and ``rpe_scale=None`` this is exactly the computation the attention blocks
    ran before the fused kernel existed (``rpe_k(q, buckets)`` then SDPA with its default scale).
    """
    bias = _rpe_bias(q, table, buckets, rpe_scale)
    if scale is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def window_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          buckets: torch.Tensor, scale: float | None = None,
                          rpe_scale: float | None = None) -> torch.Tensor:
    """The same attention with explicit logits: ``softmax(float(q k^T) * scale + float(bias)) v``.

    The two products (q k^T, and the iRPE term of :func:`irpe_key_bias`) run in q's dtype (bf16 under
    autocast), as the published model's explicit attention does; their sum, the scale and the softmax are
    fp32 (fp64 for fp64 inputs), and the probabilities return to v's dtype for P v. Compiled, the scale, sum and softmax are one
    fused kernel between batched GEMMs. Differentiable in q, k, v and table. Returns (N, H, L, D) in the
    dtype P v runs in: q's dtype, or autocast's (as SDPA under autocast).
    """
    s = default_scale(q.shape[-1]) if scale is None else float(scale)
    bias = _rpe_bias(q, table, buckets, rpe_scale)
    acc = compute_dtype(q.dtype)
    logits = torch.matmul(q, k.transpose(-2, -1)).to(acc) * s + bias.to(acc)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def flex_kernel_options() -> dict:
    """FlexAttention's kernel options for the flex path: ``$LOMAR_FLEX_BLOCK``'s tiles, then the JSON object in
    ``$LOMAR_FLEX_OPTIONS`` over them (names and values as FlexAttention's ``kernel_options``; it checks them). A
    bad value of either is a ValueError naming the variable.

    Always the general kernel: for queries shorter than 128 FlexAttention would otherwise pick its decoding
    kernel, which splits long key sequences for few queries; a window has as many queries as keys.
    """
    options: dict = {"FORCE_USE_FLEX_ATTENTION": True}
    raw = os.environ.get(FLEX_BLOCK_ENV, "").strip()
    if raw:
        try:
            block = int(raw)
        except ValueError:
            block = None
        if block not in FLEX_BLOCKS:
            raise ValueError(f"{FLEX_BLOCK_ENV}={raw!r} must be one of {', '.join(map(str, FLEX_BLOCKS))} "
                             "(or unset for FlexAttention's own tiles)")
        options.update(fwd_BLOCK_M=block, fwd_BLOCK_N=block, bwd_BLOCK_M1=block, bwd_BLOCK_N1=block,
                       bwd_BLOCK_M2=block, bwd_BLOCK_N2=block)
    raw = os.environ.get(FLEX_OPTIONS_ENV, "").strip()
    if raw:
        extra = dict(_extra_flex_options(raw))
        if "BACKEND" in extra:  # FlexAttention's newer kernel choice, which it refuses beside the older one
            options.pop("FORCE_USE_FLEX_ATTENTION")
        options.update(extra)
    return options


@torch.compiler.assume_constant_result  # under torch.compile, called once while tracing: JSON parsing does not trace
def _extra_flex_options(raw: str) -> tuple:
    """``$LOMAR_FLEX_OPTIONS``'s JSON object as sorted (name, value) pairs; anything else is a ValueError."""
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{FLEX_OPTIONS_ENV} is not JSON ({err}): give an object such as "
                         '\'{"WRITE_DQ": false}\'') from None
    if not isinstance(extra, dict) or not all(isinstance(v, (bool, int, str)) for v in extra.values()):
        raise ValueError(f"{FLEX_OPTIONS_ENV}={raw!r} must be a JSON object of FlexAttention kernel options with "
                         'integer, boolean or string values, such as {"WRITE_DQ": false, "num_warps": 4}')
    return tuple(sorted(extra.items()))


def flex_refuses_head_dim(d: int) -> bool:
    """Whether this torch's FlexAttention refuses head dim ``d``: up to torch 2.7 it took powers of two only
    (ViT-H's 80 among those refused); from 2.8 on, any."""
    import torch.nn.attention.flex_attention as fa

    supported = getattr(fa, "_supported_head_dim", None)  # the check's helper, gone from 2.8's module
    return supported is not None and not supported(d)


_compiled_flex = None


def _flex_attention():
    """``flex_attention`` itself while torch.compile traces a caller, else one ``torch.compile`` of it, made on
    first use (uncompiled, FlexAttention runs an unfused reference that writes the whole score matrix)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def window_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          buckets: torch.Tensor, scale: float | None = None,
                          rpe_scale: float | None = None, *, flex=None) -> torch.Tensor:
    """The same attention through FlexAttention: the iRPE term enters as a score modification.

    ``qt = q (rpe_scale * T)`` (N, H, L, NB) is one small batched matmul in q's dtype (bf16 under autocast, as
    the other paths' bias), kept in the compute dtype (fp32; fp64 for fp64); the kernel adds
    ``qt[n, h, i, buckets[i, j]]`` to each scaled score. The table gets zero columns up to a multiple of
    :data:`FLEX_QT_ALIGN` buckets (50 -> 56), so that the product's rows, and its gradients', are 16-byte aligned
    in bf16 (the rows of 50 took cuBLAS's 2-element-aligned kernels in the other paths' profile); no bucket id
    reaches them. FlexAttention differentiates through ``qt`` (its backward scatters the score gradients into
    ``qt``'s with atomic adds), and autograd carries that on to q and the table. Returns (N, H, L, D) in q's dtype.

    ``flex`` is the FlexAttention function to call (tests pass the uncompiled one); None means
    :func:`_flex_attention`, with :func:`flex_kernel_options`.
    """
    if flex_refuses_head_dim(q.shape[-1]):
        raise ValueError(f"{ATTN_PATH_ENV}=flex: torch {torch.__version__}'s FlexAttention takes power-of-two head "
                         f"dims only, and this model's is {q.shape[-1]}: use torch 2.8 or newer, or "
                         f"{ATTN_PATH_ENV}=sdpa (the default)")
    s = default_scale(q.shape[-1]) if scale is None else float(scale)
    t = table if rpe_scale is None else table * rpe_scale
    t = F.pad(t.to(q.dtype), (0, -t.shape[1] % FLEX_QT_ALIGN))
    qt = torch.matmul(q, t).to(compute_dtype(q.dtype))

    def irpe_term(score, n, h, i, j):
        return score + qt[n, h, i, buckets[i, j]]

    if flex is None:
        if q.device.type == "cpu":  # torch 2.6-2.11's CPU lowering refuses q, k, v views of one buffer (packed qkv)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return _flex_attention()(q, k, v, score_mod=irpe_term, scale=s, kernel_options=flex_kernel_options())
    return flex(q, k, v, score_mod=irpe_term, scale=s)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                     buckets: torch.Tensor, scale: float | None = None, *,
                     rpe_scale: float | None = None) -> torch.Tensor:
    """Multi-head attention over short sequences with the contextual iRPE key term.

    ``logits[n, h, i, j] = scale * q_i . k_j + (rpe_scale * q_i) . table[:, buckets[i, j]]``, softmax over
    j, then the probabilities times v.

    Args:
        q, k, v: (N, H, L, D) queries, keys, values (one floating dtype and device; any strides, e.g. the
            views of a fused qkv projection).
        table: (D, NB) iRPE table shared by the heads (``rpe_k.lookup_table_weight[0]``).
        buckets: (L, L) int64 bucket id of each (query, key) pair, in ``[0, NB)``.
        scale: the q k^T scale; None means head_dim^-0.5.
        rpe_scale: the factor on q in the table term; None means the unscaled q of the published model
            (``ContextualKeyRPE(scaled_query=True)`` uses head_dim^-0.5).
    Returns:
        (N, H, L, D) in q's dtype. Differentiable in q, k, v and table.
    """
    check_window_attention_inputs(q, k, v, table, buckets)
    kernel = _kernel_inputs(q, k, v, table, buckets, scale, rpe_scale)
    if kernel is not None:
        cuda, s, t = kernel
        return cuda.window_attention(q, k, v, t, buckets, s)
    return _pytorch_path(q, k, v, table, buckets, scale, rpe_scale)


def _kernel_inputs(q, k, v, table, buckets, scale, rpe_scale):
    """(the CUDA module, the q k^T scale, the table with rpe_scale folded in) where the fused kernel takes these
    inputs, else None."""
    if not use_kernel(q, k, v, table, buckets, auto_default=AUTO_USES_KERNEL):
        return None
    from . import _window_attention_cuda  # imported lazily: the kernel path needs CuPy and a GPU

    if not _window_attention_cuda.kernel_supports(q, table):
        return None
    s = default_scale(q.shape[-1]) if scale is None else float(scale)
    return _window_attention_cuda, s, (table if rpe_scale is None else table * rpe_scale)


def _pytorch_path(q, k, v, table, buckets, scale, rpe_scale):
    """The pure-PyTorch attention: ``math`` for windows and ``flex`` for CUDA tensors where $LOMAR_ATTN_PATH
    asks for them, else ``sdpa``."""
    path = attention_path()
    if path == "math" and q.shape[-2] <= MATH_MAX_TOKENS:
        return window_attention_math(q, k, v, table, buckets, scale, rpe_scale)
    if path == "flex" and q.device.type in FLEX_DEVICES:
        return window_attention_flex(q, k, v, table, buckets, scale, rpe_scale)
    return window_attention_sdpa(q, k, v, table, buckets, scale, rpe_scale)


def window_attention_qkv(qkv: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor, scale: float | None = None,
                         *, rpe_scale: float | None = None) -> torch.Tensor:
    """:func:`window_attention` of the q, k, v packed in the (N, L, 3, H, D) output of a fused qkv projection.

    The same value as ``window_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), table, buckets, ...)``. On the
    kernel path the op takes the packed tensor and returns its gradient in the packed layout, so the backward
    writes dq, dk, dv into one buffer instead of stacking three gradients into the projection's.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"window_attention_qkv: qkv must be (N, L, 3, H, D), got shape {tuple(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    check_window_attention_inputs(q, k, v, table, buckets)
    kernel = _kernel_inputs(q, k, v, table, buckets, scale, rpe_scale)
    if kernel is not None:
        cuda, s, t = kernel
        return cuda.window_attention_qkv(qkv, t, buckets, s)
    return _pytorch_path(q, k, v, table, buckets, scale, rpe_scale)

"""Fused CUDA kernels against their PyTorch reference paths, eager and torch.compile'd.

    python -m benchmarks.kernels --out benchmarks/results/kernels [--quick]   # GPU, ~1-2 min on an H100
    python -m benchmarks.kernels --cpu-smoke --out /tmp/k                     # CPU: reference paths, tiny shapes

Cases at ViT-B shapes (B=256 images, K=4 windows of 7x7 patches, 224 px, p=16; 12 heads, L=50, head_dim 64; bf16):

* ``window_gather``: uint8 NHWC images -> window patches (bf16) + norm-pix targets of the masked patches (fp32).
* ``window_gather_visible``: the same, but only the visible patches are written.
* ``embed_full`` / ``embed_visible``: gather + patch embedding (Linear p*p*3 -> 768) + mask tokens, with the
  embedding on all w*w patches vs on the visible ones only (then scattered into a mask-token sequence):
  does running the embedding on 20% of the tokens pay?
* ``irpe_fwd``: the iRPE key bias; ``irpe_fwd_bwd``: bias forward + backward (dq, dtable);
  ``irpe_attention``: bias + scaled_dot_product_attention forward + backward (the bias layout matters here:
  the reference's (.., 50, 50) bias is padded by SDPA, the kernel's is not); the ``[compiled aligned bmm path]``
  rows time the batched-matmul bias into that padded layout (LOMAR_IRPE_PATH=bmm_aligned) against the plain one.
* ``window_attention_fwd`` / ``window_attention_fwd_bwd``: the fused window-attention kernel (scores, iRPE
  term, softmax, P v in one kernel; dq, dk, dv, dtable in its backward) against the current path,
  ``scaled_dot_product_attention`` with the batched-matmul iRPE bias, eager and ``torch.compile``'d; q, k, v
  are the views of a fused (N, L, 3, H, D) qkv projection, as in the model. bf16 inputs take the tensor-core
  kernels; the ``[cuda cores]`` rows run the same kernels with fp32 products on CUDA cores
  (LOMAR_WA_TENSOR_CORES=0), and the ``[mma]`` rows (bf16) the warp-tiled tensor-core kernels
  (LOMAR_WA_KERNEL=mma), and the ``[mma 3 blocks]`` rows the same with the forward built for 3 blocks per SM
  (LOMAR_WM_FWD_BLOCKS=3, a 170-register cap, against 4 and 128 on sm_90); the ``[math path]`` and ``[compiled math path]`` rows put the pure-PyTorch
  explicit-logits path (``LOMAR_ATTN_PATH=math``: batched GEMMs, fp32 softmax) in the kernel column, and the
  ``[flex path]`` rows (bf16) FlexAttention's compiled kernels with the iRPE term as a score modification
  (``LOMAR_ATTN_PATH=flex``), with its own tiles and, ``[flex path 64]``, 64 x 64 ones (LOMAR_FLEX_BLOCK=64).

Each case: median time over repeated runs (CUDA events, after warm-up), achieved GB/s from the bytes the
operation must read and write (listed per case), as a fraction of the device-to-device copy bandwidth
measured in the same run, max relative error of the kernel against the reference, and the ratio
kernel / compiled reference. Output: DIR/kernels.json (device, versions, config, raw timings) and
DIR/kernels.md (table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import write_json

SCHEMA = "lomar_fast.kernels/1"

GPU_CONFIG = dict(batch=256, windows=4, window_size=7, image_size=224, patch_size=16, mask_ratio=0.8,
                  heads=12, head_dim=64, num_buckets=50, embed_dim=768, dtype="bfloat16")
SMOKE_CONFIG = dict(batch=2, windows=2, window_size=3, image_size=20, patch_size=4, mask_ratio=0.8,
                    heads=2, head_dim=32, num_buckets=50, embed_dim=32, dtype="float32")


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(cfg: dict, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, k, w, s, p = cfg["batch"], cfg["windows"], cfg["window_size"], cfg["image_size"], cfg["patch_size"]
    grid = s // p
    dtype = getattr(torch, cfg["dtype"])
    images = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g)
    span = grid - w + 1
    windows = torch.stack([
        torch.stack([torch.randperm(span, generator=g)[:k], torch.randperm(span, generator=g)[:k]], -1)
        for _ in range(b)
    ])
    n_mask = int(w * w * cfg["mask_ratio"])
    scores = torch.rand(b, k, w * w, generator=g)
    ranks = scores.argsort(-1).argsort(-1)
    masks = ranks < n_mask
    length = w * w + 1
    try:
        from lomar_fast.models.irpe import bucket_ids

        buckets = bucket_ids(w, w)
    except Exception:
        buckets = torch.randint(0, cfg["num_buckets"], (length, length), generator=g)
    n, h, d = b * k, cfg["heads"], cfg["head_dim"]
    q = torch.randn(n, h, length, d, generator=g).to(dtype)
    kk = torch.randn(n, h, length, d, generator=g).to(dtype)
    v = torch.randn(n, h, length, d, generator=g).to(dtype)
    table = torch.randn(d, cfg["num_buckets"], generator=g) * 0.1
    grad_bias = torch.randn(n, h, length, length, generator=g).to(dtype)
    grad_attn = torch.randn(n, h, length, d, generator=g).to(dtype)
    out = dict(images=images, windows=windows, masks=masks, buckets=buckets, q=q, k=kk, v=v, table=table,
               grad_bias=grad_bias, grad_attn=grad_attn)
    out = {key: t.to(device) for key, t in out.items()}
    out["n_mask"] = n_mask
    return out


# ------------------------------------------------------------------------------------------------ timing
def time_fn(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> list[float]:
    """Milliseconds per call, one sample per call."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(cuda: bool, warmup: int, repeats: int) -> float | None:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffer."""
    if not cuda:
        return None
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), warmup, repeats, True)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (statistics.median(times) * 1e-3) / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------------ cases
def build_cases(x: dict, cfg: dict, device: str, with_kernels: bool) -> list[dict]:
    """Each case: name, bytes, tolerance, and callables kernel / reference (returning tensors to compare)."""
    from lomar_fast.ops import _window_gather_cuda as wgc
    from lomar_fast.ops import window_attention as wa_mod
    from lomar_fast.ops import window_gather_ref as wgr
    from lomar_fast.ops.irpe_ref import SDPA_BIAS_ALIGN, irpe_key_bias_bmm, irpe_key_bias_reference
    from lomar_fast.ops.window_attention import window_attention_flex, window_attention_math
    from lomar_fast.ops.window_gather_ref import gather_windows_reference

    b, k, w, p = cfg["batch"], cfg["windows"], cfg["window_size"], cfg["patch_size"]
    dtype = getattr(torch, cfg["dtype"])
    ww, vdim, n_mask = w * w, p * p * 3, x["n_mask"]
    n_vis = ww - n_mask
    images, windows, masks, buckets = x["images"], x["windows"], x["masks"], x["buckets"]
    q, kk, v, table = x["q"], x["k"], x["v"], x["table"]
    n, h, length, d = q.shape
    lp = (length + 7) // 8 * 8
    esize = torch.empty((), dtype=dtype).element_size()

    if with_kernels:
        from lomar_fast.ops import _irpe_cuda as irc
        from lomar_fast.ops import _window_attention_cuda as wac

        kernel_bias = irc.irpe_key_bias

        def fused_attention(qq, k2, v2, tt):
            return wac.window_attention(qq, k2, v2, tt, buckets, d**-0.5)
    else:
        kernel_bias = fused_attention = None

    def gather_kernel():
        return wgc.gather_windows_kernel(images, windows, masks, p, w, True, dtype, n_mask, False)

    # the references get the masked count, as the model's step passes it (without it they read it back from
    # the masks: a host sync, and a graph break in the compiled reference)
    def gather_ref():
        return gather_windows_reference(images, windows, masks, p, w, True, dtype, n_mask)

    def gather_vis_kernel():
        return wgc.gather_windows_kernel(images, windows, masks, p, w, True, dtype, n_mask, True)

    def gather_vis_ref():
        return wgr.gather_visible_reference(images, windows, masks, p, w, True, dtype, n_mask)

    gen = torch.Generator(device="cpu").manual_seed(1)
    embed = torch.nn.Linear(vdim, cfg["embed_dim"]).to(device=device, dtype=dtype)
    mask_token = (torch.randn(cfg["embed_dim"], generator=gen) * 0.02).to(device=device, dtype=dtype)
    mask_flat = masks.reshape(b * k, ww)

    def embed_full(gather: Callable):
        patches, _ = gather()
        tokens = embed(patches)
        return torch.where(mask_flat[..., None], mask_token, tokens)

    def embed_visible(gather: Callable):
        patches, _ = gather()
        tokens = embed(patches)  # (B*K, n_vis, D)
        seq = mask_token.expand(b * k, ww, -1)
        pos = wgr.visible_positions(mask_flat, n_vis)  # no host sync
        return seq.scatter(1, pos[..., None].expand(-1, -1, tokens.shape[-1]), tokens)

    def irpe_fwd(fn):
        return lambda: fn(q, table, buckets)

    def irpe_fwd_bwd(fn):
        def run():
            qq = q.detach().requires_grad_(True)
            tt = table.detach().requires_grad_(True)
            out = fn(qq, tt, buckets)
            return torch.autograd.grad(out, (qq, tt), x["grad_bias"])

        return run

    def aligned_bmm(qq, tt, bk):
        """The iRPE bias of LOMAR_IRPE_PATH=bmm_aligned: into the layout SDPA reads without a copy."""
        return irpe_key_bias_bmm(qq, tt, bk, align=SDPA_BIAS_ALIGN)

    def attention(fn, compiled_sdpa: bool = False):
        def fwd(qq, k2, v2, tt):
            return F.scaled_dot_product_attention(qq, k2, v2, attn_mask=fn(qq, tt, buckets))

        return attention_fwd_bwd(torch.compile(fwd) if compiled_sdpa else fwd, (q, kk, v))

    def attention_fwd_bwd(fn, qkv):
        """Forward of ``fn(q, k, v, table)`` from fresh leaves, then the gradients of q, k, v and the table."""
        def run():
            qq, k2, v2 = (t.detach().requires_grad_(True) for t in qkv)
            tt = table.detach().requires_grad_(True)
            out = fn(qq, k2, v2, tt)
            return (out, *torch.autograd.grad(out, (qq, k2, v2, tt), x["grad_attn"]))

        return run

    # q, k, v as the model has them: views of one (N, L, 3, H, D) projection
    qkv = torch.stack((q, kk, v), dim=0).permute(1, 3, 0, 2, 4).contiguous()
    qa, ka, va = qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def current_attention(qq, k2, v2, tt):
        """The path the fused kernel replaces: SDPA with the (batched-matmul) iRPE additive bias."""
        return F.scaled_dot_product_attention(qq, k2, v2, attn_mask=irpe_key_bias_bmm(qq, tt, buckets))

    def math_attention(qq, k2, v2, tt):
        """The explicit-logits path: batched GEMMs and an fp32 softmax instead of SDPA's kernel."""
        return window_attention_math(qq, k2, v2, tt, buckets)

    def flex_attention(qq, k2, v2, tt):
        """FlexAttention with the iRPE term as its score modification (LOMAR_ATTN_PATH=flex), compiled."""
        return window_attention_flex(qq, k2, v2, tt, buckets)

    def wattn_fwd(fn):
        return lambda: fn(qa, ka, va, table)

    def wattn_fwd_bwd(fn):
        return attention_fwd_bwd(fn, (qa, ka, va))

    def with_env(name: str, value: str):
        """``run`` with the environment variable ``name`` set to ``value`` for the call only."""
        def wrap(run):
            def wrapped():
                old = os.environ.get(name)
                os.environ[name] = value
                try:
                    return run()
                finally:
                    if old is None:
                        os.environ.pop(name)
                    else:
                        os.environ[name] = old

            return wrapped

        return wrap

    # the window-attention kernels' products on CUDA cores (LOMAR_WA_TENSOR_CORES=0); the warp-tiled kernels
    # (LOMAR_WA_KERNEL=mma, bf16 only)
    cuda_cores = with_env(wac.TENSOR_CORES_ENV, "0") if with_kernels else None
    mma = with_env(wac.KERNEL_ENV, "mma") if with_kernels else None
    # and the warp-tiled forward built for 3 blocks per SM (a 170-register cap; the sm_90 default, 4, caps at 128)
    mma3 = (lambda run: mma(with_env(wac.FWD_BLOCKS_ENV, "3")(run))) if with_kernels else None
    variants = [("", lambda run: run, ""), ("[cuda cores]", cuda_cores, "; the kernels' products in fp32 on CUDA cores")]
    if dtype == torch.bfloat16:
        variants.append(("[mma]", mma, "; the warp-tiled tensor-core kernels (LOMAR_WA_KERNEL=mma)"))
        variants.append(("[mma 3 blocks]", mma3, "; the warp-tiled kernels, the forward built for 3 blocks per SM "
                                                 "(LOMAR_WM_FWD_BLOCKS=3; the default is 4 on sm_90, 3 on sm_80)"))

    # the pure-PyTorch paths' rows: the explicit-logits path (LOMAR_ATTN_PATH=math), eager and compiled, and
    # FlexAttention (LOMAR_ATTN_PATH=flex; bf16 runs only, as it has no CPU backward) with its own tiles and with
    # 64 x 64 ones (LOMAR_FLEX_BLOCK=64: one tile per 50-token window); (label, kernel run from a make, what it is)
    flex_what = "FlexAttention with the iRPE score modification"
    path_rows = [("math path", lambda make: make(math_attention), "window_attention_math (pure PyTorch)"),
                 ("compiled math path", lambda make: make(torch.compile(math_attention)),
                  "torch.compile(window_attention_math) (pure PyTorch)")]
    if dtype == torch.bfloat16:
        path_rows += [("flex path", lambda make: make(flex_attention), flex_what),
                      ("flex path 64", lambda make: with_env(wa_mod.FLEX_BLOCK_ENV, "64")(make(flex_attention)),
                       f"{flex_what} (LOMAR_FLEX_BLOCK=64)")]

    gather_bytes = b * k * ww * vdim * 1 + b * k * ww * vdim * esize + b * k * n_mask * vdim * 4
    vis_bytes = b * k * ww * vdim * 1 + b * k * n_vis * vdim * esize + b * k * n_mask * vdim * 4
    q_bytes = n * h * length * d * esize
    bias_bytes = n * h * length * lp * esize
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]

    cases = [
        dict(name="window_gather", bytes=gather_bytes, tol=tol,
             bytes_note="image pixels of the windows (uint8) + window patches + fp32 targets",
             kernel=gather_kernel if with_kernels else None, reference=gather_ref,
             compiled=lambda: torch.compile(gather_ref)),
        dict(name="window_gather_visible", bytes=vis_bytes, tol=tol,
             bytes_note="image pixels of the windows (uint8) + visible patches + fp32 targets",
             kernel=gather_vis_kernel if with_kernels else None, reference=gather_vis_ref,
             compiled=lambda: torch.compile(gather_vis_ref)),
        dict(name="embed_full", bytes=None, tol=5 * tol, bytes_note="",
             kernel=(lambda: embed_full(gather_kernel)) if with_kernels else None,
             reference=lambda: embed_full(gather_ref),
             compiled=lambda: torch.compile(lambda: embed_full(gather_ref))),
        dict(name="embed_visible", bytes=None, tol=5 * tol, bytes_note="",
             kernel=(lambda: embed_visible(gather_vis_kernel)) if with_kernels else None,
             reference=lambda: embed_visible(gather_vis_ref),
             compiled=lambda: torch.compile(lambda: embed_visible(gather_vis_ref))),
        dict(name="irpe_fwd", bytes=q_bytes + bias_bytes, tol=tol,
             bytes_note="q read + padded bias written",
             kernel=irpe_fwd(kernel_bias) if with_kernels else None, reference=irpe_fwd(irpe_key_bias_reference),
             compiled=lambda: irpe_fwd(torch.compile(irpe_key_bias_reference))),
        dict(name="irpe_fwd_bwd", bytes=2 * (q_bytes + bias_bytes) + q_bytes, tol=tol,
             bytes_note="forward (q, bias) + backward (grad bias read, q read, dq written)",
             kernel=irpe_fwd_bwd(kernel_bias) if with_kernels else None,
             reference=irpe_fwd_bwd(irpe_key_bias_reference),
             compiled=lambda: irpe_fwd_bwd(torch.compile(irpe_key_bias_reference))),
        dict(name="irpe_attention", bytes=None, tol=3 * tol, bytes_note="",
             kernel=attention(kernel_bias) if with_kernels else None,
             reference=attention(irpe_key_bias_reference),
             compiled=lambda: attention(irpe_key_bias_reference, compiled_sdpa=True)),
        *(dict(name=f"window_attention_{kind}{label}", bytes=nbytes, tol=3 * tol, bytes_note=note + note_suffix,
               kernel=wrap(make(fused_attention)) if with_kernels else None,
               reference=make(current_attention),
               compiled=lambda make=make: make(torch.compile(current_attention)))
          for label, wrap, note_suffix in variants
          for kind, make, nbytes, note in (
              ("fwd", wattn_fwd, 4 * q_bytes, "q, k, v read + out written"),
              ("fwd_bwd", wattn_fwd_bwd, 12 * q_bytes,
               "forward (q, k, v, out) + backward (q, k, v, out, grad out read; dq, dk, dv written)"))),
        # the pure-PyTorch batched-matmul formulation in the "kernel" column (always run)
        dict(name="irpe_fwd_bwd[bmm path]", bytes=2 * (q_bytes + bias_bytes) + q_bytes, tol=tol,
             bytes_note="as irpe_fwd_bwd; the kernel column is irpe_key_bias_bmm (pure PyTorch)",
             kernel=irpe_fwd_bwd(irpe_key_bias_bmm),
             reference=irpe_fwd_bwd(irpe_key_bias_reference),
             compiled=lambda: irpe_fwd_bwd(torch.compile(irpe_key_bias_reference))),
        dict(name="irpe_fwd_bwd[compiled bmm path]", bytes=2 * (q_bytes + bias_bytes) + q_bytes, tol=tol,
             bytes_note="as irpe_fwd_bwd; the kernel column is torch.compile(irpe_key_bias_bmm)",
             kernel=irpe_fwd_bwd(torch.compile(irpe_key_bias_bmm)),
             reference=irpe_fwd_bwd(irpe_key_bias_reference),
             compiled=lambda: irpe_fwd_bwd(torch.compile(irpe_key_bias_reference))),
        dict(name="irpe_attention[bmm path]", bytes=None, tol=3 * tol, bytes_note="",
             kernel=attention(irpe_key_bias_bmm),
             reference=attention(irpe_key_bias_reference),
             compiled=lambda: attention(irpe_key_bias_reference, compiled_sdpa=True)),
        # the batched-matmul path into SDPA's aligned bias layout (LOMAR_IRPE_PATH=bmm_aligned), compiled, in the
        # "kernel" column; the references are the plain batched-matmul path (the default), eager and compiled
        dict(name="irpe_fwd_bwd[compiled aligned bmm path]", bytes=2 * (q_bytes + bias_bytes) + q_bytes, tol=tol,
             bytes_note="as irpe_fwd_bwd; the kernel column is torch.compile(irpe_key_bias_bmm, align=8), the "
                        "references irpe_key_bias_bmm",
             kernel=irpe_fwd_bwd(torch.compile(aligned_bmm)),
             reference=irpe_fwd_bwd(irpe_key_bias_bmm),
             compiled=lambda: irpe_fwd_bwd(torch.compile(irpe_key_bias_bmm))),
        dict(name="irpe_attention[compiled aligned bmm path]", bytes=None, tol=3 * tol,
             bytes_note="the kernel column is bias (irpe_key_bias_bmm, align=8) + SDPA compiled, the references "
                        "the same with the plain batched-matmul bias",
             kernel=attention(aligned_bmm, compiled_sdpa=True),
             reference=attention(irpe_key_bias_bmm),
             compiled=lambda: attention(irpe_key_bias_bmm, compiled_sdpa=True)),
        # the pure-PyTorch attention paths in the "kernel" column, against SDPA + the bias
        *(dict(name=f"window_attention_{kind}[{label}]", bytes=nbytes, tol=3 * tol,
               bytes_note=f"{note}; the kernel column is {what}",
               kernel=kernel_run(make), reference=make(current_attention),
               compiled=lambda make=make: make(torch.compile(current_attention)))
          for label, kernel_run, what in path_rows
          for kind, make, nbytes, note in (
              ("fwd", wattn_fwd, 4 * q_bytes, "q, k, v read + out written"),
              ("fwd_bwd", wattn_fwd_bwd, 12 * q_bytes, "as window_attention_fwd_bwd"))),
    ]
    return cases


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def run_case(case: dict, args, cuda: bool, copy_gbps: float | None, compile_ref: bool) -> dict:
    rec: dict = {"name": case["name"], "bytes": case["bytes"], "bytes_note": case["bytes_note"]}
    variants = {"reference_eager": case["reference"]}
    if compile_ref:
        variants["reference_compiled"] = case["compiled"]()
    if case["kernel"] is not None:
        variants["kernel"] = case["kernel"]
    outputs = {}
    for label, fn in variants.items():
        try:
            outputs[label] = _as_list(fn())  # first call: compiles / builds
            times = time_fn(fn, args.warmup, args.repeats, cuda)
            med = statistics.median(times)
            entry = {"median_ms": med, "times_ms": times}
            if case["bytes"]:
                gbps = case["bytes"] / (med * 1e-3) / 1e9
                entry["GBps"] = gbps
                if copy_gbps:
                    entry["fraction_of_copy_bw"] = gbps / copy_gbps
            rec[label] = entry
        except Exception as e:  # a failing variant is recorded, the run goes on
            rec[label] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
    ref = outputs.get("reference_eager")
    errs = {}
    for label in ("kernel", "reference_compiled"):
        if label in outputs and ref is not None:
            got = outputs[label]
            if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
                errs[label] = float("inf")
            else:
                errs[label] = max((rel_err(a, b) for a, b in zip(got, ref)), default=0.0)
    rec["max_rel_err"] = errs
    rec["tolerance"] = case["tol"]
    checked = [label for label in ("kernel",) if label in variants]
    rec["correct"] = all(errs.get(label, float("inf")) <= case["tol"] for label in checked) if checked else (
        ref is not None and "error" not in rec["reference_eager"])
    for label in ("reference_compiled", "reference_eager"):
        k, r = rec.get("kernel", {}), rec.get(label, {})
        if "median_ms" in k and "median_ms" in r:
            rec[f"kernel_over_{label.removeprefix('reference_')}"] = k["median_ms"] / r["median_ms"]
    return rec


# ------------------------------------------------------------------------------------------------ report
def _fmt(entry: dict | None, key: str = "median_ms", digits: int = 3) -> str:
    if not entry:
        return "-"
    if "error" in entry:
        return "error"
    val = entry.get(key)
    return "-" if val is None else f"{val:.{digits}f}"


def render_markdown(data: dict) -> str:
    lines = [
        "# Kernel benchmark",
        "",
        f"Device: {data['device']} | torch {data['torch']} | cupy {data['cupy']} | mode {data['mode']}",
        f"Config: {json.dumps(data['config'])}",
        "Copy bandwidth (device-to-device, read+write): "
        + (f"{data['copy_bandwidth_GBps']:.0f} GB/s" if data.get("copy_bandwidth_GBps") else "-"),
        "",
        "| case | kernel ms | eager ref ms | compiled ref ms | kernel / compiled | kernel GB/s | % of copy BW | max rel err | correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        k = r.get("kernel")
        frac = k.get("fraction_of_copy_bw") if k and "error" not in k else None
        ratio = r.get("kernel_over_compiled")
        err = r.get("max_rel_err", {}).get("kernel")
        lines.append(
            f"| {r['name']} | {_fmt(k)} | {_fmt(r.get('reference_eager'))} | {_fmt(r.get('reference_compiled'))} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'} | {_fmt(k, 'GBps', 0)} "
            f"| {'-' if frac is None else f'{100 * frac:.0f}%'} | {'-' if err is None else f'{err:.1e}'} "
            f"| {'yes' if r['correct'] else 'NO'} |"
        )
    lines += ["", "Times are medians over the timed runs (CUDA events). GB/s counts the bytes each case must read",
              "and write (see `bytes_note` in kernels.json); a kernel/compiled ratio below 1 means the kernel is faster."]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = None
    return {"torch": torch.__version__, "cupy": cupy_version, "python": platform.python_version(),
            "cuda": torch.version.cuda}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory for kernels.json and kernels.md")
    ap.add_argument("--quick", action="store_true", help="fewer timed runs")
    ap.add_argument("--cpu-smoke", action="store_true", help="reference paths only, tiny shapes, on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd references")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                    help="run only these cases (exact names, e.g. window_attention_fwd_bwd[mma]); default: all")
    return ap.parse_args(argv)


def select_cases(cases: list[dict], names: list[str] | None) -> list[dict]:
    """The cases named (in the benchmark's order); every name must be a case of this run, else SystemExit."""
    if names is None:
        return cases
    known = [c["name"] for c in cases]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"benchmarks.kernels --cases: no case {', '.join(unknown)} in this run; the cases are: "
                         f"{', '.join(known)}")
    return [c for c in cases if c["name"] in names]


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        cfg, device, mode = dict(SMOKE_CONFIG), "cpu", "cpu-smoke"
        args.warmup = 1 if args.warmup is None else args.warmup
        args.repeats = 3 if args.repeats is None else args.repeats
        compile_ref, with_kernels, cuda = False, False, False
    else:
        if not cuda:
            raise SystemExit("benchmarks.kernels: no GPU (torch.cuda.is_available() is False); "
                             "run it on a CUDA machine, or pass --cpu-smoke to exercise the code path on CPU")
        cfg, device, mode = dict(GPU_CONFIG), "cuda", "gpu"
        args.warmup = (3 if args.quick else 10) if args.warmup is None else args.warmup
        args.repeats = (10 if args.quick else 50) if args.repeats is None else args.repeats
        compile_ref, with_kernels = not args.no_compile, True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from lomar_fast.ops._dispatch import set_kernels

    set_kernels("on" if with_kernels else "off")
    t0 = time.time()
    x = make_inputs(cfg, device)
    copy_gbps = copy_bandwidth(cuda, args.warmup, args.repeats)
    results = []
    data = {
        "schema": SCHEMA,
        "mode": mode,
        "complete": False,  # true once every case ran; the file is rewritten after each case
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        **_versions(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        # the switches the cases ran under (paths, kernel forms, FlexAttention options); rows that set one say so
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LOMAR_")},
        "config": {**cfg, "warmup": args.warmup, "repeats": args.repeats, "compiled_reference": compile_ref},
        "copy_bandwidth_GBps": copy_gbps,
        "wall_s": None,
        "results": results,
    }
    for case in select_cases(build_cases(x, cfg, device, with_kernels), args.cases):
        rec = run_case(case, args, cuda, copy_gbps, compile_ref)
        results.append(rec)
        data["wall_s"] = time.time() - t0
        write_json(out_dir / "kernels.json", data)
        k = rec.get("kernel", {})
        print(f"{rec['name']:<24} kernel {_fmt(k)} ms | eager {_fmt(rec.get('reference_eager'))} ms | "
              f"compiled {_fmt(rec.get('reference_compiled'))} ms | err {rec['max_rel_err']} | "
              f"correct {rec['correct']}", flush=True)
    set_kernels(None)
    data["complete"], data["wall_s"] = True, time.time() - t0
    write_json(out_dir / "kernels.json", data)
    (out_dir / "kernels.md").write_text(render_markdown(data))
    print(f"wrote {out_dir / 'kernels.json'} and {out_dir / 'kernels.md'} in {data['wall_s']:.0f} s")
    return data


if __name__ == "__main__":
    main()

"""Fused window attention with the iRPE key term (cuda/window_attention.cu, lomar_fast.ops.window_attention).

CPU (always): the reference equals a float64 brute force written from DESIGN.md's formula (values, and
gradients by gradcheck); the dispatching function equals the SDPA + iRPE-bias path it replaces, bit for
bit, and the attention block uses it; the custom ops are registered, their fake implementations give
the real ops' shapes, strides and dtypes, opcheck passes, and the ops' forward and backward formulas
(the kernels' math, run in PyTorch on CPU) match autograd through the reference on odd shapes; the
source compiles warning-free with nvcc and NVRTC for sm_80 and sm_90; and the kernels, compiled as host
C++ with the emulation layer (tests/kernel_emulation.py), match the reference forward and backward, also
when launched by the CUDA wrapper itself (its launch call redirected to the emulation); so do the warp-tiled
kernels (LOMAR_WA_KERNEL=mma: ldmatrix and mma.sync emulated), which the wrapper takes only for bf16 with
16-byte aligned rows. The explicit-logits
path (LOMAR_ATTN_PATH=math) matches the float64 formula in values and gradients, compiles to one graph, and
the switch picks it only for windows. The FlexAttention path (LOMAR_ATTN_PATH=flex) matches the float64 formula
through FlexAttention's unfused implementation (values and gradients), compiled forward, and the switch picks it
only for CUDA tensors.

GPU (``-m gpu``, skipped without CUDA or CuPy): kernel vs float64 truth on odd and ViT-B shapes in every
dtype (and the warp-tiled kernels of LOMAR_WA_KERNEL=mma in bf16), values and gradients, non-contiguous and unaligned inputs, a deterministic table gradient,
torch.compile of an attention block, opcheck on CUDA; the explicit-logits path in bf16 at ViT-B shapes; the
FlexAttention path compiled (odd shapes in fp32 and bf16, ViT-B shapes with each tile setting, and a compiled
attention block against the SDPA path).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_emulation import (ARCHS, DTYPES, SHARED_BYTES, build_library, build_sanitized, c_args, emulation_source,
                              gpu_test, launched, missing_toolchain, nvcc_check, nvrtc_compile,
                              run_sanitized)

from lomar_fast.models.irpe import bucket_ids
from lomar_fast.models.vit import Attention
from lomar_fast.ops import _cuda_build as cb
from lomar_fast.ops import _window_attention_cuda as wac
from lomar_fast.ops import window_attention as wa_mod
from lomar_fast.ops._dispatch import set_kernels
from lomar_fast.ops.irpe import irpe_key_bias
from lomar_fast.ops.window_attention_ref import window_attention_reference

REPO = Path(__file__).resolve().parent.parent




# ---------------------------------------------------------------------------------------------
# inputs and the independent formula
# ---------------------------------------------------------------------------------------------
def qkv_views(n, h, length, d, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v as the attention block makes them: views of one (N, L, 3, H, D) projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, length, 3, h, d, generator=g).to(dtype).to(device)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def window_buckets(side: int) -> torch.Tensor:
    """Buckets of a side x side window plus cls (L = side^2 + 1, 50 buckets)."""
    return bucket_ids(side, side)


def random_table(d, nb=50, seed=1, dtype=torch.float32, device="cpu", std=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, nb, generator=g) * std).to(dtype).to(device)


def brute_force(q, k, v, table, buckets, scale):
    """DESIGN.md's logits in float64, element by element in index form:
    s[n,h,i,j] = scale * sum_d q[n,h,i,d] k[n,h,j,d] + sum_d q[n,h,i,d] T[d, bucket(i,j)], softmax over j, times v."""
    q, k, v, t = (x.detach().double() for x in (q, k, v, table))
    tb = t[:, buckets]  # (D, L, L): T[:, bucket(i, j)]
    s = scale * torch.einsum("nhid,nhjd->nhij", q, k) + torch.einsum("nhid,dij->nhij", q, tb)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    return torch.einsum("nhij,nhjd->nhid", p, v), torch.logsumexp(s, -1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def truth_grads(q, k, v, table, buckets, scale, grad_out):
    """Float64 autograd of the reference from the same (possibly rounded) inputs."""
    xs = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v, table)]
    out = window_attention_reference(*xs[:3], xs[3], buckets.cpu(), scale)
    return out, torch.autograd.grad(out, xs, grad_out.detach().cpu().double())


# ---------------------------------------------------------------------------------------------
# reference (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side,nb,d", [(4, 50, 8), (3, 13, 5)])
def test_reference_matches_brute_force(side, nb, d):
    torch.manual_seed(0)
    length = side * side + 1
    buckets = window_buckets(side) if nb == 50 else torch.randint(0, nb, (length, length))
    q, k, v = qkv_views(3, 2, length, d, torch.float64)
    table = random_table(d, nb, dtype=torch.float64)
    want, _ = brute_force(q, k, v, table, buckets, 0.37)
    got = window_attention_reference(q, k, v, table, buckets, 0.37)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the default scale is head_dim^-0.5, and the table term really contributes
    torch.testing.assert_close(window_attention_reference(q, k, v, table, buckets), brute_force(
        q, k, v, table, buckets, d**-0.5)[0], rtol=1e-12, atol=1e-12)
    assert rel_err(got, brute_force(q, k, v, table * 0, buckets, 0.37)[0]) > 1e-3


def test_reference_gradcheck():
    torch.manual_seed(0)
    buckets = window_buckets(2)  # L = 5
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(1, 2, 5, 4, torch.float64))
    table = random_table(4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda *a: window_attention_reference(*a, buckets, 0.5), (q, k, v, table), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_computes_in_fp32_and_casts_back(dtype):
    buckets = window_buckets(3)
    q, k, v = qkv_views(2, 3, 10, 16, dtype)
    table = random_table(16)
    got = window_attention_reference(q, k, v, table, buckets)
    assert got.dtype == dtype
    want = brute_force(q, k, v, table, buckets, 16**-0.5)[0].to(dtype)
    # the float64 result rounded once: equal, or one step of the 16-bit format apart where fp32 and fp64
    # round differently, plus fp32's own error on an output that cancels to near zero (a few fp32 steps of the
    # largest v it averages); a 16-bit computation would be off by 16-bit steps of that scale, 2^13 times more
    step = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
    fp32_error = 8 * torch.finfo(torch.float32).eps * v.float().abs().amax(-2, keepdim=True)
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= step + fp32_error).all())
    assert float((diff == 0).float().mean()) > 0.95


def test_reference_rejects_bad_inputs():
    q, k, v = qkv_views(1, 2, 5, 4)
    table, buckets = random_table(4), window_buckets(2)
    with pytest.raises(ValueError, match="q must be"):
        window_attention_reference(q[0], k, v, table, buckets)
    with pytest.raises(ValueError, match="k must have q's shape"):
        window_attention_reference(q, k[..., :3], v, table, buckets)
    with pytest.raises(ValueError, match="v must have q's dtype"):
        window_attention_reference(q, k, v.double(), table, buckets)
    with pytest.raises(ValueError, match="table"):
        window_attention_reference(q, k, v, random_table(5), buckets)
    with pytest.raises(ValueError, match="buckets"):
        window_attention_reference(q, k, v, table, buckets.int())


# ---------------------------------------------------------------------------------------------
# dispatch and the attention block (CPU)
# ---------------------------------------------------------------------------------------------
class _Boom:
    def __getattr__(self, name):
        raise AssertionError(f"CUDA kernel module used for CPU tensors ({name})")


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
@pytest.mark.parametrize("rpe_scale", [None, 0.25])
def test_dispatch_on_cpu_is_the_sdpa_bias_path(monkeypatch, mode, rpe_scale):
    """On CPU the function is exactly the computation the blocks ran before: SDPA + irpe_key_bias."""
    import lomar_fast.ops as ops_pkg

    monkeypatch.setitem(sys.modules, "lomar_fast.ops._window_attention_cuda", _Boom())
    monkeypatch.setattr(ops_pkg, "_window_attention_cuda", _Boom(), raising=False)
    monkeypatch.delenv(wa_mod.ATTN_PATH_ENV, raising=False)
    set_kernels(mode)
    try:
        buckets = window_buckets(4)
        q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(3, 5, 17, 16))
        table = random_table(16).requires_grad_(True)
        got = wa_mod.window_attention(q, k, v, table, buckets, rpe_scale=rpe_scale)
        q_rpe = q if rpe_scale is None else q * rpe_scale
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=irpe_key_bias(q_rpe, table, buckets))
        assert torch.equal(got, want)
        go = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (q, k, v, table), go), torch.autograd.grad(want, (q, k, v, table), go)):
            assert torch.equal(a, b)
        # and it means the reference (rpe_scale folded into the table)
        t = table if rpe_scale is None else table * rpe_scale
        torch.testing.assert_close(got, window_attention_reference(q, k, v, t, buckets), rtol=2e-5, atol=2e-5)
        got_scaled = wa_mod.window_attention(q, k, v, table, buckets, scale=0.5, rpe_scale=rpe_scale)
        torch.testing.assert_close(got_scaled, window_attention_reference(q, k, v, t, buckets, 0.5),
                                   rtol=2e-5, atol=2e-5)
    finally:
        set_kernels(None)


@pytest.mark.parametrize("scaled_query", [False, True])
def test_attention_block_uses_window_attention(monkeypatch, scaled_query):
    """The block's output is unchanged (rpe_k + SDPA, as before), and it goes through window_attention_qkv with
    its packed projection."""
    import lomar_fast.models.vit as vit

    torch.manual_seed(0)
    attn = Attention(48, 3, rpe=True, scaled_query=scaled_query)
    with torch.no_grad():
        attn.rpe_k.lookup_table_weight.normal_(0, 0.3)
    buckets = window_buckets(3)
    x = torch.randn(4, 10, 48)
    calls = []
    real = vit.window_attention_qkv

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(vit, "window_attention_qkv", spy)
    got = attn(x, buckets)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0].shape == (4, 10, 3, 3, 16)
    assert args[1] is not None and torch.equal(args[1], attn.rpe_k.lookup_table_weight[0])
    assert kwargs["rpe_scale"] == (16**-0.5 if scaled_query else None)

    n, length, dim = x.shape
    q, k, v = attn.qkv(x).reshape(n, length, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    before = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.rpe_k(q, buckets))
    want = attn.proj(before.transpose(1, 2).reshape(n, length, dim))
    assert torch.equal(got, want)


def test_auto_default_follows_committed_gpu_results():
    """``auto`` uses the kernel only when a committed GPU result shows it correct and faster than the
    compiled current path, forward+backward and forward."""
    results = REPO / "benchmarks" / "results" / "h200" / "kernels.json"
    rows = {r["name"]: r for r in json.loads(results.read_text())["results"]} if results.is_file() else {}

    def wins(name):
        r = rows.get(name)
        return r is not None and bool(r["correct"]) and r.get("kernel_over_compiled", 2.0) < 1.0

    assert wa_mod.AUTO_USES_KERNEL is (wins("window_attention_fwd_bwd") and wins("window_attention_fwd"))


# ---------------------------------------------------------------------------------------------
# custom ops: registration, fake implementations, opcheck, autograd formula (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["window_attention_fwd", "window_attention_bwd", "window_attention_qkv_fwd",
                                  "window_attention_qkv_bwd"])
def test_ops_registered(name):
    op = getattr(torch.ops.lomar_fast, name)
    assert isinstance(op.default, torch._ops.OpOverload)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lomar_fast::{name}", "Meta")


def _heads_strides(n, h, length, d):
    return (length * h * d, d, h * d, 1)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_fake_shapes_strides_dtypes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, length, d, nb = 5, 3, 26, 80, 50
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with FakeTensorMode():
        q, k, v = torch.empty(n, length, 3, h, d, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
        table = torch.empty(d, nb, dtype=torch.bfloat16)
        buckets = torch.zeros(length, length, dtype=torch.long)
        out, lse = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, buckets, 0.1)
        assert out.shape == (n, h, length, d) and out.dtype == dtype
        assert out.stride() == _heads_strides(n, h, length, d)
        assert lse.shape == (n, h, length) and lse.dtype == acc and lse.is_contiguous()
        grads = torch.ops.lomar_fast.window_attention_bwd(out, q, k, v, out, lse, table, buckets, 0.1)
        for g in grads[:3]:
            assert g.shape == (n, h, length, d) and g.dtype == dtype
            assert g.stride() == _heads_strides(n, h, length, d)
        assert grads[3].shape == (d, nb) and grads[3].dtype == acc
        # the public path returns the same layout: (N, L, H*D) is a view of it
        flat = wac.window_attention(q, k, v, table, buckets, 0.1).transpose(1, 2)
        assert flat.is_contiguous() and flat.reshape(n, length, h * d).shape == (n, length, h * d)


def test_real_ops_match_fake_layout_on_cpu():
    n, h, length, d = 3, 5, 17, 32
    q, k, v = qkv_views(n, h, length, d)
    table, buckets = random_table(d), window_buckets(4)
    out, lse = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, buckets, 0.2)
    assert out.stride() == _heads_strides(n, h, length, d) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), brute_force(q, k, v, table, buckets, 0.2)[1], rtol=1e-6, atol=1e-6)
    grads = torch.ops.lomar_fast.window_attention_bwd(torch.randn_like(out), q, k, v, out, lse, table, buckets, 0.2)
    assert all(g.stride() == _heads_strides(n, h, length, d) for g in grads[:3])
    assert grads[3].shape == table.shape and grads[3].dtype == torch.float32


def test_opcheck_cpu():
    torch.manual_seed(0)
    buckets = torch.randint(0, 7, (9, 9))
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(2, 3, 9, 8, torch.float64))
    table = random_table(8, 7, dtype=torch.float64).requires_grad_(True)
    torch.library.opcheck(torch.ops.lomar_fast.window_attention_fwd, (q, k, v, table, buckets, 0.3))
    out, lse = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, buckets, 0.3)
    args = (torch.randn_like(out), *(x.detach() for x in (q, k, v, out, lse, table)), buckets, 0.3)
    torch.library.opcheck(torch.ops.lomar_fast.window_attention_bwd, args)


def test_packed_ops_fake_layout_and_opcheck_cpu():
    """The packed ops: the forward's out has the unpacked op's layout, the gradient comes back in qkv's own
    (N, L, 3, H, D) layout (contiguous), the fake implementations agree, and opcheck passes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, length, d = 2, 3, 9, 8
    with FakeTensorMode():
        qkv = torch.empty(n, length, 3, h, d, dtype=torch.bfloat16)
        out, lse = torch.ops.lomar_fast.window_attention_qkv_fwd(qkv, torch.empty(d, 7), torch.zeros(9, 9).long(), 0.3)
        assert out.stride() == _heads_strides(n, h, length, d) and lse.dtype == torch.float32
        dqkv, dt = torch.ops.lomar_fast.window_attention_qkv_bwd(out, qkv, out, lse, torch.empty(d, 7),
                                                                torch.zeros(9, 9).long(), 0.3)
        assert dqkv.shape == qkv.shape and dqkv.is_contiguous() and dt.shape == (d, 7)
    torch.manual_seed(0)
    buckets = torch.randint(0, 7, (length, length))
    qkv = torch.randn(n, length, 3, h, d, dtype=torch.float64, requires_grad=True)
    table = random_table(d, 7, dtype=torch.float64).requires_grad_(True)
    torch.library.opcheck(torch.ops.lomar_fast.window_attention_qkv_fwd, (qkv, table, buckets, 0.3))
    out, lse = torch.ops.lomar_fast.window_attention_qkv_fwd(qkv, table, buckets, 0.3)
    assert out.stride() == _heads_strides(n, h, length, d)
    args = (torch.randn_like(out), qkv.detach(), out.detach(), lse, table.detach(), buckets, 0.3)
    torch.library.opcheck(torch.ops.lomar_fast.window_attention_qkv_bwd, args)
    dqkv, _ = torch.ops.lomar_fast.window_attention_qkv_bwd(*args)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()


@pytest.mark.parametrize("scaled_query", [False, True])
def test_window_attention_qkv_equals_unpacked_path(monkeypatch, scaled_query):
    """window_attention_qkv gives window_attention's value and gradients: bit for bit on the PyTorch path (it is
    that path), and through the packed ops' formulas (the kernel path's meaning, run on CPU) within fp32 error."""
    torch.manual_seed(1)
    buckets = window_buckets(4)
    qkv = torch.randn(3, 17, 3, 5, 32, requires_grad=True)
    table = random_table(32).requires_grad_(True)
    rpe = 32**-0.5 if scaled_query else None
    go = torch.randn(3, 5, 17, 32)

    def run(fn):
        out = fn()
        return (out, *torch.autograd.grad(out, (qkv, table), go))

    want = run(lambda: wa_mod.window_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), table, buckets, rpe_scale=rpe))
    got = run(lambda: wa_mod.window_attention_qkv(qkv, table, buckets, rpe_scale=rpe))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    monkeypatch.setattr(wa_mod, "use_kernel", lambda *a, **k: True)
    packed = run(lambda: wa_mod.window_attention_qkv(qkv, table, buckets, rpe_scale=rpe))
    for a, b in zip(packed, want):
        assert rel_err(a, b) <= 2e-5, rel_err(a, b)
    with pytest.raises(ValueError, match=r"qkv must be \(N, L, 3, H, D\), got shape \(3, 17, 480\)"):
        wa_mod.window_attention_qkv(qkv.detach().reshape(3, 17, 480), table, buckets)


OP_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("length,d", [(17, 32), (26, 80), (50, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_op_autograd_matches_reference(length, d, dtype):
    """The ops' formulas (P from lse; dS = P (dP - rowsum(dO O)); G by bucket; dq, dk, dv, dT) give the
    reference's values and gradients (N, H odd; a table in another dtype than q)."""
    torch.manual_seed(0)
    side = {17: 4, 26: 5, 50: 7}[length]
    buckets = window_buckets(side)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(3, 3, length, d, dtype, seed=length))
    table = random_table(d, dtype=torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
    scale = d**-0.5
    out = wac.window_attention(q, k, v, table, buckets, scale)
    ref = window_attention_reference(q, k, v, table, buckets, scale)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= OP_TOL[dtype] / 2
    go = torch.randn(out.shape).to(dtype)
    got = torch.autograd.grad(out, (q, k, v, table), go)
    want = torch.autograd.grad(ref, (q, k, v, table), go)
    for name, a, b in zip("q k v table".split(), got, want):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) <= OP_TOL[dtype], (name, rel_err(a, b))


def test_op_compiles_as_one_node_cpu():
    """torch.compile keeps the op opaque (fake impl + registered autograd) and matches eager."""
    torch.manual_seed(0)
    buckets = window_buckets(3)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(2, 3, 10, 32))
    table = random_table(32).requires_grad_(True)

    def f(q, k, v, table):
        return (wac.window_attention(q, k, v, table, buckets, 0.2) * 1.5).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, table)
    g_got = torch.autograd.grad(got, (q, k, v, table))
    want = f(q, k, v, table)
    g_want = torch.autograd.grad(want, (q, k, v, table))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_op_compiles_as_one_node_cpu():
    """The same for the packed op the model's attention calls, with the qkv projection in the graph: the gradient
    of the projection's weight flows through the op's packed gradient."""
    torch.manual_seed(0)
    buckets = window_buckets(3)
    proj = torch.nn.Linear(24, 3 * 24)
    table = random_table(8).requires_grad_(True)
    x = torch.randn(2, 10, 24, requires_grad=True)

    def f(x, table):
        qkv = proj(x).reshape(2, 10, 3, 3, 8)
        return (wac.window_attention_qkv(qkv, table, buckets, 0.2) * 1.5).square().sum()

    params = (x, table, proj.weight)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, table)
    g_got = torch.autograd.grad(got, params)
    want = f(x, table)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the explicit-logits path (LOMAR_ATTN_PATH=math) and the flex path's formula, CPU
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention's unfused implementation with its CPU-backward refusal lifted: the dense math FlexAttention
    defines its kernels by, run here to check the path's score modification and its gradients."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    return fa.flex_attention


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("length,d,scale,rpe_scale", [(17, 16, None, None), (26, 80, 0.3, 0.25),
                                                      (50, 64, None, 64**-0.5), (5, 3, 1.7, None),
                                                      (82, 8, None, None)])  # a 9 x 9 grid: fine-tuning's layout
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["math", "flex"])
def test_pytorch_paths_match_the_formula_values_and_gradients(request, path, length, d, scale, rpe_scale, dtype):
    """The explicit-logits path, and the flex path's score modification (``qt[n, h, i, bucket(i, j)]`` added to the
    scaled score, run through FlexAttention's unfused implementation), are DESIGN.md's attention: float64 truth of
    values and of the q, k, v and table gradients (FlexAttention differentiates through ``qt``), on odd sizes, with
    and without the scales; in bf16 within the tolerance the other paths are held to."""
    if path == "math":
        attend = wa_mod.window_attention_math
    else:
        attend = functools.partial(wa_mod.window_attention_flex, flex=request.getfixturevalue("flex_backward_on_cpu"))
    side = {17: 4, 26: 5, 50: 7, 5: 2, 82: 9}[length]
    buckets = window_buckets(side)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(3, 5, length, d, dtype, seed=length))
    table = random_table(d, dtype=torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
    if path == "flex" and wa_mod.flex_refuses_head_dim(d):  # torch <= 2.7: powers of two only
        with pytest.raises(ValueError, match=f"head dims only, and this model's is {d}: use torch 2.8 or newer"):
            attend(q, k, v, table, buckets, scale, rpe_scale)
        return
    out = attend(q, k, v, table, buckets, scale, rpe_scale)
    assert out.dtype == dtype and out.shape == q.shape
    s = d**-0.5 if scale is None else scale
    t = table if rpe_scale is None else table * rpe_scale
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    want, want_grads = truth_grads(q, k, v, t, buckets, s, go)
    tb, _ = brute_force(q, k, v, t, buckets, s)
    assert rel_err(want, tb) < 1e-12  # the float64 truth is the index-form formula
    assert rel_err(out, want) <= OP_TOL[dtype] / 2
    got = torch.autograd.grad(out, (q, k, v, table), go)
    if rpe_scale is not None:  # d/dtable of (table * rpe_scale)
        want_grads = (*want_grads[:3], want_grads[3] * rpe_scale)
    for name, a, b in zip("q k v table".split(), got, want_grads):
        assert rel_err(a, b) <= OP_TOL[dtype], (name, rel_err(a, b))


def test_math_path_gradcheck():
    buckets = window_buckets(2)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(1, 2, 5, 4, torch.float64))
    table = random_table(4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: wa_mod.window_attention_math(*a, buckets, 0.5, 0.7),
                                    (q, k, v, table), eps=1e-6, atol=1e-6)


def test_attention_path_switch(monkeypatch):
    """LOMAR_ATTN_PATH picks the pure-PyTorch path: sdpa by default, math for windows of up to
    MATH_MAX_TOKENS tokens (longer sequences keep SDPA), flex for CUDA tensors (CPU ones keep SDPA), anything
    else one error naming the variable."""
    calls = []
    for name in ("window_attention_math", "window_attention_sdpa", "window_attention_flex"):
        real = getattr(wa_mod, name)
        monkeypatch.setattr(wa_mod, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    small = (*qkv_views(2, 3, 17, 8), random_table(8), window_buckets(4))
    long_len = wa_mod.MATH_MAX_TOKENS + 1
    long = (*qkv_views(1, 2, long_len, 8), random_table(8), torch.zeros(long_len, long_len, dtype=torch.long))
    monkeypatch.delenv(wa_mod.ATTN_PATH_ENV, raising=False)
    assert wa_mod.DEFAULT_ATTENTION_PATH == "sdpa" and wa_mod.attention_path() == "sdpa"
    wa_mod.window_attention(*small)
    monkeypatch.setenv(wa_mod.ATTN_PATH_ENV, " Math ")
    got = wa_mod.window_attention(*small)
    wa_mod.window_attention(*long)
    assert calls == ["window_attention_sdpa", "window_attention_math", "window_attention_sdpa"]
    torch.testing.assert_close(got, window_attention_reference(*small), rtol=2e-5, atol=2e-5)
    calls.clear()
    monkeypatch.setenv(wa_mod.ATTN_PATH_ENV, "flex")  # CUDA tensors only: FlexAttention has no CPU backward
    wa_mod.window_attention(*small)
    assert calls == ["window_attention_sdpa"]
    monkeypatch.setenv(wa_mod.ATTN_PATH_ENV, "flash")
    with pytest.raises(ValueError, match="LOMAR_ATTN_PATH='flash' must be one of sdpa, math, flex"):
        wa_mod.window_attention(*small)


# ---------------------------------------------------------------------------------------------
# FlexAttention (LOMAR_ATTN_PATH=flex), CPU
# ---------------------------------------------------------------------------------------------
def test_flex_path_compiled_forward_on_cpu(monkeypatch):
    """Called outside torch.compile, the path compiles FlexAttention (once) and passes its kernel options; on a
    CPU that is inductor's C++ kernel, forward only: its values are the reference's."""
    monkeypatch.delenv(wa_mod.FLEX_BLOCK_ENV, raising=False)
    monkeypatch.delenv(wa_mod.FLEX_OPTIONS_ENV, raising=False)
    monkeypatch.setattr(wa_mod, "_compiled_flex", None)
    buckets = window_buckets(4)
    q, k, v = qkv_views(3, 2, 17, 16, seed=5)
    table = random_table(16)
    with torch.no_grad():
        out = wa_mod.window_attention_flex(q, k, v, table, buckets, None, 0.125)
    assert wa_mod._compiled_flex is not None
    torch.testing.assert_close(out, window_attention_reference(q, k, v, table * 0.125, buckets), rtol=2e-5, atol=2e-5)


def test_flex_path_traces_whole_inside_a_compiled_function(monkeypatch):
    """Inside torch.compile the path calls FlexAttention itself (traced, not its own compiled copy), with the
    options of both switches read while tracing: one graph (fullgraph), the reference's values (CPU, forward)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv(wa_mod.FLEX_BLOCK_ENV, "64")
    monkeypatch.setenv(wa_mod.FLEX_OPTIONS_ENV, '{"WRITE_DQ": false}')
    monkeypatch.setattr(wa_mod, "_compiled_flex", None)
    buckets = window_buckets(4)
    qkv = torch.randn(3, 17, 3, 2, 16, generator=torch.Generator().manual_seed(6))
    table = random_table(16)

    def attend(qkv, table):
        return wa_mod.window_attention_flex(*qkv.permute(2, 0, 3, 1, 4).unbind(0), table, buckets)

    torch._dynamo.reset()
    counters.clear()
    try:  # q, k, v are views of one buffer, which torch 2.6-2.11's CPU lowering refuses unless the path copies them
        with torch.no_grad():
            out = torch.compile(attend, fullgraph=True, dynamic=False)(qkv, table)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    assert wa_mod._compiled_flex is None
    want = window_attention_reference(*qkv.permute(2, 0, 3, 1, 4).unbind(0), table, buckets)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


def test_flex_path_projection_rows_are_padded_to_aligned_width():
    """The q T the kernels read has its 50 buckets padded with zero columns to 56 (16-byte rows in bf16), in the
    compute dtype, with rpe_scale folded into the table."""
    seen = {}

    def spy(q, k, v, score_mod, scale):
        seen["qt"] = next(c.cell_contents for c in score_mod.__closure__ if isinstance(c.cell_contents, torch.Tensor)
                          and c.cell_contents.dim() == 4)
        return q

    q, k, v = qkv_views(2, 3, 17, 8, torch.bfloat16)
    table = random_table(8)
    wa_mod.window_attention_flex(q, k, v, table, window_buckets(4), None, 0.5, flex=spy)
    qt = seen["qt"]
    assert qt.shape == (2, 3, 17, 56) and qt.dtype == torch.float32
    assert not qt[..., 50:].any()
    torch.testing.assert_close(qt[..., :50], (q.float() @ (table * 0.5)), rtol=2e-2, atol=2e-2)


def test_flex_path_names_the_way_out_where_flexattention_refuses_the_head_dim(monkeypatch):
    """Up to torch 2.7 FlexAttention takes power-of-two head dims only (its module holds the check's helper):
    there the path stops with one error naming the variable, the head dim and the ways out, before any work;
    from torch 2.8 on (no helper) it refuses none."""
    import torch.nn.attention.flex_attention as fa

    calls = []
    q, k, v = qkv_views(2, 3, 17, 80)
    monkeypatch.setattr(fa, "_supported_head_dim", lambda n: n in (16, 32, 64, 128), raising=False)
    assert wa_mod.flex_refuses_head_dim(80) and not wa_mod.flex_refuses_head_dim(64)
    with pytest.raises(ValueError, match=r"LOMAR_ATTN_PATH=flex: torch .*'s FlexAttention takes power-of-two head "
                                         r"dims only, and this model's is 80: use torch 2.8 or newer, or "
                                         r"LOMAR_ATTN_PATH=sdpa \(the default\)"):
        wa_mod.window_attention_flex(q, k, v, random_table(80), window_buckets(4), flex=lambda *a, **kw: calls.append(a))
    assert not calls
    monkeypatch.delattr(fa, "_supported_head_dim")
    assert not wa_mod.flex_refuses_head_dim(80) and not wa_mod.flex_refuses_head_dim(3)
    wa_mod.window_attention_flex(q, k, v, random_table(80), window_buckets(4), flex=lambda *a, **kw: calls.append(a))
    assert len(calls) == 1


def test_flex_kernel_options(monkeypatch):
    """Always FlexAttention's general kernel (not its decoding kernel, which it picks for under 128 queries);
    LOMAR_FLEX_BLOCK sets every tile side of the forward and backward, LOMAR_FLEX_OPTIONS any option over it, and
    a bad value of either is one error naming it."""
    monkeypatch.delenv(wa_mod.FLEX_BLOCK_ENV, raising=False)
    monkeypatch.delenv(wa_mod.FLEX_OPTIONS_ENV, raising=False)
    assert wa_mod.flex_kernel_options() == {"FORCE_USE_FLEX_ATTENTION": True}
    monkeypatch.setenv(wa_mod.FLEX_BLOCK_ENV, " 64 ")
    opts = wa_mod.flex_kernel_options()
    assert opts.pop("FORCE_USE_FLEX_ATTENTION") is True
    assert opts == {f"{p}_{n}": 64 for p, n in (("fwd", "BLOCK_M"), ("fwd", "BLOCK_N"), ("bwd", "BLOCK_M1"),
                                                  ("bwd", "BLOCK_N1"), ("bwd", "BLOCK_M2"), ("bwd", "BLOCK_N2"))}
    for bad in ("48", "256", "big"):
        monkeypatch.setenv(wa_mod.FLEX_BLOCK_ENV, bad)
        with pytest.raises(ValueError, match=f"LOMAR_FLEX_BLOCK='{bad}' must be one of 16, 32, 64, 128"):
            wa_mod.flex_kernel_options()
    # LOMAR_FLEX_OPTIONS: any other kernel options, over LOMAR_FLEX_BLOCK's
    monkeypatch.setenv(wa_mod.FLEX_BLOCK_ENV, "32")
    monkeypatch.setenv(wa_mod.FLEX_OPTIONS_ENV, '{"WRITE_DQ": false, "fwd_BLOCK_M": 64, "num_warps": 4}')
    opts = wa_mod.flex_kernel_options()
    assert opts["WRITE_DQ"] is False and opts["fwd_BLOCK_M"] == 64 and opts["num_warps"] == 4
    assert opts["bwd_BLOCK_M1"] == 32 and opts["FORCE_USE_FLEX_ATTENTION"] is True
    monkeypatch.setenv(wa_mod.FLEX_OPTIONS_ENV, '{"BACKEND": "TRITON"}')  # the newer choice replaces the older
    opts = wa_mod.flex_kernel_options()
    assert opts["BACKEND"] == "TRITON" and "FORCE_USE_FLEX_ATTENTION" not in opts
    for bad, match in (("{WRITE_DQ: 0}", "LOMAR_FLEX_OPTIONS is not JSON"),
                       ("[1, 2]", "LOMAR_FLEX_OPTIONS='\\[1, 2\\]' must be a JSON object"),
                       ('{"num_warps": [4]}', "integer, boolean or string values")):
        monkeypatch.setenv(wa_mod.FLEX_OPTIONS_ENV, bad)
        with pytest.raises(ValueError, match=match):
            wa_mod.flex_kernel_options()


def test_math_path_compiles_without_graph_breaks_and_under_autocast():
    """Compiled (inductor, CPU), an attention block on the math path is one graph whose values and
    gradients equal eager's; under bf16 autocast it stays close to the fp32 block."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    attn = Attention(64, 4, rpe=True)
    with torch.no_grad():
        attn.rpe_k.lookup_table_weight.normal_(0, 0.3)
    buckets = window_buckets(5)
    x = torch.randn(6, 26, 64, requires_grad=True)
    old = os.environ.get(wa_mod.ATTN_PATH_ENV)
    os.environ[wa_mod.ATTN_PATH_ENV] = "math"
    try:
        want = attn(x, buckets)
        g_want = torch.autograd.grad(want.square().sum(), (x, *attn.parameters()))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(attn, fullgraph=True, dynamic=False)
        got = compiled(x, buckets)
        g_got = torch.autograd.grad(got.square().sum(), (x, *attn.parameters()))
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x, buckets)
        assert low.dtype == torch.bfloat16 and rel_err(low, want) < 3e-2
    finally:
        torch._dynamo.reset()
        if old is None:
            os.environ.pop(wa_mod.ATTN_PATH_ENV)
        else:
            os.environ[wa_mod.ATTN_PATH_ENV] = old


@pytest.mark.slow  # starts fresh interpreters or a benchmark
def test_modules_import_without_cupy_and_without_a_loop():
    """Importing the CUDA wrappers (all three kernels') pulls in neither CuPy nor the owner; the owner and the
    model import without CuPy (the owner imports the wrapper only when it launches the kernel)."""
    code = (
        "import sys\n"
        "import lomar_fast.ops._window_attention_cuda, lomar_fast.ops._irpe_cuda, lomar_fast.ops._window_gather_cuda\n"
        "assert 'lomar_fast.ops.window_attention' not in sys.modules, 'the CUDA wrapper imports the owner'\n"
        "import lomar_fast.ops.window_attention, lomar_fast.models.vit\n"
        "assert 'cupy' not in sys.modules, 'cupy imported at module import'\n"
        # the owner imports the wrapper only inside the function that launches the kernel; the wrapper never
        # imports the owner (parsed here, in a fresh interpreter: CPython 3.11.7's ast.parse can fail with
        # 'AST constructor recursion depth mismatch' in a process where a RecursionError happened before)
        "import ast, pathlib\n"
        "owner = ast.parse(pathlib.Path(lomar_fast.ops.window_attention.__file__).read_text())\n"
        "top = {a.name for n in owner.body if isinstance(n, ast.ImportFrom) for a in n.names}\n"
        "top |= {n.module for n in owner.body if isinstance(n, ast.ImportFrom) and n.module}\n"
        "assert not any('_window_attention_cuda' in t for t in top), top\n"
        "wrapper = ast.parse(pathlib.Path(lomar_fast.ops._window_attention_cuda.__file__).read_text())\n"
        "mods = {n.module for n in ast.walk(wrapper) if isinstance(n, ast.ImportFrom) and n.module}\n"
        "assert not mods & {'window_attention', 'lomar_fast.ops.window_attention'}, mods\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------
# compile checks (CPU): nvcc (to PTX) and NVRTC (to code: its log holds ptxas's warnings), sm_80 and sm_90,
# started together in the background
# ---------------------------------------------------------------------------------------------
# Run in a separate process (so the two architectures and nvcc compile in parallel): argv is a JSON file
# with the source, the name expressions and the options; prints a JSON result.
_NVRTC_SCRIPT = r"""
import json, sys
from cuda.bindings import nvrtc

job = json.load(open(sys.argv[1]))
ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
err, prog = nvrtc.nvrtcCreateProgram(job["source"].encode(), job["filename"].encode(), 0, [], [])
assert err == ok, err
for name in job["names"]:
    (err,) = nvrtc.nvrtcAddNameExpression(prog, name.encode())
    assert err == ok, (name, err)
opts = [o.encode() for o in job["options"]]
(status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
err, size = nvrtc.nvrtcGetProgramLogSize(prog)
log = bytearray(size)  # a mutable buffer NVRTC writes into
nvrtc.nvrtcGetProgramLog(prog, log)
log = bytes(log)
lowered = {}
if status == ok:
    for name in job["names"]:
        err, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
        lowered[name] = low.decode() if err == ok else None
print(json.dumps({"ok": status == ok, "log": log.rstrip(b"\x00 ").decode(errors="replace"), "lowered": lowered}))
"""

_JOBS: dict[str, subprocess.Popen | None] = {}


def _start_compiles(workdir: Path) -> None:
    nvcc = shutil.which("nvcc")
    src = str(cb.cuda_source_path(wac.SOURCE))
    for arch in ARCHS:
        _JOBS[f"nvcc{arch}"] = None if nvcc is None else subprocess.Popen(
            nvcc_check(nvcc, src, (arch,)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import importlib.util

    has_nvrtc = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None
    for arch in ARCHS:
        job = workdir / f"nvrtc{arch}.json"
        # the runtime's source and options; CuPy appends -ftz=true and the architecture
        job.write_text(json.dumps({
            "source": cb.runtime_source(wac.SOURCE), "filename": wac.SOURCE, "names": list(wac.NAME_EXPRESSIONS),
            "options": [*cb.NVRTC_OPTIONS, "-ftz=true", f"--gpu-architecture=sm_{arch}"],
        }))
        _JOBS[f"nvrtc{arch}"] = None if not has_nvrtc else subprocess.Popen(
            [sys.executable, "-c", _NVRTC_SCRIPT, str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)


@pytest.fixture(scope="module", autouse=True)
def _compile_in_background(request, tmp_path_factory):
    """Start the compiler checks when the module starts (they run while the other tests do), if any
    selected test needs them. Under pytest-xdist each worker collects every test but runs only some: there the
    first test that needs them starts them, on the one worker that runs them all (their xdist group)."""
    if not hasattr(request.config, "workerinput") and any(
            "compile_job" in getattr(item, "fixturenames", ()) for item in request.session.items):
        _start_compiles(tmp_path_factory.mktemp("nvrtc"))
    yield
    for proc in _JOBS.values():
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
    _JOBS.clear()


@pytest.fixture
def compile_job(request, tmp_path_factory):
    """(returncode, stdout, stderr) of the background compile job named by the (indirect) parameter."""
    name = request.param
    if not _JOBS:
        _start_compiles(tmp_path_factory.mktemp("nvrtc"))
    proc = _JOBS.get(name)
    if proc is None:
        missing_toolchain("nvcc not found on PATH" if name.startswith("nvcc") else "cuda-python (cuda.bindings) missing")
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


# ---------------------------------------------------------------------------------------------
# CPU emulation of the kernels
# ---------------------------------------------------------------------------------------------
_EMU_ENTRY = r"""
#define WA_EMU_DISPATCH1(D, TC, CALL) \
  switch (D) { case 32: CALL(32, TC); break; case 64: CALL(64, TC); break; case 80: CALL(80, TC); break; \
               case 128: CALL(128, TC); break; default: break; }
#define WA_EMU_DISPATCH(D, CALL) if (tc) { WA_EMU_DISPATCH1(D, true, CALL) } else { WA_EMU_DISPATCH1(D, false, CALL) }
extern "C" {
int wa_fwd_bytes(int L, int NB, int D) { return wa_ns::wa_fwd_shared_bytes(L, NB, D); }
int wa_bwd_bytes(int L, int NB, int D) { return wa_ns::wa_bwd_shared_bytes(L, NB, D); }
void wa_fwd(int D, int tc, const void* q, const long long* qs, const void* k, const long long* ks, const void* v,
            const long long* vs, const float* table, const long long* bk, void* out, const long long* os, float* lse,
            int H, int L, int NB, long long NP, float scale, int dtype, int vec, int grid) {
#define WA_FWD(DD, TC) emu_launch(grid, 256, [&] { wa_ns::window_attention_fwd<DD, TC>(q, qs[0], qs[1], qs[2], k, ks[0], \
      ks[1], ks[2], v, vs[0], vs[1], vs[2], table, bk, out, os[0], os[1], os[2], lse, H, L, NB, NP, scale, dtype, vec); })
  WA_EMU_DISPATCH(D, WA_FWD)
}
void wa_bwd(int D, int tc, const void* q, const long long* qs, const void* k, const long long* ks, const void* v,
            const long long* vs, const void* o, const long long* os, const void* go, const long long* gos,
            const float* lse, const float* table, const long long* bk, void* dq, void* dk, void* dv,
            const long long* gs, float* part, int H, int L, int NB, long long NP, float scale, int dtype, int vec,
            int grid) {
#define WA_BWD(DD, TC) emu_launch(grid, 256, [&] { wa_ns::window_attention_bwd<DD, TC>(q, qs[0], qs[1], qs[2], k, ks[0], \
      ks[1], ks[2], v, vs[0], vs[1], vs[2], o, os[0], os[1], os[2], go, gos[0], gos[1], gos[2], lse, table, bk, \
      dq, dk, dv, gs[0], gs[1], gs[2], part, H, L, NB, NP, scale, dtype, vec); })
  WA_EMU_DISPATCH(D, WA_BWD)
}
void wa_reduce(const float* part, float* out, int parts, int count) {
  emu_launch((count + 255) / 256, 256, [&] { wa_ns::window_attention_dtable_reduce(part, out, parts, count); });
}
// the kernels' own parameter lists, for launches made by the Python wrapper
typedef long long ll;
void wa_fwd_launch(int D, int tc, int grid, int block, const void* q, ll a0, ll a1, ll a2, const void* k, ll b0, ll b1, ll b2,
                   const void* v, ll c0, ll c1, ll c2, const float* table, const ll* bk, void* out, ll o0, ll o1,
                   ll o2, float* lse, int H, int L, int NB, ll NP, float scale, int dtype, int vec) {
#define WA_FWDL(DD, TC) emu_launch(grid, block, [&] { wa_ns::window_attention_fwd<DD, TC>(q, a0, a1, a2, k, b0, b1, b2, v, \
      c0, c1, c2, table, bk, out, o0, o1, o2, lse, H, L, NB, NP, scale, dtype, vec); })
  WA_EMU_DISPATCH(D, WA_FWDL)
}
void wa_bwd_launch(int D, int tc, int grid, int block, const void* q, ll a0, ll a1, ll a2, const void* k, ll b0, ll b1, ll b2,
                   const void* v, ll c0, ll c1, ll c2, const void* o, ll o0, ll o1, ll o2, const void* go, ll g0,
                   ll g1, ll g2, const float* lse, const float* table, const ll* bk, void* dq, void* dk, void* dv,
                   ll s0, ll s1, ll s2, float* part, int H, int L, int NB, ll NP, float scale, int dtype, int vec) {
#define WA_BWDL(DD, TC) emu_launch(grid, block, [&] { wa_ns::window_attention_bwd<DD, TC>(q, a0, a1, a2, k, b0, b1, b2, v, \
      c0, c1, c2, o, o0, o1, o2, go, g0, g1, g2, lse, table, bk, dq, dk, dv, s0, s1, s2, part, H, L, NB, NP, scale, \
      dtype, vec); })
  WA_EMU_DISPATCH(D, WA_BWDL)
}
void wa_reduce_launch(int D, int tc, int grid, int block, const float* part, float* out, int parts, int count) {
  (void)D; (void)tc;
  emu_launch(grid, block, [&] { wa_ns::window_attention_dtable_reduce(part, out, parts, count); });
}
// the warp-tiled kernels (bf16 only: the 16-bit pointers as the kernels take them)
typedef const unsigned short* cbf;
int wm_fwd_bytes(int L, int NB, int D) { return wa_ns::wm_fwd_shared_bytes(L, NB, D); }
int wm_bwd_bytes(int L, int NB, int D) { return wa_ns::wm_bwd_shared_bytes(L, NB, D); }
#define WM_EMU_DISPATCH(D, CALL) \
  switch (D) { case 32: CALL(32); break; case 64: CALL(64); break; case 80: CALL(80); break; \
               case 128: CALL(128); break; default: break; }
void wm_fwd_launch(int D, int tc, int grid, int block, const void* q, ll a0, ll a1, ll a2, const void* k, ll b0, ll b1,
                   ll b2, const void* v, ll c0, ll c1, ll c2, const float* table, const ll* bk, void* out, ll o0, ll o1,
                   ll o2, float* lse, int H, int L, int NB, ll NP, float scale) {
  (void)tc;
#define WM_FWDL(DD) emu_launch(grid, block, [&] { wa_ns::window_attention_mma_fwd<DD>((cbf)q, a0, a1, a2, (cbf)k, b0, b1, \
      b2, (cbf)v, c0, c1, c2, table, bk, (unsigned short*)out, o0, o1, o2, lse, H, L, NB, NP, scale); })
  WM_EMU_DISPATCH(D, WM_FWDL)
}
void wm_bwd_launch(int D, int tc, int grid, int block, const void* q, ll a0, ll a1, ll a2, const void* k, ll b0, ll b1,
                   ll b2, const void* v, ll c0, ll c1, ll c2, const void* o, ll o0, ll o1, ll o2, const void* go, ll g0,
                   ll g1, ll g2, const float* lse, const float* table, const ll* bk, void* dq, void* dk, void* dv,
                   ll s0, ll s1, ll s2, float* part, int H, int L, int NB, ll NP, float scale) {
  (void)tc;
#define WM_BWDL(DD) emu_launch(grid, block, [&] { wa_ns::window_attention_mma_bwd<DD>((cbf)q, a0, a1, a2, (cbf)k, b0, b1, \
      b2, (cbf)v, c0, c1, c2, (cbf)o, o0, o1, o2, (cbf)go, g0, g1, g2, lse, table, bk, (unsigned short*)dq, \
      (unsigned short*)dk, (unsigned short*)dv, s0, s1, s2, part, H, L, NB, NP, scale); })
  WM_EMU_DISPATCH(D, WM_BWDL)
}
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_library(emulation_source(((wac.SOURCE, "wa_ns"),), _EMU_ENTRY), tmp_path_factory.mktemp("wa_emu"))


def test_shared_memory_formula_matches_kernel_layout(emu):
    for length in (1, 2, 5, 17, 26, 37, 50, 63, 64):
        for nb in (1, 7, 13, 50, 64):
            for d in wac.HEAD_DIMS:
                assert wac.shared_bytes("fwd", length, nb, d) == emu.wa_fwd_bytes(length, nb, d)
                assert wac.shared_bytes("bwd", length, nb, d) == emu.wa_bwd_bytes(length, nb, d)
    # ViT-B (L = 50, NB = 50, D = 64): both kernels fit one SM of an A100 / H100 (opt-in limits)
    assert wac.shared_bytes("fwd", 50, 50, 64) < 64 * 1024
    assert wac.shared_bytes("bwd", 50, 50, 64) < 110 * 1024
    assert wac.shared_bytes("bwd", 64, 64, 128) <= 227 * 1024


def _strides(t: torch.Tensor):
    return torch.tensor(t.stride()[:3], dtype=torch.long)


def _emulate(emu, q, k, v, table, buckets, scale, go, fwd_grid, bwd_grid, tc=False):
    """Run the emulated forward, backward and dT reduction (``tc``: the tensor-core kernels); returns out, lse,
    dq, dk, dv, dtable."""
    n, h, length, d = q.shape
    nb = table.shape[1]
    dtype = wac.DTYPE_CODES[q.dtype]
    vec = int(wac._aligned(q, k, v, go))
    assert wac.shared_bytes("bwd", length, nb, d) <= SHARED_BYTES
    table_f = table.float().contiguous()
    out = torch.full((n, length, h, d), 7.0).to(q.dtype).transpose(1, 2)
    lse = torch.full((n, h, length), 7.0)
    sq, sk, sv, so = _strides(q), _strides(k), _strides(v), _strides(out)
    emu.wa_fwd(*c_args(d, int(tc), q, sq, k, sk, v, sv, table_f, buckets, out, so, lse, h, length, nb, ("ll", n * h),
                       float(scale), dtype, vec, fwd_grid))
    dq, dk, dv = (torch.full((n, length, h, d), 5.0).to(q.dtype).transpose(1, 2) for _ in range(3))
    part = torch.full((bwd_grid, d, nb), 3.0)
    sgo, sdq = _strides(go), _strides(dq)  # alive until the call returns
    emu.wa_bwd(*c_args(d, int(tc), q, sq, k, sk, v, sv, out, so, go, sgo, lse, table_f, buckets, dq, dk, dv, sdq, part, h,
                       length, nb, ("ll", n * h), float(scale), dtype, vec, bwd_grid))
    dtable = torch.full((d, nb), 9.0)
    emu.wa_reduce(*c_args(part, dtable, bwd_grid, d * nb))
    return out, lse, dq, dk, dv, dtable


EMU_CASES = [
    # (N, H, side or L, D, NB, dtype, aligned, fwd grid, bwd grid, tensor cores)
    (2, 3, 4, 32, 50, torch.float32, True, 2, 4, False),  # L = 17, 3 pairs per forward block
    (1, 3, 26, 80, 13, torch.float32, False, 1, 2, False),  # random buckets, NB = 13, scalar loads
    (1, 3, 7, 64, 50, torch.bfloat16, True, 2, 2, False),  # L = 50, the LoMaR window
    (1, 3, 7, 64, 50, torch.bfloat16, True, 2, 2, True),  # the same on tensor cores (mma.sync emulated)
    (2, 3, 4, 32, 50, torch.bfloat16, False, 2, 4, True),  # L = 17: one 16-row strip and a 1-row one
    (1, 2, 37, 80, 13, torch.bfloat16, True, 1, 2, True),  # L = 37, NB = 13: padded k-steps, 5 k-steps of D
    (1, 2, 7, 64, 50, torch.float16, True, 2, 2, False),  # fp16 (its conversions in host _Float16)
    (1, 2, 26, 80, 13, torch.float16, False, 1, 2, False),
    (1, 2, 64, 128, 64, torch.float32, True, 1, 2, False),  # head_dim 128 (8 rows a thread), the largest L and NB
    (1, 2, 64, 128, 64, torch.bfloat16, True, 1, 2, True),  # the same on tensor cores
    (1, 2, 33, 80, 64, torch.bfloat16, False, 1, 1, True),  # odd L, scalar loads, one block for every pair
    (1, 2, 63, 128, 61, torch.float32, False, 1, 1, False),
]


@pytest.mark.parametrize("n,h,side,d,nb,dtype,aligned,fwd_grid,bwd_grid,tc", EMU_CASES)
def test_emulated_kernels_match_reference(emu, n, h, side, d, nb, dtype, aligned, fwd_grid, bwd_grid, tc):
    torch.manual_seed(0)
    if nb == 50:
        buckets = window_buckets(side)
    else:
        buckets = torch.randint(0, nb, (side, side))
    length = buckets.shape[0]
    if aligned:  # fused-qkv views
        q, k, v = torch.randn(n, length, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
        assert wac._aligned(q, k, v)
    else:  # the same, shifted by one element: rows are not 16-byte aligned (element-wise loads)
        q, k, v = torch.randn(n, length, 3, h, d + 1).to(dtype)[..., 1:].permute(2, 0, 3, 1, 4).unbind(0)
        assert not wac._aligned(q, k, v)
    table = random_table(d, nb)
    scale = d**-0.5
    go = torch.randn(n, length, h, d).to(dtype).transpose(1, 2)  # the gradient of a (N, L, H*D) view
    out, lse, dq, dk, dv, dtable = _emulate(emu, q, k, v, table, buckets, scale, go, fwd_grid, bwd_grid, tc)

    want, want_lse = brute_force(q, k, v, table, buckets, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, want) <= tol, rel_err(out, want)
    # tensor cores round the table to bf16 in q T (as autocast rounds it for the PyTorch path)
    assert rel_err(lse, want_lse) <= (4e-3 if tc else 1e-5)
    # gradients: float64 formulas from the same inputs, the kernel's saved out and lse
    got = dict(q=dq, k=dk, v=dv, table=dtable)
    ref = wac._backward_torch(go.double(), q.double(), k.double(), v.double(), out.double(), lse.double(),
                              table.double(), buckets, scale)
    for (name, a), b in zip(got.items(), ref):
        assert a.dtype == (torch.float32 if name == "table" else dtype)
        assert rel_err(a, b) <= (2e-5 if dtype == torch.float32 else 2e-2), (name, rel_err(a, b))
    # and against autograd through the reference
    _, truth = truth_grads(q, k, v, table, buckets, scale, go)
    for (name, a), b in zip(got.items(), truth):
        assert rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 2e-2), (name, rel_err(a, b))


@pytest.mark.parametrize("tc", [False, True])
def test_emulated_kernel_bad_bucket_gives_nan_rows(emu, tc):
    """A bucket id outside [0, NB) poisons its query row only (the Python side documents it)."""
    buckets = window_buckets(3)
    buckets[4, 2] = 50
    dtype = torch.bfloat16 if tc else torch.float32
    q, k, v = (x.to(dtype).contiguous() for x in qkv_views(1, 3, 10, 32))
    go = torch.randn(1, 3, 10, 32).to(dtype)
    out = _emulate(emu, q, k, v, random_table(32), buckets, 0.2, go, 1, 1, tc)[0]
    assert bool(out[:, :, 4].isnan().all())
    assert bool(out[:, :, [0, 1, 2, 3, 5, 6, 7, 8, 9]].isfinite().all())


def _emulated_launcher(emu, launches):
    """A stand-in for ``_cuda_build.launch`` that runs the named kernel in the emulation, with the argument
    tuple exactly as the wrapper built it (numpy scalars of the C++ parameter widths)."""
    import ctypes

    import numpy as np

    def convert(a):
        if isinstance(a, np.uint64):
            return ctypes.c_void_p(int(a))
        if isinstance(a, np.int64):
            return ctypes.c_longlong(int(a))
        if isinstance(a, np.int32):
            return ctypes.c_int(int(a))
        if isinstance(a, np.float32):
            return ctypes.c_float(float(a))
        raise TypeError(f"kernel argument of unexpected type {type(a)}")

    entries = {"window_attention_fwd": emu.wa_fwd_launch, "window_attention_bwd": emu.wa_bwd_launch,
               "window_attention_mma_fwd": emu.wm_fwd_launch, "window_attention_mma_bwd": emu.wm_bwd_launch,
               "window_attention_dtable_reduce": emu.wa_reduce_launch}

    def launch(filename, names, kernel, device, grid, block, args, shared_mem=0, options=()):
        assert filename == wac.SOURCE and kernel in names and options == wac.module_options()
        assert shared_mem <= SHARED_BYTES
        base, _, rest = kernel.partition("<")
        d, _, tc = rest[:-1].partition(", ")
        launches.append((kernel, grid, block, shared_mem, args))
        entries[base](ctypes.c_int(int(d or 0)), ctypes.c_int(int(tc == "true")), ctypes.c_int(grid),
                      ctypes.c_int(block), *map(convert, args))

    return launch


@pytest.mark.parametrize("length,d,dtype,aligned,tc", [(17, 32, torch.float32, True, False),
                                                       (26, 64, torch.bfloat16, False, True),
                                                       (26, 64, torch.bfloat16, True, False)])
def test_wrapper_launches_match_reference_in_emulation(emu, monkeypatch, length, d, dtype, aligned, tc):
    """The CUDA wrapper's launches (kernel choice, argument order and widths, strides, dtype code, 16-byte
    flag, shared memory, dT partials and their reduction) run through the emulated kernels on CPU tensors, as on
    a GPU, through the registered autograd: values and gradients match the reference. bf16 takes the
    tensor-core kernels unless LOMAR_WA_TENSOR_CORES=0."""
    if dtype == torch.bfloat16 and not tc:
        monkeypatch.setenv(wac.TENSOR_CORES_ENV, "0")
    launches = []
    monkeypatch.setattr(cb, "launch", _emulated_launcher(emu, launches))
    monkeypatch.setattr(wac, "_kernel_ok",
                        lambda kind, q, table, mma=False: wac.kernel_supports(q, table) and q.numel() > 0)
    monkeypatch.setattr(wac, "_prepare", lambda kernel, device, shared: None)
    monkeypatch.setattr(wac, "_grid", lambda kernel, device, shared, pairs, threads=wac.THREADS: min(pairs, 2))
    torch.manual_seed(0)
    buckets = window_buckets({17: 4, 26: 5}[length])
    big = torch.randn(3, length, 3, 3, d + (0 if aligned else 1)).to(dtype)
    q, k, v = (x.detach().requires_grad_(True) for x in big[..., -d:].permute(2, 0, 3, 1, 4).unbind(0))
    assert wac._aligned(q, k, v) is aligned
    table = random_table(d).requires_grad_(True)
    out = wac.window_attention(q, k, v, table, buckets, 0.2)
    go = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v, table), go)
    assert [name for name, *_ in launches] == [wac.kernel_name("fwd", d, tc), wac.kernel_name("bwd", d, tc),
                                               "window_attention_dtable_reduce"]
    assert all(name in wac.NAME_EXPRESSIONS for name, *_ in launches)
    assert launches[0][3] == wac.shared_bytes("fwd", length, 50, d) and launches[0][1:3] == (2, wac.THREADS)
    assert launches[1][3] == wac.shared_bytes("bwd", length, 50, d) and launches[1][1:3] == (2, wac.THREADS)
    # 16-byte loads only where every row is 16-byte aligned (the emulation would not notice: x86 does not trap)
    assert int(launches[0][4][-1]) == int(launches[1][4][-1]) == int(aligned)
    want, truth = truth_grads(q, k, v, table, buckets, 0.2, go)
    tol_out, tol_grad = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 2e-2)
    assert rel_err(out, want) <= tol_out
    for name, a, b in zip("q k v table".split(), grads, truth):
        assert a.dtype == (torch.float32 if name == "table" else dtype)
        assert rel_err(a, b) <= tol_grad, (name, rel_err(a, b))


# ---------------------------------------------------------------------------------------------
# the warp-tiled kernels ($LOMAR_WA_KERNEL=mma), emulated through the wrapper's own launches
# ---------------------------------------------------------------------------------------------
def _mma_forward_min_blocks(arch: int, options: tuple[str, ...]) -> dict[int, int]:
    """head_dim -> the ``.minnctapersm`` (launch-bounds blocks per SM) of the warp-tiled forward in the PTX NVRTC
    makes of the runtime source with ``options`` for ``compute_{arch}`` (no instantiation but the four)."""
    import re

    names = [wac.mma_kernel_name("fwd", d) for d in wac.HEAD_DIMS]
    ok, log, lowered, ptx = nvrtc_compile(cb.runtime_source(wac.SOURCE), wac.SOURCE, names,
                                          (*cb.NVRTC_OPTIONS, *options, f"--gpu-architecture=compute_{arch}"), ptx=True)
    assert ok, log
    blocks = {}
    for d, name in zip(wac.HEAD_DIMS, names):
        entry = ptx[ptx.index(f".entry {lowered[name].decode()}("):]
        blocks[d] = int(re.search(r"\.minnctapersm (\d+)", entry[:entry.index("{")]).group(1))
    return blocks


def test_forward_blocks_setting_reaches_the_mma_forwards_launch_bounds(monkeypatch):
    """$LOMAR_WM_FWD_BLOCKS becomes -DWM_FWD_BLOCKS=N for the module, and the source takes it in place of its
    per-architecture default: the head_dim <= 64 forwards ask for N blocks per SM (so for N's register cap),
    the others keep 2. A bad value is one error naming the variable."""
    monkeypatch.delenv(wac.FWD_BLOCKS_ENV, raising=False)
    assert wac.module_options() == ()
    assert _mma_forward_min_blocks(90, ()) == {32: 4, 64: 4, 80: 2, 128: 2}
    assert _mma_forward_min_blocks(80, ()) == {32: 3, 64: 3, 80: 2, 128: 2}
    monkeypatch.setenv(wac.FWD_BLOCKS_ENV, " 3 ")
    assert wac.module_options() == ("-DWM_FWD_BLOCKS=3",)
    assert _mma_forward_min_blocks(90, wac.module_options()) == {32: 3, 64: 3, 80: 2, 128: 2}
    monkeypatch.setenv(wac.FWD_BLOCKS_ENV, "2")
    assert _mma_forward_min_blocks(80, wac.module_options()) == {32: 2, 64: 2, 80: 2, 128: 2}
    for bad in ("0", "5", "four", "3.0"):
        monkeypatch.setenv(wac.FWD_BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match=f"{wac.FWD_BLOCKS_ENV}={bad!r} must be one of 1, 2, 3, 4"):
            wac.module_options()


def test_every_launch_and_occupancy_query_uses_the_modules_options(monkeypatch):
    """The wrapper launches with the options of $LOMAR_WM_FWD_BLOCKS (a module of its own), and keeps the
    shared-memory opt-in and the blocks-per-SM count per module: a function of another module has neither."""
    import contextlib
    import types

    launches = []
    monkeypatch.setattr(cb, "launch", lambda *a, options=(), **k: launches.append(options))
    monkeypatch.setattr(wac, "_kernel_ok", lambda kind, q, table, mma=False: True)
    monkeypatch.setattr(wac, "_prepare", lambda kernel, device, shared: None)
    monkeypatch.setattr(wac, "_grid", lambda kernel, device, shared, pairs, threads=wac.THREADS: 1)
    q, k, v = torch.randn(3, 1, 2, 5, 32).unbind(0)
    for value, want in ((None, ()), ("3", ("-DWM_FWD_BLOCKS=3",))):
        if value is None:
            monkeypatch.delenv(wac.FWD_BLOCKS_ENV, raising=False)
        else:
            monkeypatch.setenv(wac.FWD_BLOCKS_ENV, value)
        launches.clear()
        wac.window_attention(q, k, v, random_table(32), window_buckets(2)[:5, :5], 0.2)
        assert launches == [want]
    monkeypatch.undo()

    # the opt-in and the occupancy query, against a stand-in CuPy whose modules' functions report 4 blocks per
    # SM (built with no option) or 3 (built with -DWM_FWD_BLOCKS=3)
    functions = {}

    def function(kernel, device):
        opts = wac.module_options()
        return functions.setdefault((kernel, opts), types.SimpleNamespace(
            kernel=types.SimpleNamespace(ptr=3 if opts else 4), max_dynamic_shared_size_bytes=0))

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda index: contextlib.nullcontext(),
        driver=types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=lambda ptr, threads, shared: ptr)))
    monkeypatch.setattr(wac, "_function", function)
    monkeypatch.setattr(cb, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cb, "sm_count", lambda device: 10)
    monkeypatch.setattr(wac, "_shared_set", {})
    monkeypatch.setattr(wac, "_blocks_per_sm", {})
    name, dev, shared = wac.mma_kernel_name("fwd", 64), torch.device("cuda", 0), 60_000
    for value, per_sm in ((None, 4), ("3", 3), (None, 4)):
        if value is None:
            monkeypatch.delenv(wac.FWD_BLOCKS_ENV, raising=False)
        else:
            monkeypatch.setenv(wac.FWD_BLOCKS_ENV, value)
        assert wac._grid(name, dev, shared, 1000, wac.MMA_THREADS) == per_sm * 10
    assert {key: f.max_dynamic_shared_size_bytes for key, f in functions.items()} == {
        (name, ()): shared, (name, ("-DWM_FWD_BLOCKS=3",)): shared}


def test_mma_shared_memory_formula_matches_kernel(emu):
    for length in (1, 5, 17, 50, 63, 64):
        for nb in (1, 13, 50, 64):
            for d in wac.HEAD_DIMS:
                assert wac.mma_shared_bytes("fwd", length, nb, d) == emu.wm_fwd_bytes(length, nb, d)
                assert wac.mma_shared_bytes("bwd", length, nb, d) == emu.wm_bwd_bytes(length, nb, d)
    # the largest case fits the opt-in limit of an A100 (163 KB) and of an H100 (227 KB)
    assert wac.mma_shared_bytes("bwd", 64, 64, 128) <= 163 * 1024
    # ViT-B: 4 forward and 2 backward blocks fit one SM of an H100 (228 KB, 1 KB reserved per block)
    assert 4 * (wac.mma_shared_bytes("fwd", 50, 50, 64) + 1024) <= 228 * 1024
    assert 2 * (wac.mma_shared_bytes("bwd", 50, 50, 64) + 1024) <= 228 * 1024


def _run_wrapper_emulated(emu, monkeypatch, q, k, v, table, buckets, scale, go, grid):
    """window_attention through the CUDA wrapper, its launches run in the emulation with ``grid`` blocks;
    returns (out, (dq, dk, dv, dtable), the launched kernel names)."""
    launches = []
    monkeypatch.setattr(cb, "launch", _emulated_launcher(emu, launches))
    monkeypatch.setattr(wac, "_kernel_ok",
                        lambda kind, q, table, mma=False: wac.kernel_supports(q, table) and q.numel() > 0)
    monkeypatch.setattr(wac, "_prepare", lambda kernel, device, shared: None)
    monkeypatch.setattr(wac, "_grid", lambda kernel, device, shared, pairs, threads=wac.THREADS: min(pairs, grid))
    q, k, v, table = (x.detach().requires_grad_(True) for x in (q, k, v, table))
    out = wac.window_attention(q, k, v, table, buckets, scale)
    grads = torch.autograd.grad(out, (q, k, v, table), go)
    for name, grid_, block, shared, _ in launches[:2]:
        assert block == (wac.MMA_THREADS if "_mma_" in name else wac.THREADS)
        kind = "fwd" if "fwd" in name else "bwd"
        size = wac.mma_shared_bytes if "_mma_" in name else wac.shared_bytes
        assert shared == size(kind, q.shape[-2], table.shape[-1], q.shape[-1]) and grid_ == min(grid, q.shape[0] * q.shape[1])
    return out, grads, [name for name, *_ in launches]


MMA_CASES = [  # few pairs each: the emulated collectives (ldmatrix, mma.sync) are slow on a CPU
    # (N, H, side or L, D, NB, blocks)
    (1, 3, 7, 64, 50, 2),  # L = 50, the LoMaR window: 4 strips, the last with 2 rows; 2 pairs in the first block
    (1, 3, 4, 32, 50, 1),  # L = 17: a 1-row strip, NB > L; every pair in one block
    (1, 2, 37, 80, 13, 2),  # random buckets, NB = 13 (one bucket pair), 5 k-steps of D
    (1, 2, 64, 128, 64, 1),  # the largest L and NB, head_dim 128, both pairs in one block
    (1, 2, 5, 32, 7, 2),  # L = 5: one strip, most of it padding
    (1, 3, 33, 64, 61, 2),  # odd L, NB = 61
]


@pytest.mark.parametrize("n,h,side,d,nb,blocks", MMA_CASES)
def test_emulated_mma_kernels_match_reference(emu, monkeypatch, n, h, side, d, nb, blocks):
    """The warp-tiled kernels (ldmatrix and mma.sync emulated) through the wrapper's launches: values and
    gradients (dq, dk, dv, dT) against the float64 truth from the same bf16 inputs."""
    monkeypatch.setenv(wac.KERNEL_ENV, "mma")
    torch.manual_seed(side + d)
    buckets = window_buckets(side) if nb == 50 else torch.randint(0, nb, (side, side))
    length = buckets.shape[0]
    q, k, v = qkv_views(n, h, length, d, torch.bfloat16, seed=nb)
    table = random_table(d, nb)
    scale = d**-0.5
    go = torch.randn(n, length, h, d).to(torch.bfloat16).transpose(1, 2)
    out, grads, names = _run_wrapper_emulated(emu, monkeypatch, q, k, v, table, buckets, scale, go, blocks)
    assert names == [wac.mma_kernel_name("fwd", d), wac.mma_kernel_name("bwd", d), "window_attention_dtable_reduce"]
    want, truth = truth_grads(q, k, v, table, buckets, scale, go)
    assert out.dtype == torch.bfloat16 and rel_err(out, want) <= 1e-2, rel_err(out, want)
    for name, a, b in zip("q k v table".split(), grads, truth):
        assert a.dtype == (torch.float32 if name == "table" else torch.bfloat16)
        assert rel_err(a, b) <= 2e-2, (name, rel_err(a, b))


def test_emulated_mma_lse_and_bad_bucket(emu, monkeypatch):
    """The saved lse is the logits' log-sum-exp (the backward recomputes P from it), and a bucket id outside
    [0, NB) poisons its query row only."""
    monkeypatch.setenv(wac.KERNEL_ENV, "mma")
    launches = []
    monkeypatch.setattr(cb, "launch", _emulated_launcher(emu, launches))
    monkeypatch.setattr(wac, "_kernel_ok", lambda kind, q, table, mma=False: True)
    monkeypatch.setattr(wac, "_prepare", lambda kernel, device, shared: None)
    monkeypatch.setattr(wac, "_grid", lambda kernel, device, shared, pairs, threads=wac.THREADS: 2)
    q, k, v = qkv_views(1, 2, 50, 64, torch.bfloat16, seed=3)
    table, buckets = random_table(64), window_buckets(7)
    out, lse = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, buckets, 0.125)
    assert launches[0][0] == wac.mma_kernel_name("fwd", 64)
    assert rel_err(lse, brute_force(q, k, v, table, buckets, 0.125)[1]) <= 4e-3
    bad = buckets.clone()
    bad[4, 2] = 50
    out = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, bad, 0.125)[0]
    assert bool(out[:, :, 4].isnan().all())
    assert bool(out[:, :, [i for i in range(50) if i != 4]].isfinite().all())


# ---------------------------------------------------------------------------------------------
# races and shared-memory bounds: the emulated kernels under ThreadSanitizer and AddressSanitizer
# ---------------------------------------------------------------------------------------------
_CHECK_ENTRY = r"""
#include <cstdio>
#include <random>
#include <string>
// one forward and backward on random bf16 inputs (the dT reduction shares no memory between threads): q, k, v packed as a qkv projection's
// (N, L, 3, H, D) output, dq, dk, dv into one such buffer; N = 1, H = 3 pairs over 2 blocks, so the first
// block runs two pairs and a barrier missing between them shows too
struct CheckIO {
  int D, L, NB, H = 3, grid = 2, shrink = 0;  // shrink: bytes of shared memory fewer than the forward asks for
  long long sn, sh, si, on, oh, oi;
  std::vector<unsigned short> qkv, o, go, dqkv;
  std::vector<float> table, lse, part;
  std::vector<long long> bk;
  CheckIO(int d, int l, int nb) : D(d), L(l), NB(nb) {
    std::mt19937 rng(d * 131 + l);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto bf = [&](float f) { unsigned u; std::memcpy(&u, &f, 4); return (unsigned short)(u >> 16); };
    qkv.resize((size_t)L * 3 * H * D); dqkv.resize(qkv.size()); o.resize((size_t)L * H * D); go.resize(o.size());
    for (auto& x : qkv) x = bf(nd(rng));
    for (auto& x : go) x = bf(nd(rng));
    table.resize((size_t)D * NB); for (auto& x : table) x = 0.3f * nd(rng);
    lse.resize((size_t)H * L); part.resize((size_t)grid * D * NB);
    bk.resize((size_t)L * L); for (auto& x : bk) x = rng() % NB;
    sn = (long long)L * 3 * H * D; sh = D; si = 3LL * H * D; on = (long long)L * H * D; oh = D; oi = (long long)H * D;
  }
  // NaN or infinite values among the outputs (out, lse, dq, dk, dv): a tile read before its copies landed
  int nonfinite() const {
    int bad = 0;
    for (unsigned short x : o) bad += (x & 0x7f80u) == 0x7f80u;
    for (unsigned short x : dqkv) bad += (x & 0x7f80u) == 0x7f80u;
    for (float x : lse) bad += !std::isfinite(x);
    return bad;
  }
  const unsigned short* q() const { return qkv.data(); }
  const unsigned short* k() const { return qkv.data() + H * D; }
  const unsigned short* v() const { return qkv.data() + 2 * H * D; }
};
#define CHECK_RUNNERS(NS)                                                                                          \
  template <int DD> void NS##_mma(CheckIO& x) {                                                                    \
    emu_launch_sized(x.grid, 128, NS::wm_fwd_shared_bytes(x.L, x.NB, DD) - x.shrink, [&] {                         \
        NS::window_attention_mma_fwd<DD>(x.q(), x.sn, x.sh, x.si, x.k(), x.sn, x.sh, x.si, \
        x.v(), x.sn, x.sh, x.si, x.table.data(), x.bk.data(), x.o.data(), x.on, x.oh, x.oi, x.lse.data(), x.H, x.L, \
        x.NB, x.H, 0.125f); });                                                                                   \
    emu_launch_sized(x.grid, 128, NS::wm_bwd_shared_bytes(x.L, x.NB, DD), [&] {                                   \
        NS::window_attention_mma_bwd<DD>(x.q(), x.sn, x.sh, x.si, x.k(), x.sn, x.sh, x.si, \
        x.v(), x.sn, x.sh, x.si, x.o.data(), x.on, x.oh, x.oi, x.go.data(), x.on, x.oh, x.oi, x.lse.data(),       \
        x.table.data(), x.bk.data(), x.dqkv.data(), x.dqkv.data() + x.H * DD, x.dqkv.data() + 2 * x.H * DD, x.sn,  \
        x.sh, x.si, x.part.data(), x.H, x.L, x.NB, x.H, 0.125f); });                                              \
  }                                                                                                               \
  template <int DD, bool TC> void NS##_tiles(CheckIO& x) {                                                         \
    emu_launch_sized(x.grid, 256, NS::wa_fwd_shared_bytes(x.L, x.NB, DD), [&] {                                   \
        NS::window_attention_fwd<DD, TC>(x.q(), x.sn, x.sh, x.si, x.k(), x.sn, x.sh,     \
        x.si, x.v(), x.sn, x.sh, x.si, x.table.data(), x.bk.data(), x.o.data(), x.on, x.oh, x.oi, x.lse.data(),    \
        x.H, x.L, x.NB, x.H, 0.125f, 1, 1); });                                                                   \
    emu_launch_sized(x.grid, 256, NS::wa_bwd_shared_bytes(x.L, x.NB, DD), [&] {                                   \
        NS::window_attention_bwd<DD, TC>(x.q(), x.sn, x.sh, x.si, x.k(), x.sn, x.sh,     \
        x.si, x.v(), x.sn, x.sh, x.si, x.o.data(), x.on, x.oh, x.oi, x.go.data(), x.on, x.oh, x.oi, x.lse.data(),  \
        x.table.data(), x.bk.data(), x.dqkv.data(), x.dqkv.data() + x.H * DD, x.dqkv.data() + 2 * x.H * DD, x.sn,  \
        x.sh, x.si, x.part.data(), x.H, x.L, x.NB, x.H, 0.125f, 1, 1); });                                        \
  }
CHECK_RUNNERS(wa_ns)
#ifdef CHECK_BROKEN
CHECK_RUNNERS(wa_cut)
CHECK_RUNNERS(wa_warp)
CHECK_RUNNERS(wa_nowait)
#endif
int main(int argc, char** argv) {
  std::string which = argc > 1 ? argv[1] : "";
  if (which == "kernels") {
    { CheckIO x(64, 50, 50); wa_ns_mma<64>(x); std::printf("mma 64 L=50: nonfinite %d\n", x.nonfinite()); }
    { CheckIO x(80, 37, 13); wa_ns_mma<80>(x); std::printf("mma 80 L=37: nonfinite %d\n", x.nonfinite()); }
    { CheckIO x(128, 64, 64); wa_ns_mma<128>(x); std::printf("mma 128 L=64: nonfinite %d\n", x.nonfinite()); }
    { CheckIO x(64, 50, 50); wa_ns_tiles<64, true>(x); std::printf("tiles 64 tc L=50: nonfinite %d\n", x.nonfinite()); }
    { CheckIO x(32, 17, 50); wa_ns_tiles<32, false>(x); std::printf("tiles 32 L=17: nonfinite %d\n", x.nonfinite()); }
#ifdef CHECK_BROKEN
  } else if (which == "cut") {
    CheckIO x(64, 50, 50); wa_cut_mma<64>(x); std::printf("cut mma 64 L=50\n");
  } else if (which == "warp") {
    CheckIO x(64, 50, 50); wa_warp_mma<64>(x); std::printf("warp mma 64 L=50\n");
  } else if (which == "nowait") {
    CheckIO x(64, 50, 50); wa_nowait_mma<64>(x); std::printf("nowait mma 64 L=50: nonfinite %d\n", x.nonfinite());
#endif
  } else if (which == "short") {
    CheckIO x(64, 50, 50); x.shrink = 16; wa_ns_mma<64>(x); std::printf("short mma 64 L=50\n");
  } else {
    return 2;
  }
  return 0;
}
"""


def _checked_build(tmp_path, sanitizer: str, broken: bool) -> Path:
    """The kernel-check driver (``_CHECK_ENTRY``) under ``sanitizer``: the runtime source as ``wa_ns``, and with
    ``broken`` two broken copies of it, ``wa_cut`` without the barrier that ends a pair in the warp-tiled forward
    and ``wa_warp`` without the __syncwarp between a warp's q T stores and its lanes' reads of them, ``wa_nowait``
    without the wait for the forward's asynchronous tile copies (cp.async)."""
    source = cb.cuda_source(wac.SOURCE)
    start = source.index("window_attention_mma_fwd(const unsigned short*")
    end = source.index("window_attention_mma_bwd(const unsigned short*")
    body = source[start:end]
    last = body.rindex("__syncthreads();")
    cut = source[:start] + body[:last] + body[last + len("__syncthreads();"):] + source[end:]
    logits = "    wm_syncwarp();\n    wm_logits(s, sqt, sbk, r0, L, scale);"
    assert source.count(logits) == 1
    warp = source.replace(logits, "    wm_logits(s, sqt, sbk, r0, L, scale);")
    copies = source[start:].index("        wm_copies_wait();\n") + start  # the forward's wait for its k, v tiles
    nowait = source[:copies] + source[copies + len("        wm_copies_wait();\n"):]
    sources = ((wac.SOURCE, "wa_ns"), (wac.SOURCE, "wa_cut", cut), (wac.SOURCE, "wa_warp", warp),
               (wac.SOURCE, "wa_nowait", nowait))[:4 if broken else 1]
    entry = ("#define CHECK_BROKEN 1\n" if broken else "") + _CHECK_ENTRY
    return build_sanitized(emulation_source(sources, entry), tmp_path, sanitizer)


@pytest.mark.slow  # a ThreadSanitizer build and run (about 25 s on 2 cores)
def test_emulated_kernels_have_no_shared_memory_race(tmp_path):
    """Every emulated GPU thread a host thread under ThreadSanitizer: the warp-tiled kernels (head_dim 64 at
    L = 50, the LoMaR window, 80 at L = 37, and 128 at L = NB = 64, the largest) and the tile kernels (64 with tensor cores at L = 50, 32 at
    L = 17), forward and backward, read no shared memory another thread wrote without a barrier between them.
    Warp instructions (mma, ldmatrix, shuffles) order no memory here, as on a GPU, so a missing __syncwarp shows
    as well as a missing __syncthreads. The check finds both: the warp-tiled forward without the barrier that
    ends a pair (the next pair's k and v overwrite tiles other warps still read), or without the __syncwarp
    between a warp's q T stores and its lanes' reads of them (only mma.sync collectives in between), reports
    a race."""
    exe = _checked_build(tmp_path, "thread", broken=True)
    status, out, races = run_sanitized(exe, "thread", "kernels")
    assert status == 0 and races == 0, out[-6000:]
    assert out.count(": nonfinite 0") == 5, out[-3000:]  # every tile landed before it was read
    status, out, races = run_sanitized(exe, "thread", "cut")
    # the next pair's k, v tile copies, landing at the thread's wait
    assert status == 66 and races >= 1 and "emu_cp_async_wait_all" in out, out[-3000:]
    status, out, races = run_sanitized(exe, "thread", "warp")
    assert status == 66 and races >= 1 and "wm_logits" in out, out[-3000:]  # a lane reading another's q T
    # the copies emulated as on a GPU (queued until the thread's wait): without the wait the tiles are unset
    status, out, races = run_sanitized(exe, "thread", "nowait")
    assert "nowait mma 64 L=50: nonfinite 0" not in out and "nonfinite" in out, out[-3000:]


@pytest.mark.slow  # an AddressSanitizer build and run
def test_emulated_kernels_stay_inside_the_shared_memory_they_ask_for(tmp_path):
    """Each launch gets exactly the dynamic shared memory the kernel's size function asks for (the wrapper's
    formula, tested equal), under AddressSanitizer: no kernel reads or writes past it, which on a GPU is an
    illegal address that ends the process's CUDA context, nor past any input or output. The warp-tiled forward
    given 16 bytes fewer than it asks for is reported."""
    exe = _checked_build(tmp_path, "address", broken=False)
    status, out, reports = run_sanitized(exe, "address", "kernels")
    assert status == 0 and reports == 0, out[-6000:]
    assert out.count(": nonfinite 0") == 5, out[-3000:]
    status, out, reports = run_sanitized(exe, "address", "short")
    assert status == 66 and reports >= 1 and "window_attention_mma_fwd" in out, out[-3000:]


@pytest.mark.parametrize("choice", ["tiles", "mma"])
def test_emulated_packed_qkv_gradient_lands_in_one_buffer(emu, monkeypatch, choice):
    """window_attention_qkv through the wrapper's launches (emulated): the backward kernel writes dq, dk, dv into
    one (N, L, 3, H, D) buffer through their shared strides; values and gradients match the truth."""
    monkeypatch.setenv(wac.KERNEL_ENV, choice)
    launches = []
    monkeypatch.setattr(cb, "launch", _emulated_launcher(emu, launches))
    monkeypatch.setattr(wac, "_kernel_ok", lambda kind, q, table, mma=False: True)
    monkeypatch.setattr(wac, "_prepare", lambda kernel, device, shared: None)
    monkeypatch.setattr(wac, "_grid", lambda kernel, device, shared, pairs, threads=wac.THREADS: 2)
    torch.manual_seed(2)
    buckets = window_buckets(5)
    qkv = torch.randn(1, 26, 3, 3, 64).to(torch.bfloat16).requires_grad_(True)
    table = random_table(64).requires_grad_(True)
    out = wac.window_attention_qkv(qkv, table, buckets, 0.125)
    go = torch.randn(out.shape).to(torch.bfloat16)
    dqkv, dtable = torch.autograd.grad(out, (qkv, table), go)
    assert [n.split("<")[0] for n in [name for name, *_ in launches]] == [
        f"window_attention{'_mma' if choice == 'mma' else ''}_{k}" for k in ("fwd", "bwd")] + [
        "window_attention_dtable_reduce"]
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)
    want, truth = truth_grads(q, k, v, table, buckets, 0.125, go)
    assert rel_err(out, want) <= 1e-2
    for name, a, b in zip("qkv", dqkv.permute(2, 0, 3, 1, 4).unbind(0), truth[:3]):
        assert rel_err(a, b) <= 2e-2, (name, rel_err(a, b))
    assert rel_err(dtable, truth[3]) <= 2e-2


def test_mma_kernels_are_checked_against_their_own_shared_memory(emu, monkeypatch):
    """Where only the warp-tiled kernels fit the device's shared memory (head_dim 128, L = NB = 64 on an A100's
    163 KB), they run: the launcher checks each kernel against its own size, and without them (tiles) the shape
    takes the PyTorch path, launching nothing."""
    class CudaLike:  # the attributes _kernel_ok reads, as of a CUDA tensor
        is_cuda, dtype, shape, device = True, torch.bfloat16, (1, 2, 64, 128), torch.device("cuda", 0)

        def numel(self):
            return 1 * 2 * 64 * 128

    monkeypatch.setattr(wac, "_limits", lambda device: (163 * 1024, 164 * 1024))
    table = random_table(128, 64)
    assert wac._kernel_ok("bwd", CudaLike(), table, mma=True) and not wac._kernel_ok("bwd", CudaLike(), table)
    assert wac._kernel_ok("fwd", CudaLike(), table, mma=True) and wac._kernel_ok("fwd", CudaLike(), table)

    launches = []
    monkeypatch.setattr(cb, "launch", _emulated_launcher(emu, launches))
    monkeypatch.setattr(wac, "_kernel_ok", lambda kind, q, table, mma=False: mma)  # only the mma kernels fit
    monkeypatch.setattr(wac, "_prepare", lambda kernel, device, shared: None)
    monkeypatch.setattr(wac, "_grid", lambda kernel, device, shared, pairs, threads=wac.THREADS: 2)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(1, 2, 17, 32, torch.bfloat16))
    table = random_table(32).requires_grad_(True)
    for choice, want in (("mma", [wac.mma_kernel_name("fwd", 32), wac.mma_kernel_name("bwd", 32),
                                  "window_attention_dtable_reduce"]), ("tiles", [])):
        monkeypatch.setenv(wac.KERNEL_ENV, choice)
        launches.clear()
        out = wac.window_attention(q, k, v, table, window_buckets(4), 0.2)
        grads = torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
        assert [name for name, *_ in launches] == want
        ref = window_attention_reference(q, k, v, table, window_buckets(4), 0.2)
        assert rel_err(out, ref) <= 1e-2
        for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v, table), torch.ones_like(ref))):
            assert rel_err(a, b) <= 3e-2


def test_mma_choice_and_fallbacks(emu, monkeypatch):
    """$LOMAR_WA_KERNEL picks the kernels: tiles by default; mma only for bf16 with 16-byte aligned rows (other
    inputs keep the tile kernels); a bad value is one clear error."""
    q, k, v = qkv_views(2, 3, 17, 32, torch.bfloat16)
    assert wac.kernel_choice() == wac.DEFAULT_KERNEL == "tiles" and not wac.use_mma(q, k, v)
    monkeypatch.setenv(wac.KERNEL_ENV, "mma")
    assert wac.use_mma(q, k, v)
    assert not wac.use_mma(*(x.float() for x in (q, k, v)))
    big = torch.randn(2, 17, 3, 3, 33).to(torch.bfloat16)
    uq, uk, uv = big[..., 1:].permute(2, 0, 3, 1, 4).unbind(0)
    assert not wac.use_mma(uq, uk, uv)
    go = torch.randn(2, 3, 17, 32).to(torch.bfloat16)
    out, grads, names = _run_wrapper_emulated(emu, monkeypatch, uq, uk, uv, random_table(32), window_buckets(4), 0.2,
                                              go, 2)
    assert names == [wac.kernel_name("fwd", 32, True), wac.kernel_name("bwd", 32, True), "window_attention_dtable_reduce"]
    monkeypatch.setenv(wac.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="LOMAR_WA_KERNEL='fast' must be one of tiles, mma"):
        wac.kernel_choice()


# ---------------------------------------------------------------------------------------------
# benchmark code path (CPU)
# ---------------------------------------------------------------------------------------------
def test_benchmark_window_attention_cases():
    """The benchmark's cases exist, run, and their baseline (SDPA + iRPE bias) computes the attention."""
    import argparse

    from benchmarks import kernels as bench

    cfg = dict(bench.SMOKE_CONFIG)
    x = bench.make_inputs(cfg, "cpu")
    cases = {c["name"]: c for c in bench.build_cases(x, cfg, "cpu", with_kernels=False)}
    for name in ("window_attention_fwd", "window_attention_fwd_bwd"):
        rec = bench.run_case(cases[name], argparse.Namespace(warmup=0, repeats=1), False, None, False)
        assert rec["correct"] is True and rec["reference_eager"]["median_ms"] > 0
    want = window_attention_reference(x["q"], x["k"], x["v"], x["table"], x["buckets"])
    torch.testing.assert_close(cases["window_attention_fwd"]["reference"](), want, rtol=1e-5, atol=1e-5)
    grads = cases["window_attention_fwd_bwd"]["reference"]()[1:]
    assert [g.shape for g in grads] == [x["q"].shape] * 3 + [x["table"].shape]
    # the math-path rows run the explicit-logits path in the kernel column, eager and compiled
    for name in ("window_attention_fwd[math path]", "window_attention_fwd_bwd[compiled math path]"):
        rec = bench.run_case(cases[name], argparse.Namespace(warmup=0, repeats=1), False, None, False)
        assert rec["correct"] is True and rec["kernel"]["median_ms"] > 0, rec
        assert rec["max_rel_err"]["kernel"] < 1e-5
    torch.testing.assert_close(cases["window_attention_fwd[math path]"]["kernel"](),
                               wa_mod.window_attention_math(x["q"], x["k"], x["v"], x["table"], x["buckets"]))


def test_benchmark_kernel_variant_rows_switch_for_the_call_only(monkeypatch):
    """The ``[cuda cores]`` rows run the fused op with LOMAR_WA_TENSOR_CORES=0 and the ``[mma]`` rows with
    LOMAR_WA_KERNEL=mma, during the call only (on CPU the op computes in PyTorch, so the rows agree with the
    default rows); fp32 inputs get no ``[mma]`` rows."""
    import argparse

    from benchmarks import kernels as bench

    monkeypatch.delenv(wac.TENSOR_CORES_ENV, raising=False)
    monkeypatch.delenv(wac.KERNEL_ENV, raising=False)
    cfg = dict(bench.SMOKE_CONFIG, dtype="bfloat16")
    x = bench.make_inputs(cfg, "cpu")
    cases = {c["name"]: c for c in bench.build_cases(x, cfg, "cpu", with_kernels=True)}
    seen = []
    real = wac.window_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((wac.use_tensor_cores(q), wac.use_mma(q, k, v)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(wac, "window_attention", spy)
    for name, want in (("window_attention_fwd_bwd", (True, False)), ("window_attention_fwd_bwd[cuda cores]", (False, False)),
                       ("window_attention_fwd[mma]", (True, True)), ("window_attention_fwd_bwd[mma]", (True, True))):
        rec = bench.run_case(cases[name], argparse.Namespace(warmup=0, repeats=1), False, None, False)
        assert rec["correct"] is True, rec
        assert seen and set(seen) == {want}, (name, seen)
        seen.clear()
    assert os.environ.get(wac.TENSOR_CORES_ENV) is None and os.environ.get(wac.KERNEL_ENV) is None
    fp32 = bench.build_cases(bench.make_inputs(dict(bench.SMOKE_CONFIG, dtype="float32"), "cpu"),
                             dict(bench.SMOKE_CONFIG, dtype="float32"), "cpu", with_kernels=True)
    assert not [c["name"] for c in fp32 if "[mma]" in c["name"]]


def test_benchmark_flex_rows_run_the_flex_path_with_their_tiles(monkeypatch):
    """The ``[flex path]`` rows (bf16 runs only) put the flex path in the kernel column, with FlexAttention's own
    tiles and, ``[flex path 64]``, LOMAR_FLEX_BLOCK=64 during the call only (here the path is a stand-in that
    records its options: FlexAttention has no CPU backward)."""
    import argparse

    from benchmarks import kernels as bench

    monkeypatch.delenv(wa_mod.FLEX_BLOCK_ENV, raising=False)
    seen = []

    def stand_in(q, k, v, table, buckets, scale=None, rpe_scale=None):
        seen.append(wa_mod.flex_kernel_options().get("fwd_BLOCK_M"))
        return window_attention_reference(q, k, v, table, buckets, scale)

    monkeypatch.setattr(wa_mod, "window_attention_flex", stand_in)
    cfg = dict(bench.SMOKE_CONFIG, dtype="bfloat16")
    cases = {c["name"]: c for c in bench.build_cases(bench.make_inputs(cfg, "cpu"), cfg, "cpu", with_kernels=False)}
    for name, want in (("window_attention_fwd[flex path]", None), ("window_attention_fwd_bwd[flex path 64]", 64)):
        rec = bench.run_case(cases[name], argparse.Namespace(warmup=0, repeats=1), False, None, False)
        assert rec["correct"] is True, rec
        assert seen and set(seen) == {want}, (name, seen)
        seen.clear()
    assert os.environ.get(wa_mod.FLEX_BLOCK_ENV) is None
    fp32 = bench.build_cases(bench.make_inputs(dict(bench.SMOKE_CONFIG), "cpu"), dict(bench.SMOKE_CONFIG), "cpu",
                             with_kernels=False)
    assert not [c["name"] for c in fp32 if "flex" in c["name"]]


# ---------------------------------------------------------------------------------------------
# GPU: kernel vs float64 truth
# ---------------------------------------------------------------------------------------------
GPU_TOL = {  # max error relative to the largest magnitude: output, gradients
    torch.float32: (1e-4, 2e-4),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (4e-3, 1e-2),
}
# the explicit-logits path's bf16 output: its q k^T is rounded to bf16 before the softmax (the fused kernel and
# SDPA's GPU kernels keep the logits in fp32)
MATH_BF16_OUT_TOL = 2e-2


def _check_gpu(q, k, v, table, buckets, scale=None, rpe_scale=None, go=None, kernel="window_attention"):
    """The op on the GPU against the float64 truth; ``kernel``: the name of the kernels that must run."""
    dtype = q.dtype
    tol_out, tol_grad = GPU_TOL[dtype]
    q, k, v, table = (x.detach().requires_grad_(True) for x in (q, k, v, table))
    with launched() as fwd:
        out = wa_mod.window_attention(q, k, v, table, buckets, scale, rpe_scale=rpe_scale)
    assert [n.split("<")[0] for n in fwd] == [f"{kernel}_fwd"], fwd  # the kernel ran, not the fallback
    n, h, length, d = q.shape
    assert out.dtype == dtype and out.shape == (n, h, length, d)
    assert out.stride() == _heads_strides(n, h, length, d)  # the kernel's layout: the kernel ran
    go = torch.randn_like(out) if go is None else go
    with launched() as bwd:
        got = torch.autograd.grad(out, (q, k, v, table), go)
    assert f"{kernel}_bwd" in [n.split("<")[0] for n in bwd], bwd
    _compare_with_truth(q, k, v, table, buckets, scale, rpe_scale, out, got, go, tol_out, tol_grad)


def _compare_with_truth(q, k, v, table, buckets, scale, rpe_scale, out, got, go, tol_out, tol_grad):
    """A GPU path's output and q, k, v, table gradients (``got``, for the output gradient ``go``) against the
    float64 truth, each within its tolerance relative to the largest magnitude, the gradients in their inputs'
    dtypes."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    t = table if rpe_scale is None else table * rpe_scale
    want, truth = truth_grads(q, k, v, t, buckets.cpu(), s, go.cpu())
    assert rel_err(out.cpu(), want) <= tol_out, rel_err(out.cpu(), want)
    if rpe_scale is not None:
        truth = (*truth[:3], truth[3] * rpe_scale)
    for name, a, b in zip("q k v table".split(), got, truth):
        assert a.dtype == (table.dtype if name == "table" else q.dtype)
        assert rel_err(a.cpu(), b) <= tol_grad, (name, rel_err(a.cpu(), b))


def _gpu_odd_inputs(length, d, dtype):
    """(buckets, (q, k, v)) on the GPU: window buckets for L = side^2 + 1, random ones otherwise."""
    torch.manual_seed(0)
    side = {17: 4, 26: 5, 37: 6, 50: 7}.get(length)
    buckets = (window_buckets(side) if side else torch.randint(0, 50, (length, length))).cuda()
    return buckets, qkv_views(3, 5, length, d, dtype, "cuda", seed=length + d)


@gpu_test
@pytest.mark.parametrize("length,d", [(17, 32), (26, 80), (37, 64), (50, 64), (50, 80), (64, 128)])
@pytest.mark.parametrize("dtype,tc", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False),
                                      (torch.float16, False)])
def test_gpu_odd_shapes(kernels_on, monkeypatch, dtype, tc, length, d):
    """bf16 runs twice: on tensor cores (the default) and with LOMAR_WA_TENSOR_CORES=0."""
    if dtype == torch.bfloat16 and not tc:
        monkeypatch.setenv(wac.TENSOR_CORES_ENV, "0")
    buckets, (q, k, v) = _gpu_odd_inputs(length, d, dtype)
    assert wac.use_tensor_cores(q) is tc
    _check_gpu(q, k, v, random_table(d, device="cuda"), buckets)
    assert (wac.SOURCE, torch.cuda.current_device()) in cb._modules  # the kernel ran


@gpu_test
@pytest.mark.parametrize("length,d", [(17, 32), (26, 80), (37, 64), (50, 64), (50, 80), (64, 128)])
def test_gpu_mma_odd_shapes(kernels_on, monkeypatch, length, d):
    """The warp-tiled kernels (LOMAR_WA_KERNEL=mma), bf16."""
    monkeypatch.setenv(wac.KERNEL_ENV, "mma")
    buckets, (q, k, v) = _gpu_odd_inputs(length, d, torch.bfloat16)
    assert wac.use_mma(q, k, v)
    _check_gpu(q, k, v, random_table(d, device="cuda"), buckets, kernel="window_attention_mma")


@gpu_test
@pytest.mark.parametrize("scaled_query", [False, True])
def test_gpu_mma_vit_b_shapes(kernels_on, monkeypatch, scaled_query):
    monkeypatch.setenv(wac.KERNEL_ENV, "mma")
    torch.manual_seed(1)
    buckets = window_buckets(7).cuda()
    q, k, v = qkv_views(256, 12, 50, 64, torch.bfloat16, "cuda", seed=2)  # 3072 pairs: many per block
    _check_gpu(q, k, v, random_table(64, device="cuda"), buckets, rpe_scale=0.125 if scaled_query else None,
               kernel="window_attention_mma")


@gpu_test
@pytest.mark.parametrize("scaled_query", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_vit_b_shapes(kernels_on, dtype, scaled_query):
    torch.manual_seed(1)
    buckets = window_buckets(7).cuda()
    q, k, v = qkv_views(256, 12, 50, 64, dtype, "cuda", seed=2)  # 3072 (n, h) pairs: many per block
    _check_gpu(q, k, v, random_table(64, device="cuda"), buckets, rpe_scale=0.125 if scaled_query else None)


@gpu_test
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_math_path_at_vit_b_shapes(compiled):
    """The explicit-logits path (LOMAR_ATTN_PATH=math) on the GPU in bf16, eager and compiled: values and
    gradients against the float64 truth. The gradients keep the fused kernel's bf16 tolerance; the output gets
    MATH_BF16_OUT_TOL, since the path rounds q k^T to bf16 before the softmax as the published attention does
    (on an H200 the output was off by 1.26e-2, and the same inputs in bf16 on a CPU give the same 1.26e-2)."""
    torch.manual_seed(3)
    buckets = window_buckets(7).cuda()
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(256, 12, 50, 64, torch.bfloat16, "cuda", seed=4))
    table = random_table(64, device="cuda").requires_grad_(True)
    fn = wa_mod.window_attention_math
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    out = fn(q, k, v, table, buckets)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, table), go)
    want, truth = truth_grads(q, k, v, table, buckets.cpu(), 64**-0.5, go.cpu())
    tol_grad = GPU_TOL[torch.bfloat16][1]
    assert out.dtype == torch.bfloat16 and rel_err(out.cpu(), want) <= MATH_BF16_OUT_TOL, rel_err(out.cpu(), want)
    for name, a, b in zip("q k v table".split(), got, truth):
        assert rel_err(a.cpu(), b) <= tol_grad, (name, rel_err(a.cpu(), b))


def _check_gpu_flex(q, k, v, table, buckets, scale=None, rpe_scale=None, tol=None):
    """The flex path on the GPU (LOMAR_ATTN_PATH=flex, kernels off: what window_attention dispatches to) against
    the float64 truth, values and gradients; it must have run FlexAttention compiled, not its unfused fallback."""
    dtype = q.dtype
    tol_out, tol_grad = tol or GPU_TOL[dtype]
    q, k, v, table = (x.detach().requires_grad_(True) for x in (q, k, v, table))
    out = wa_mod.window_attention(q, k, v, table, buckets, scale, rpe_scale=rpe_scale)
    assert wa_mod._compiled_flex is not None
    assert out.dtype == dtype and out.shape == q.shape
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, table), go)
    _compare_with_truth(q, k, v, table, buckets, scale, rpe_scale, out, got, go, tol_out, tol_grad)


@pytest.fixture
def flex_path(monkeypatch):
    """LOMAR_ATTN_PATH=flex with the kernels off and FlexAttention's own tiles; exact fp32 products (no TF32), as
    for the kernels, so that the fp32 tolerances stay tight. Each test compiles FlexAttention afresh: past
    dynamo's recompile limit (8 shapes or option sets for one compiled function) it would run uncompiled."""
    torch._dynamo.reset()
    monkeypatch.setattr(wa_mod, "_compiled_flex", None)
    monkeypatch.setenv(wa_mod.ATTN_PATH_ENV, "flex")
    monkeypatch.delenv(wa_mod.FLEX_BLOCK_ENV, raising=False)
    monkeypatch.delenv(wa_mod.FLEX_OPTIONS_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    set_kernels("off")
    yield monkeypatch
    set_kernels(None)


# a few cases: each compiles FlexAttention's forward and backward kernels anew
@gpu_test
@pytest.mark.parametrize("length,d,dtype", [(17, 32, torch.float32), (26, 80, torch.bfloat16),
                                            (64, 128, torch.bfloat16)])
def test_gpu_flex_path_odd_shapes(flex_path, dtype, length, d):
    buckets, (q, k, v) = _gpu_odd_inputs(length, d, dtype)
    if wa_mod.flex_refuses_head_dim(d):  # torch <= 2.7: powers of two only
        with pytest.raises(ValueError, match=f"this model's is {d}: use torch 2.8 or newer"):
            wa_mod.window_attention(q, k, v, random_table(d, device="cuda"), buckets)
        return
    _check_gpu_flex(q, k, v, random_table(d, device="cuda"), buckets, scale=0.2 if length == 26 else None)


@gpu_test
@pytest.mark.parametrize("block,scaled_query", [(None, False), ("64", True)])
def test_gpu_flex_path_vit_b_shapes(flex_path, block, scaled_query):
    """bf16 at the pretraining shapes, with FlexAttention's tiles and with LOMAR_FLEX_BLOCK's."""
    if block:
        flex_path.setenv(wa_mod.FLEX_BLOCK_ENV, block)
    torch.manual_seed(1)
    buckets = window_buckets(7).cuda()
    q, k, v = qkv_views(256, 12, 50, 64, torch.bfloat16, "cuda", seed=2)
    _check_gpu_flex(q, k, v, random_table(64, device="cuda"), buckets, rpe_scale=0.125 if scaled_query else None)


def _gpu_attention_block(side: int, n: int):
    """(an iRPE attention block of width 192 on the GPU with a random table, its input (n, side^2 + 1, 192), the
    window buckets)."""
    torch.manual_seed(4)
    attn = Attention(192, 3, rpe=True).cuda()
    with torch.no_grad():
        attn.rpe_k.lookup_table_weight.normal_(0, 0.3)
    x = torch.randn(n, side * side + 1, 192, device="cuda", requires_grad=True)
    return attn, x, window_buckets(side).cuda()


@gpu_test
def test_gpu_flex_path_in_a_compiled_attention_block(flex_path):
    """An attention block on the flex path, compiled whole (FlexAttention traced inside it, no graph break),
    equals the same block eager on the SDPA path under bf16 autocast, values and gradients."""
    from torch._dynamo.utils import counters

    attn, x, buckets = _gpu_attention_block(7, 40)
    flex_path.setenv(wa_mod.ATTN_PATH_ENV, "sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = attn(x, buckets)
    g_want = torch.autograd.grad(want.float().square().sum(), [x, *attn.parameters()])
    flex_path.setenv(wa_mod.ATTN_PATH_ENV, "flex")
    counters.clear()
    compiled = torch.compile(attn, fullgraph=True, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = compiled(x, buckets)
    g_got = torch.autograd.grad(got.float().square().sum(), [x, *attn.parameters()])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    tol_out, tol_grad = GPU_TOL[torch.bfloat16]
    assert got.dtype == want.dtype and rel_err(got, want) <= tol_out, rel_err(got, want)
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) <= tol_grad, rel_err(a, b)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_non_contiguous_and_unaligned(kernels_on, dtype):
    torch.manual_seed(2)
    buckets = window_buckets(5).cuda()
    big = torch.randn(7, 26, 3, 3, 65, device="cuda").to(dtype)
    q, k, v = big[..., 1:].permute(2, 0, 3, 1, 4).unbind(0)  # rows not 16-byte aligned: scalar loads
    assert not wac._aligned(q, k, v)
    table = random_table(50, 64, device="cuda").t()  # (64, 50) non-contiguous
    go = torch.randn(7, 3, 64, 26, device="cuda").to(dtype).transpose(-1, -2)  # non-contiguous gradient
    _check_gpu(q, k, v, table, buckets, scale=0.3, go=go)
    # a contiguous (N, H, L, D) layout and a transposed-last-dim input are taken too
    q2, k2, v2 = (x.contiguous() for x in qkv_views(4, 3, 26, 64, dtype, "cuda"))
    _check_gpu(q2, k2, v2.transpose(-1, -2).contiguous().transpose(-1, -2), random_table(64, device="cuda"), buckets)


@gpu_test
@pytest.mark.parametrize("choice", wac.KERNEL_CHOICES)
def test_gpu_table_gradient_is_deterministic(kernels_on, monkeypatch, choice):
    monkeypatch.setenv(wac.KERNEL_ENV, choice)
    torch.manual_seed(3)
    buckets = window_buckets(7).cuda()
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(64, 12, 50, 64, torch.bfloat16, "cuda"))
    table = random_table(64, device="cuda").requires_grad_(True)
    go = torch.randn(64, 12, 50, 64, device="cuda", dtype=torch.bfloat16)
    grads = [torch.autograd.grad(wa_mod.window_attention(q, k, v, table, buckets), (q, table), go) for _ in range(2)]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@gpu_test
@pytest.mark.parametrize("choice", wac.KERNEL_CHOICES)
def test_gpu_packed_qkv_matches_unpacked(kernels_on, monkeypatch, choice):
    """window_attention_qkv on the GPU (bf16, ViT-B window): the same values and gradients as the unpacked op."""
    monkeypatch.setenv(wac.KERNEL_ENV, choice)
    torch.manual_seed(6)
    buckets = window_buckets(7).cuda()
    qkv = torch.randn(64, 50, 3, 12, 64, device="cuda").to(torch.bfloat16).requires_grad_(True)
    table = random_table(64, device="cuda").requires_grad_(True)
    go = torch.randn(64, 12, 50, 64, device="cuda").to(torch.bfloat16)
    with launched() as names:
        out = wa_mod.window_attention_qkv(qkv, table, buckets)
        got = torch.autograd.grad(out, (qkv, table), go)
    assert any("_bwd" in n for n in names), names
    ref = wa_mod.window_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), table, buckets)
    want = torch.autograd.grad(ref, (qkv, table), go)
    assert torch.equal(out, ref)  # the same kernel on the same inputs
    assert rel_err(got[0], want[0]) <= 1e-6 and rel_err(got[1], want[1]) <= 1e-6


@gpu_test
def test_gpu_torch_compile_attention_block_matches_eager(kernels_on):
    attn, x, buckets = _gpu_attention_block(5, 6)
    want = attn(x, buckets)
    g_want = torch.autograd.grad(want.square().sum(), [x, *attn.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(attn)
    got = compiled(x, buckets)
    g_got = torch.autograd.grad(got.square().sum(), [x, *attn.parameters()])
    assert rel_err(got, want) <= 1e-4
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) <= 1e-3, rel_err(a, b)
    # and the kernel path agrees with the SDPA + bias path it replaces
    set_kernels("off")
    base = attn(x, buckets)
    assert rel_err(want, base) <= 1e-4


@gpu_test
@pytest.mark.parametrize("dtype,choice", [(torch.float32, "tiles"), (torch.bfloat16, "tiles"), (torch.bfloat16, "mma")])
def test_gpu_opcheck(monkeypatch, dtype, choice):
    monkeypatch.setenv(wac.KERNEL_ENV, choice)
    torch.manual_seed(5)
    buckets = window_buckets(3).cuda()
    q, k, v = (x.detach().requires_grad_(True) for x in qkv_views(2, 3, 10, 32, dtype, "cuda"))
    table = random_table(32, device="cuda").requires_grad_(True)
    torch.library.opcheck(torch.ops.lomar_fast.window_attention_fwd, (q, k, v, table, buckets, 0.2))
    out, lse = torch.ops.lomar_fast.window_attention_fwd(q, k, v, table, buckets, 0.2)
    args = (torch.randn_like(out), *(x.detach() for x in (q, k, v, out, lse, table)), buckets, 0.2)
    torch.library.opcheck(torch.ops.lomar_fast.window_attention_bwd, args)


# compile checks (results of the jobs started with the module)
@pytest.mark.slow
@pytest.mark.parametrize("compile_job", [f"nvcc{a}" for a in ARCHS], indirect=True)
def test_nvcc_compiles_without_warnings(compile_job):
    rc, out, _ = compile_job
    assert rc == 0, f"nvcc failed on {wac.SOURCE}:\n{out}"
    assert "warning" not in out.lower(), f"nvcc warnings in {wac.SOURCE}:\n{out}"


@pytest.mark.slow
@pytest.mark.parametrize("compile_job", [f"nvrtc{a}" for a in ARCHS], indirect=True)
def test_nvrtc_compiles_runtime_source(compile_job):
    rc, out, err = compile_job
    assert rc == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"], f"NVRTC failed on {wac.SOURCE}:\n{res['log']}"
    assert res["log"] == "", f"NVRTC log (warnings) for {wac.SOURCE}:\n{res['log']}"
    # every kernel the Python side can launch exists under its name expression
    assert set(res["lowered"]) == set(wac.NAME_EXPRESSIONS)
    assert all(low and low.startswith("_Z") for low in res["lowered"].values())

"""Fused CUDA kernels (cuda/*.cu) and their torch.library ops.

CPU (always): the sources compile warning-free with nvcc and with NVRTC (the runtime's options) for
sm_80 and sm_90; the ops are registered, their fake implementations give the right shapes, strides
and dtypes, opcheck passes, the op's autograd formula matches the reference, CPU tensors take the
reference path even with LOMAR_KERNELS=on, and the benchmark's code path runs.

GPU (``-m gpu``, skipped without CUDA): kernel vs reference on odd and ViT-B shapes in every dtype,
values and gradients, non-contiguous inputs, torch.compile, opcheck.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_emulation import (ARCHS, DTYPES, build_library, build_sanitized, emulation_source, gpu_test, launched,
                              missing_toolchain, nvcc_check, nvrtc_compile, run_sanitized)
from kernel_emulation import c_args as _c_args

import lomar_fast.ops as ops_pkg
from lomar_fast.ops import _cuda_build as cb
from lomar_fast.ops import _irpe_cuda, _window_gather_cuda
from lomar_fast.ops import irpe as irpe_mod
from lomar_fast.ops import window_gather as wg_mod
from lomar_fast.ops.window_gather_ref import n_mask_of

REPO = Path(__file__).resolve().parent.parent
KERNEL_MODULES = (_irpe_cuda, _window_gather_cuda)


def require_nvrtc() -> None:
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        missing_toolchain("cuda-python (cuda.bindings) is not installed")




# ---------------------------------------------------------------------------------------------
# input builders
# ---------------------------------------------------------------------------------------------
def make_window_inputs(b, k, w, grid, p, mask_ratio=0.8, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, grid * p, grid * p, 3), dtype=torch.uint8, generator=g)
    span = grid - w + 1
    windows = torch.stack(
        [
            torch.stack([torch.randperm(span, generator=g)[:k], torch.randperm(span, generator=g)[:k]], dim=-1)
            for _ in range(b)
        ]
    )
    n_mask = int(w * w * mask_ratio)
    masks = torch.zeros(b, k, w * w, dtype=torch.bool)
    for i in range(b):
        for j in range(k):
            masks[i, j, torch.randperm(w * w, generator=g)[:n_mask]] = True
    return images.to(device), windows.to(device), masks.to(device), n_mask


def make_buckets(side, num_buckets=50):
    """Buckets of a side x side window + cls, from the model's bucket function when available."""
    try:
        from lomar_fast.models.irpe import bucket_ids

        buckets = bucket_ids(side, side)
        if int(buckets.max()) < num_buckets:
            return buckets
    except Exception:  # the model code is optional for these tests
        pass
    length = side * side + 1
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, num_buckets, (length, length), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------
# compile checks (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def nvcc_results():
    """Compile every .cu with nvcc to PTX for sm_80 and sm_90 (in parallel, once per session): the front end's and
    the host compiler's warnings are errors. ptxas's warnings for each architecture are in NVRTC's log, which
    test_nvrtc_compiles_runtime_source requires empty (test_nvrtc_log_holds_ptxas_warnings)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        missing_toolchain("nvcc not found on PATH: cannot check the CUDA sources offline")
    procs = {}
    for mod in KERNEL_MODULES:
        procs[mod.SOURCE] = subprocess.Popen(nvcc_check(nvcc, cb.cuda_source_path(mod.SOURCE), ARCHS),
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mod", KERNEL_MODULES, ids=lambda m: m.SOURCE)
def test_nvcc_compiles_without_warnings(nvcc_results, mod):
    rc, out = nvcc_results[mod.SOURCE]
    assert rc == 0, f"nvcc failed on {mod.SOURCE}:\n{out}"
    assert "warning" not in out.lower(), f"nvcc warnings in {mod.SOURCE}:\n{out}"


def _nvrtc_compile(source: str, filename: str, name_expressions, arch: int):
    # the runtime's options; CuPy appends -ftz=true and the architecture
    ok, log, lowered, _ = nvrtc_compile(source, filename, name_expressions,
                                        (*cb.NVRTC_OPTIONS, "-ftz=true", f"--gpu-architecture=sm_{arch}"))
    return ok, log, lowered


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mod", KERNEL_MODULES, ids=lambda m: m.SOURCE)
def test_nvrtc_compiles_runtime_source(mod, arch):
    require_nvrtc()
    ok, log, lowered = _nvrtc_compile(cb.runtime_source(mod.SOURCE), mod.SOURCE, mod.NAME_EXPRESSIONS, arch)
    assert ok, f"NVRTC failed on {mod.SOURCE} for sm_{arch}:\n{log}"
    assert log == "", f"NVRTC log (warnings) for {mod.SOURCE} sm_{arch}:\n{log}"
    # every kernel the Python side can launch exists under its name expression
    assert set(lowered) == set(mod.NAME_EXPRESSIONS)
    assert all(low.startswith(b"_Z") for low in lowered.values())


def test_nvrtc_reports_errors():
    """The NVRTC check above is able to fail: a broken source does not compile."""
    require_nvrtc()
    ok, log, _ = _nvrtc_compile("__global__ void k() { undeclared(); }", "bad.cu", (), 90)
    assert not ok and "undeclared" in log


def test_nvrtc_log_holds_ptxas_warnings():
    """The empty-log check above covers ptxas (NVRTC assembles for sm_XX itself): a launch bound ptxas ignores on
    sm_80 (more threads per SM than it has) is a ptxas warning in NVRTC's log, and the compile still succeeds."""
    require_nvrtc()
    src = 'extern "C" __global__ void __launch_bounds__(1024, 3) k(int* o) { o[threadIdx.x] = 1; }'
    ok, log, _ = _nvrtc_compile(src, "bounds.cu", (), 80)
    assert ok and "ptxas warning" in log, log


def test_each_kernel_is_built_alone_at_its_first_launch(monkeypatch):
    """A launch builds its kernel alone: a module of the source without the nvcc-only explicit instantiations and
    with the one name expression, the shared NVRTC options plus the launch's, compiled once per device, kernel and
    options (CuPy's RawModule, a stand-in here). A kernel the file does not have is one ValueError."""
    import contextlib
    import types

    built, launched_ = [], []

    class Module:
        def __init__(self, code, options, name_expressions):
            built.append((code, options, tuple(name_expressions)))
            self.names = tuple(name_expressions)

        def get_function(self, name):
            assert name in self.names
            return lambda grid, block, args, shared_mem=0: launched_.append((name, self.names, shared_mem))

    fake = types.SimpleNamespace(RawModule=Module, cuda=types.SimpleNamespace(Device=lambda i: contextlib.nullcontext()))
    monkeypatch.setattr(cb, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cb, "_external_stream", lambda cupy, stream, index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(cb, "_modules", {})
    dev = torch.device("cuda", 0)
    names = _irpe_cuda.NAME_EXPRESSIONS
    for name, opts in ((names[0], ()), (names[1], ()), (names[0], ()), (names[0], ("-DX=1",))):
        cb.launch(_irpe_cuda.SOURCE, names, name, dev, 1, 32, (), 0, options=opts)
    assert [n for n, _, _ in launched_] == [names[0], names[1], names[0], names[0]]
    assert [b[1:] for b in built] == [((*cb.NVRTC_OPTIONS,), (names[0],)), ((*cb.NVRTC_OPTIONS,), (names[1],)),
                                      ((*cb.NVRTC_OPTIONS, "-DX=1"), (names[0],))]  # the third launch reused one
    full = cb.cuda_source(_irpe_cuda.SOURCE)
    assert cb.EXPLICIT_INSTANTIATIONS in full and built[0][0] == full.split(cb.EXPLICIT_INSTANTIATIONS)[0]
    assert "template __global__" not in built[0][0]
    with pytest.raises(ValueError, match="irpe.cu has no kernel 'irpe_fwd<double, 32>'"):
        cb.launch(_irpe_cuda.SOURCE, names, "irpe_fwd<double, 32>", dev, 1, 32, ())


def test_cuda_sources_found_via_env(tmp_path, monkeypatch):
    (tmp_path / "irpe.cu").write_text("// from LOMAR_CUDA_DIR\n")
    monkeypatch.setenv("LOMAR_CUDA_DIR", str(tmp_path))
    assert cb.cuda_source_path("irpe.cu") == tmp_path / "irpe.cu"
    assert cb.cuda_source("irpe.cu").startswith("// from LOMAR_CUDA_DIR")
    # files the env dir lacks come from the repository's cuda/ directory
    assert cb.cuda_source_path("window_gather.cu") == REPO / "cuda" / "window_gather.cu"
    with pytest.raises(FileNotFoundError, match="LOMAR_CUDA_DIR"):
        cb.cuda_source_path("no_such_kernel.cu")


def test_cuda_sources_found_in_repo(monkeypatch):
    monkeypatch.delenv("LOMAR_CUDA_DIR", raising=False)
    for mod in KERNEL_MODULES:
        assert cb.cuda_source_path(mod.SOURCE) == REPO / "cuda" / mod.SOURCE


# ---------------------------------------------------------------------------------------------
# registration, fake implementations, opcheck (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["irpe_key_bias", "irpe_bucket_reduce", "gather_windows"])
def test_ops_registered(name):
    op = getattr(torch.ops.lomar_fast, name)
    assert isinstance(op.default, torch._ops.OpOverload)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lomar_fast::{name}", "Meta")


@pytest.mark.parametrize("dtype", DTYPES)
def test_irpe_fake_shapes(dtype):
    n, h, length, d, nb = 6, 3, 26, 32, 50
    q = torch.empty(n, h, length, d, dtype=dtype, device="meta")
    table = torch.empty(d, nb, dtype=dtype, device="meta")
    buckets = torch.empty(length, length, dtype=torch.long, device="meta")
    out = torch.ops.lomar_fast.irpe_key_bias(q, table, buckets)
    assert out.shape == (n, h, length, length) and out.dtype == dtype
    assert out.stride() == (h * length * 32, length * 32, 32, 1)  # rows padded 26 -> 32
    g = torch.ops.lomar_fast.irpe_bucket_reduce(out, buckets, nb)
    assert g.shape == (n, h, length, nb) and g.dtype == dtype and g.is_contiguous()


def test_irpe_fake_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(4, 12, 50, 64, dtype=torch.bfloat16)
        out = _irpe_cuda.irpe_key_bias(q, torch.empty(64, 50), torch.zeros(50, 50, dtype=torch.long))
        assert out.shape == (4, 12, 50, 50) and out.dtype == torch.bfloat16
        assert out.stride() == (12 * 50 * 56, 50 * 56, 56, 1)


@pytest.mark.parametrize("visible_only", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_gather_fake_shapes(out_dtype, visible_only):
    b, k, w, p, n_mask = 3, 2, 5, 16, 20
    images = torch.empty(b, 144, 144, 3, dtype=torch.uint8, device="meta")
    windows = torch.empty(b, k, 2, dtype=torch.long, device="meta")
    masks = torch.empty(b, k, w * w, dtype=torch.bool, device="meta")
    patches, targets = torch.ops.lomar_fast.gather_windows(
        images, windows, masks, p, w, True, out_dtype, n_mask, visible_only
    )
    rows = w * w - n_mask if visible_only else w * w
    assert patches.shape == (b * k, rows, p * p * 3) and patches.dtype == out_dtype
    assert targets.shape == (b * k, n_mask, p * p * 3) and targets.dtype == torch.float32


def test_opcheck_irpe_cpu():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 11, 32, dtype=torch.float64, requires_grad=True)
    table = torch.randn(32, 13, dtype=torch.float64, requires_grad=True)
    buckets = torch.randint(0, 13, (11, 11))
    torch.library.opcheck(torch.ops.lomar_fast.irpe_key_bias, (q, table, buckets))
    torch.library.opcheck(torch.ops.lomar_fast.irpe_bucket_reduce, (torch.randn(2, 3, 11, 11), buckets, 13))


@pytest.mark.parametrize("visible_only", [False, True])
def test_opcheck_gather_cpu(visible_only):
    images, windows, masks, n_mask = make_window_inputs(2, 2, 3, 5, 4)
    torch.library.opcheck(
        torch.ops.lomar_fast.gather_windows, (images, windows, masks, 4, 3, True, torch.float32, n_mask, visible_only)
    )


def irpe_bias_loops(q: torch.Tensor, table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """bias[n, h, i, j] = sum_d q[n, h, i, d] * T[d, bucket(i, j)], written out from DESIGN.md's formula."""
    n, h, length, _ = q.shape
    out = torch.empty(n, h, length, length, dtype=q.dtype)
    for i in range(length):
        for j in range(length):
            out[:, :, i, j] = (q[:, :, i, :] * table[:, buckets[i, j]]).sum(-1)
    return out


def test_irpe_op_cpu_matches_the_formula_values_and_grads():
    """The op on CPU, and its autograd (bucket reduction, then dq = G T^T and dT = q^T G), against the
    formula written out as loops (values) and autograd through those loops (gradients)."""
    torch.manual_seed(0)
    buckets = make_buckets(5)
    length = buckets.shape[0]
    q = torch.randn(3, 2, length, 8, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    q.requires_grad_(True)
    table = torch.randn(8, 50, dtype=torch.float64, requires_grad=True)
    out = _irpe_cuda.irpe_key_bias(q, table, buckets)
    want_out = irpe_bias_loops(q, table, buckets)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    grad = torch.randn(3, 2, length, length, dtype=torch.float64).transpose(-1, -2)  # non-contiguous
    got = torch.autograd.grad(out, (q, table), grad)
    want = torch.autograd.grad(want_out, (q, table), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bucket_reduce_cpu_matches_loop():
    torch.manual_seed(0)
    buckets = torch.randint(0, 7, (5, 5))
    grad = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    got = torch.ops.lomar_fast.irpe_bucket_reduce(grad, buckets, 7)
    want = torch.zeros(2, 3, 5, 7, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            want[:, :, i, buckets[i, j]] += grad[:, :, i, j]
    torch.testing.assert_close(got, want)


def test_irpe_op_compiles_as_one_node_cpu():
    """torch.compile keeps the op opaque (fake impl + registered autograd) and matches eager."""
    torch.manual_seed(0)
    buckets = make_buckets(3)
    length = buckets.shape[0]
    q = torch.randn(2, 3, length, 32, requires_grad=True)
    table = torch.randn(32, 50, requires_grad=True)

    def f(q, table):
        return (_irpe_cuda.irpe_key_bias(q, table, buckets) * 1.5).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, table)
    g_got = torch.autograd.grad(got, (q, table))
    want = f(q, table)
    g_want = torch.autograd.grad(want, (q, table))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def gather_loops(images: torch.Tensor, windows: torch.Tensor, masks: torch.Tensor, p: int, w: int,
                 norm_pix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The window gather written out from DESIGN.md: window patch (r, c) of window k of image b is grid patch
    (top + r, left + c); its vector is the ImageNet-normalized pixels in (row, col, channel) order; targets
    are the masked patches in ascending position, each normalized by its own mean and unbiased variance."""
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    b, k = windows.shape[:2]
    patches, targets = [], []
    for bi in range(b):
        img = (images[bi].double() / 255 - mean.double()) / std.double()  # (H, W, 3)
        for ki in range(k):
            top, left = int(windows[bi, ki, 0]), int(windows[bi, ki, 1])
            rows = []
            for r in range(w):
                for c in range(w):
                    y, x = (top + r) * p, (left + c) * p
                    rows.append(img[y:y + p, x:x + p, :].reshape(-1))
            win = torch.stack(rows)
            tgt = win[masks[bi, ki]]
            if norm_pix:
                tgt = (tgt - tgt.mean(-1, keepdim=True)) / (tgt.var(-1, keepdim=True) + 1e-6) ** 0.5
            patches.append(win)
            targets.append(tgt)
    return torch.stack(patches), torch.stack(targets)


def test_gather_op_cpu_matches_the_loops():
    images, windows, masks, n_mask = make_window_inputs(3, 2, 5, 9, 4)
    for norm_pix in (True, False):
        want_p, want_t = gather_loops(images, windows, masks, 4, 5, norm_pix)
        got_p, got_t = _window_gather_cuda.gather_windows_kernel(images, windows, masks, 4, 5, norm_pix,
                                                                 torch.float32, n_mask_of(masks, 5), False)
        torch.testing.assert_close(got_p.double(), want_p, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_t.double(), want_t, rtol=1e-4, atol=1e-4)
        bf_p, _ = _window_gather_cuda.gather_windows_kernel(images, windows, masks, 4, 5, norm_pix, torch.bfloat16,
                                                            n_mask, False)
        assert bf_p.dtype == torch.bfloat16
        torch.testing.assert_close(bf_p.double(), want_p, rtol=1e-2, atol=2e-2)
    vis, tgt = wg_mod.gather_windows(images, windows, masks, 4, 5, visible_only=True)
    full, _ = gather_loops(images, windows, masks, 4, 5, True)
    flat = masks.reshape(6, -1)
    for r in range(6):
        torch.testing.assert_close(vis[r].double(), full[r][~flat[r]], rtol=1e-5, atol=1e-5)
    assert tgt.shape == (6, n_mask, 48)


# ---------------------------------------------------------------------------------------------
# dispatch (CPU)
# ---------------------------------------------------------------------------------------------
class _Boom:
    def __getattr__(self, name):
        raise AssertionError(f"CUDA kernel module used for CPU tensors ({name})")


def test_cpu_tensors_take_reference_path_with_kernels_on(monkeypatch, kernels_on):
    monkeypatch.setitem(sys.modules, "lomar_fast.ops._irpe_cuda", _Boom())
    monkeypatch.setitem(sys.modules, "lomar_fast.ops._window_gather_cuda", _Boom())
    monkeypatch.setattr(ops_pkg, "_irpe_cuda", _Boom(), raising=False)
    monkeypatch.setattr(ops_pkg, "_window_gather_cuda", _Boom(), raising=False)

    buckets = make_buckets(5)
    q = torch.randn(2, 3, buckets.shape[0], 32)
    table = torch.randn(32, 50)
    torch.testing.assert_close(
        irpe_mod.irpe_key_bias(q, table, buckets), irpe_mod.irpe_key_bias_reference(q, table, buckets)
    )
    images, windows, masks, _ = make_window_inputs(2, 2, 5, 9, 4)
    got = wg_mod.gather_windows(images, windows, masks, 4, 5)
    want = wg_mod.gather_windows_reference(images, windows, masks, 4, 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_auto_defaults_follow_committed_gpu_results():
    """``auto`` turns a kernel on only when the committed GPU result shows it correct and faster than
    the compiled reference (forward+backward for iRPE, where gradients flow)."""
    import json

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h200" / "kernels.json"
    rows = {r["name"]: r for r in json.loads(results.read_text())["results"]}

    def wins(name):
        r = rows[name]
        return bool(r["correct"]) and r["kernel_over_compiled"] < 1.0

    assert wg_mod.AUTO_USES_KERNEL is wins("window_gather")
    assert irpe_mod.AUTO_USES_KERNEL is (wins("irpe_fwd_bwd") and wins("irpe_attention"))


def test_auto_falls_back_without_cupy(monkeypatch):
    from lomar_fast.ops import _dispatch

    class FakeCuda:
        is_cuda = True

    monkeypatch.setattr(_dispatch, "_cupy_ok", False)
    monkeypatch.setenv("LOMAR_KERNELS", "auto")
    assert _dispatch.use_kernel(FakeCuda(), auto_default=True) is False
    monkeypatch.setattr(_dispatch, "_cupy_ok", True)
    assert _dispatch.use_kernel(FakeCuda(), auto_default=True) is True
    monkeypatch.setenv("LOMAR_KERNELS", "off")
    assert _dispatch.use_kernel(FakeCuda(), auto_default=True) is False


# ---------------------------------------------------------------------------------------------
# benchmark code path (CPU)
# ---------------------------------------------------------------------------------------------
def test_benchmark_cpu_smoke(tmp_path, monkeypatch):
    from benchmarks import kernels as bench

    run_case, on_disk = bench.run_case, []

    def recording_run_case(*a, **kw):  # what a run cut off before this case would have left
        path = tmp_path / "kernels.json"
        doc = json.loads(path.read_text()) if path.exists() else None
        on_disk.append(None if doc is None else (doc["complete"], len(doc["results"])))
        return run_case(*a, **kw)

    monkeypatch.setattr(bench, "run_case", recording_run_case)
    bench.main(["--cpu-smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert on_disk == [None] + [(False, i) for i in range(1, len(on_disk))] and data["complete"] is True
    assert data["mode"] == "cpu-smoke"
    assert {"device", "torch", "config", "results"} <= set(data)
    names = {r["name"] for r in data["results"]}
    assert {"window_gather", "irpe_fwd", "irpe_fwd_bwd"} <= names
    compared = 0
    for r in data["results"]:
        assert r["reference_eager"]["median_ms"] > 0 and len(r["reference_eager"]["times_ms"]) >= 1
        assert r["correct"] is True
        if "kernel" in r:  # the pure-PyTorch rows ([bmm path], [math path]) run here: compared with the reference
            assert r["max_rel_err"]["kernel"] <= r["tolerance"], r["name"]
            compared += 1
        else:  # no CUDA kernel on a CPU: "correct" only says the reference ran
            assert r["max_rel_err"] == {}, r["name"]
    assert compared >= 4
    assert (tmp_path / "kernels.md").read_text().startswith("#")


def test_benchmark_cases_option_runs_the_named_cases_only(tmp_path, monkeypatch):
    from benchmarks import kernels as bench

    monkeypatch.setenv("LOMAR_FLEX_OPTIONS", '{"WRITE_DQ": false}')
    bench.main(["--cpu-smoke", "--out", str(tmp_path), "--cases", "irpe_fwd", "window_attention_fwd"])
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["name"] for r in data["results"]] == ["irpe_fwd", "window_attention_fwd"]  # the benchmark's order
    assert data["env"]["LOMAR_FLEX_OPTIONS"] == '{"WRITE_DQ": false}'  # the report says what the run was under
    with pytest.raises(SystemExit, match=r"--cases: no case window_attention_fwd\[mma\] in this run"):
        bench.main(["--cpu-smoke", "--out", str(tmp_path), "--cases", "window_attention_fwd[mma]"])


def test_benchmark_gather_references_trace_whole_as_the_model_runs_them():
    """The compiled gather references are timed as the model's step runs them: given the masked count, with no
    read-back of the masks (a host sync and a graph break, which the H200 run of 2026-11-27 timed)."""
    from benchmarks import kernels as bench

    cfg = dict(bench.SMOKE_CONFIG)
    cases = {c["name"]: c for c in bench.build_cases(bench.make_inputs(cfg, "cpu"), cfg, "cpu", with_kernels=False)}
    for name in ("window_gather", "window_gather_visible"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(cases[name]["reference"])()
        assert explained.graph_break_count == 0, (name, explained.break_reasons)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_benchmark_without_gpu_exits_clearly(tmp_path):
    from benchmarks import kernels as bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--out", str(tmp_path)])
    assert "GPU" in str(exc.value.code)


# ---------------------------------------------------------------------------------------------
# GPU: kernels vs reference
# ---------------------------------------------------------------------------------------------
GATHER_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
TARGET_TOL = dict(rtol=1e-4, atol=1e-4)
IRPE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _check_gather(images, windows, masks, p, w, n_mask, out_dtype, norm_pix):
    with launched() as names:
        got_p, got_t = wg_mod.gather_windows(images, windows, masks, p, w, norm_pix, out_dtype)
    assert names and all(n.startswith("window_gather<") for n in names), names  # the kernel ran, not the fallback
    ref_p, ref_t = wg_mod.gather_windows_reference(images, windows, masks, p, w, norm_pix, out_dtype)
    assert got_p.dtype == out_dtype and got_p.shape == ref_p.shape
    assert got_t.dtype == torch.float32 and got_t.shape == ref_t.shape
    torch.testing.assert_close(got_p.float(), ref_p.float(), **GATHER_TOL[out_dtype])
    torch.testing.assert_close(got_t, ref_t, **TARGET_TOL)
    with launched() as names:
        vis_p, vis_t = wg_mod.gather_windows(images, windows, masks, p, w, norm_pix, out_dtype, n_mask=n_mask,
                                             visible_only=True)
    assert names, "the visible-only gather fell back to PyTorch"
    ref_vp, _ = wg_mod.gather_visible_reference(images, windows, masks, p, w, norm_pix, out_dtype)
    torch.testing.assert_close(vis_p.float(), ref_vp.float(), **GATHER_TOL[out_dtype])
    torch.testing.assert_close(vis_t, ref_t, **TARGET_TOL)


@gpu_test
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("p", [4, 16])
def test_gpu_gather_uint8_odd_shapes(kernels_on, p, out_dtype, norm_pix):
    images, windows, masks, n_mask = make_window_inputs(3, 2, 5, 9, p, device="cuda")
    _check_gather(images, windows, masks, p, 5, n_mask, out_dtype, norm_pix)
    assert ("window_gather.cu", torch.cuda.current_device()) in cb._modules  # the kernel ran


@gpu_test
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_gpu_gather_float_nchw_non_contiguous(kernels_on, in_dtype):
    images, windows, masks, n_mask = make_window_inputs(3, 2, 5, 9, 16, device="cuda", seed=3)
    # normalized float NCHW as a channels_last view (non-contiguous NCHW strides)
    float_images = wg_mod.normalize_images(images).to(in_dtype).contiguous(memory_format=torch.channels_last)
    assert not float_images.is_contiguous()
    # windows / masks as non-contiguous views of larger tensors
    windows_nc = torch.stack([windows, windows + 0], dim=0)[0].transpose(0, 1).contiguous().transpose(0, 1)
    masks_nc = torch.cat([masks, masks], dim=-1)[..., : masks.shape[-1]]
    assert not masks_nc.is_contiguous()
    for out_dtype in DTYPES:
        _check_gather(float_images, windows_nc, masks_nc, 16, 5, n_mask, out_dtype, True)


@gpu_test
def test_gpu_gather_uint8_non_contiguous_images(kernels_on):
    images, windows, masks, n_mask = make_window_inputs(3, 2, 5, 9, 16, device="cuda", seed=4)
    big = torch.zeros(3, 150, 150, 4, dtype=torch.uint8, device="cuda")
    big[:, 3:147, 2:146, :3] = images
    view = big[:, 3:147, 2:146, :3]
    assert not view.is_contiguous()
    _check_gather(view, windows, masks, 16, 5, n_mask, torch.bfloat16, True)


@gpu_test
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_gpu_gather_vit_b_shapes(kernels_on, out_dtype):
    images, windows, masks, n_mask = make_window_inputs(8, 4, 7, 14, 16, device="cuda", seed=5)
    assert n_mask == 39
    _check_gather(images, windows, masks, 16, 7, n_mask, out_dtype, True)


def _irpe_truth(q, table, buckets, grad):
    q64 = q.detach().double().requires_grad_(True)
    t64 = table.detach().double().requires_grad_(True)
    out = irpe_mod.irpe_key_bias_reference(q64, t64, buckets)
    dq, dt = torch.autograd.grad(out, (q64, t64), grad.double())
    return out, dq, dt


def _check_irpe(q, table, buckets, grad):
    dtype = q.dtype
    tol = IRPE_TOL[dtype]
    q = q.detach().requires_grad_(True)
    table = table.detach().requires_grad_(True)
    with launched() as fwd:
        out = irpe_mod.irpe_key_bias(q, table, buckets)
    assert [n.split("<")[0] for n in fwd] == ["irpe_fwd"], fwd  # the kernel ran, not the fallback
    n, h, length, _ = q.shape
    lp = (length + 7) // 8 * 8
    assert out.dtype == dtype and out.shape == (n, h, length, length)
    assert out.stride() == (h * length * lp, length * lp, lp, 1)
    padding = torch.as_strided(out, (n, h, length, lp), out.stride(), out.storage_offset())[..., length:]
    assert bool((padding == 0).all())
    with launched() as bwd:
        dq, dt = torch.autograd.grad(out, (q, table), grad)
    assert "irpe_bwd_reduce" in [n.split("<")[0] for n in bwd], bwd
    want, want_dq, want_dt = _irpe_truth(q, table.to(dtype), buckets, grad)
    ref = irpe_mod.irpe_key_bias_reference(q.detach(), table.detach(), buckets)
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    assert rel_err(out, want) <= tol
    assert dq.dtype == dtype and dt.dtype == table.dtype
    assert rel_err(dq, want_dq) <= tol, rel_err(dq, want_dq)
    assert rel_err(dt, want_dt) <= tol, rel_err(dt, want_dt)


@gpu_test
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_irpe_odd_shapes(kernels_on, dtype, head_dim):
    torch.manual_seed(0)
    buckets = make_buckets(5).cuda()  # w=5 -> L=26
    n, h, length = 3 * 2, 3, buckets.shape[0]
    q = torch.randn(n, h, length, head_dim, device="cuda", dtype=dtype)
    table = torch.randn(head_dim, 50, device="cuda") * 0.1
    grad = torch.randn(n, h, length, length, device="cuda", dtype=dtype)
    _check_irpe(q, table, buckets, grad)
    assert ("irpe.cu", torch.cuda.current_device()) in cb._modules  # the kernel ran


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_irpe_vit_b_non_contiguous(kernels_on, dtype):
    torch.manual_seed(1)
    buckets = make_buckets(7).cuda()  # L=50
    n, h, length, d = 32, 12, buckets.shape[0], 64
    qkv = torch.randn(n, length, 3, h, d, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
    q = qkv[0]  # (N, H, L, D) with the strides of a fused qkv projection
    assert not q.is_contiguous()
    table = (torch.randn(50, d, device="cuda") * 0.1).t()  # non-contiguous table
    grad = torch.randn(n, h, length, length, device="cuda", dtype=dtype).transpose(-1, -2)  # non-contiguous grad
    _check_irpe(q, table, buckets, grad)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_irpe_bias_feeds_sdpa(kernels_on, dtype):
    """The padded-stride bias works as SDPA's attn_mask and gives the reference's attention and grads."""
    torch.manual_seed(2)
    buckets = make_buckets(7).cuda()
    n, h, length, d = 16, 12, buckets.shape[0], 64
    q, k, v = (torch.randn(n, h, length, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    table = (torch.randn(d, 50, device="cuda") * 0.1).requires_grad_(True)

    def attn(bias_fn):
        bias = bias_fn(q, table, buckets)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    go = torch.randn(n, h, length, d, device="cuda", dtype=dtype)
    got = attn(irpe_mod.irpe_key_bias)
    g_got = torch.autograd.grad(got, (q, k, v, table), go)
    want = attn(irpe_mod.irpe_key_bias_reference)
    g_want = torch.autograd.grad(want, (q, k, v, table), go)
    assert rel_err(got, want) <= IRPE_TOL[dtype]
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) <= 3 * IRPE_TOL[dtype], rel_err(a, b)


class _AttnBlock(torch.nn.Module):
    def __init__(self, dim=192, heads=3, buckets=None):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.table = torch.nn.Parameter(torch.randn(1, dim // heads, 50) * 0.1)
        self.register_buffer("buckets", buckets)

    def forward(self, x):
        b, length, c = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = irpe_mod.irpe_key_bias(q, self.table[0], self.buckets)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, length, c))


@gpu_test
def test_gpu_torch_compile_attention_block_matches_eager(kernels_on):
    torch.manual_seed(3)
    buckets = make_buckets(5).cuda()
    block = _AttnBlock(buckets=buckets).cuda()
    x = torch.randn(6, buckets.shape[0], 192, device="cuda", requires_grad=True)
    want = block(x)
    g_want = torch.autograd.grad(want.square().sum(), [x, *block.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(block)
    got = compiled(x)
    g_got = torch.autograd.grad(got.square().sum(), [x, *block.parameters()])
    assert rel_err(got, want) <= 1e-4
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) <= 1e-3, rel_err(a, b)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_opcheck(dtype):
    torch.manual_seed(4)
    buckets = make_buckets(3).cuda()
    length = buckets.shape[0]
    q = torch.randn(2, 3, length, 32, device="cuda", dtype=dtype, requires_grad=True)
    table = torch.randn(32, 50, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.lomar_fast.irpe_key_bias, (q, table, buckets))
    grad = torch.randn(2, 3, length, length, device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.lomar_fast.irpe_bucket_reduce, (grad, buckets, 50))
    images, windows, masks, n_mask = make_window_inputs(2, 2, 3, 5, 4, device="cuda")
    for visible_only in (False, True):
        torch.library.opcheck(
            torch.ops.lomar_fast.gather_windows, (images, windows, masks, 4, 3, True, dtype, n_mask, visible_only)
        )


# ---------------------------------------------------------------------------------------------
# CPU emulation of the kernels (catches indexing errors without a GPU)
# ---------------------------------------------------------------------------------------------
# The emulation layer and the .cu -> host C++ conversion live in tests/kernel_emulation.py.
_EMU_ENTRY = r"""
extern "C" {
void irpe_fwd_f32_32(const float* q, long long a, long long b, long long c, long long d, const float* t,
                     const long long* bk, float* out, int H, int L, int NB, int Lp, long long M, int grid) {
  emu_launch(grid, 256, [&] { irpe_ns::irpe_fwd<float, 32>(q, a, b, c, d, t, bk, out, H, L, NB, Lp, M); });
}
void irpe_fwd_bf16_128(const irpe_ns::lomar_bf16* q, long long a, long long b, long long c, long long d,
                       const irpe_ns::lomar_bf16* t, const long long* bk, irpe_ns::lomar_bf16* out, int H, int L, int NB,
                       int Lp, long long M, int grid) {
  emu_launch(grid, 256, [&] { irpe_ns::irpe_fwd<irpe_ns::lomar_bf16, 128>(q, a, b, c, d, t, bk, out, H, L, NB, Lp, M); });
}
void irpe_fwd_f32_64(const float* q, long long a, long long b, long long c, long long d, const float* t,
                     const long long* bk, float* out, int H, int L, int NB, int Lp, long long M, int grid) {
  emu_launch(grid, 256, [&] { irpe_ns::irpe_fwd<float, 64>(q, a, b, c, d, t, bk, out, H, L, NB, Lp, M); });
}
void irpe_bwd_f32(const float* g, long long a, long long b, long long c, long long d, const long long* bk, float* G,
                  int H, int L, int NB, long long M, int rows, int parts, int grid) {
  emu_launch(grid, rows * parts, [&] { irpe_ns::irpe_bwd_reduce<float>(g, a, b, c, d, bk, G, H, L, NB, M, rows, parts); });
}
void gather_u8_bf16(const unsigned char* img, long long sb, long long sc, long long sy, long long sx,
                    const long long* win, const unsigned char* m, window_gather_ns::lomar_bf16* P, float* T,
                    int K, int p, int w, int nm, int vis, int np_, float m0, float m1, float m2,
                    float s0, float s1, float s2, int grid) {
  emu_launch(grid, 256, [&] {
    window_gather_ns::window_gather<unsigned char, window_gather_ns::lomar_bf16>(
        img, sb, sc, sy, sx, win, m, P, T, K, p, w, nm, vis, np_, m0, m1, m2, s0, s1, s2);
  });
}
void gather_f32_f32(const float* img, long long sb, long long sc, long long sy, long long sx,
                    const long long* win, const unsigned char* m, float* P, float* T,
                    int K, int p, int w, int nm, int vis, int np_, float m0, float m1, float m2,
                    float s0, float s1, float s2, int grid) {
  emu_launch(grid, 256, [&] {
    window_gather_ns::window_gather<float, float>(
        img, sb, sc, sy, sx, win, m, P, T, K, p, w, nm, vis, np_, m0, m1, m2, s0, s1, s2);
  });
}
}
"""


def _emulation_source_with(entry: str) -> str:
    return emulation_source(((_irpe_cuda.SOURCE, "irpe_ns"), (_window_gather_cuda.SOURCE, "window_gather_ns")), entry)


def _emulation_source() -> str:
    return _emulation_source_with(_EMU_ENTRY)


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return build_library(_emulation_source(), tmp_path_factory.mktemp("emu"))


def test_emulated_irpe_kernels_match_reference(emu_lib):
    torch.manual_seed(0)
    n, h, length, d, nb = 3, 2, 26, 32, 50  # N > 1: a sequence stride mixed up with a head stride shows
    q = torch.randn(n, length, 3, h, d).permute(2, 0, 3, 1, 4)[0]  # fused-qkv strides
    table = torch.randn(d, nb)
    buckets = torch.randint(0, nb, (length, length))
    lp, m = 32, n * h * length
    buf = torch.full((n, h, length, lp), 7.0)
    emu_lib.irpe_fwd_f32_32(*_c_args(q, *(("ll", s) for s in q.stride()), table, buckets, buf, h, length, nb, lp,
                                     ("ll", m), 2))
    torch.testing.assert_close(buf[..., :length], irpe_mod.irpe_key_bias_reference(q, table, buckets))
    assert bool((buf[..., length:] == 0).all())

    grad = torch.randn(n, h, length, length).transpose(-1, -2)
    want = torch.ops.lomar_fast.irpe_bucket_reduce(grad, buckets, nb)
    for rows in (32, 8):
        got = torch.full((n, h, length, nb), 5.0)
        emu_lib.irpe_bwd_f32(*_c_args(grad, *(("ll", s) for s in grad.stride()), buckets, got, h, length, nb,
                                      ("ll", m), rows, 128 // rows, 2))
        torch.testing.assert_close(got, want)


def test_emulated_fp16_conversions_match_torch(tmp_path):
    """The emulation's stand-ins for PTX cvt.f32.f16 / cvt.rn.f16.f32 against torch's conversions: every half
    value, and floats around each rounding boundary (ties to even, subnormals, the overflow edge, NaN, -0)."""
    entry = r"""extern "C" {
void h2f(const unsigned short* h, float* f, int n) { for (int i = 0; i < n; ++i) f[i] = emu_f16_to_f32(h[i]); }
void f2h(const float* f, unsigned short* h, int n) { for (int i = 0; i < n; ++i) h[i] = emu_f32_to_f16(f[i]); }
}"""
    lib = build_library(emulation_source((), entry), tmp_path, "fp16")
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    got = torch.empty(65536)
    lib.h2f(*_c_args(halves, got, 65536))
    want = halves.view(torch.float16).float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    finite = want[want.isfinite()].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # exact ties (representable in fp32)
    floats = torch.cat([finite, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                        torch.randn(20000) * 300, torch.tensor([65504.0, 65519.99, 65520.0, 1e9, -0.0, 6e-8, 3e-8,
                                                               float("inf"), float("-inf"), float("nan")])])
    out = torch.empty(floats.numel(), dtype=torch.int16)
    lib.f2h(*_c_args(floats, out, floats.numel()))
    want_h = floats.half().view(torch.int16)
    nan = floats.isnan()
    assert torch.equal(out[~nan], want_h[~nan])
    assert bool(out[nan].view(torch.float16).isnan().all())


@pytest.mark.parametrize("nb", [3, 33, 97, 256])  # 256 buckets: exactly the 48 KB a block has
def test_emulated_irpe_kernels_at_other_head_dims_and_bucket_counts(emu_lib, nb):
    torch.manual_seed(0)
    n, h, length, lp = 2, 3, 37, 40
    m = n * h * length
    for d, fn, dtype in ((128, "irpe_fwd_bf16_128", torch.bfloat16), (64, "irpe_fwd_f32_64", torch.float32)):
        q = torch.randn(n, length, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)[0]
        table = torch.randn(d, nb).to(dtype)
        buckets = torch.randint(0, nb, (length, length))
        assert _irpe_cuda._fwd_shared_bytes(d, nb) <= _irpe_cuda.MAX_SHARED
        buf = torch.full((n, h, length, lp), 7.0).to(dtype)
        getattr(emu_lib, fn)(*_c_args(q, *(("ll", s) for s in q.stride()), table, buckets, buf, h, length, nb, lp,
                                      ("ll", m), 3))
        want = irpe_mod.irpe_key_bias_reference(q.double(), table.double(), buckets)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(buf[..., :length].double(), want, rtol=tol, atol=tol * want.abs().max().item())
        assert bool((buf[..., length:] == 0).all())  # the padding columns
    grad = torch.randn(n, h, length, length).transpose(-1, -2)
    rows = _irpe_cuda._bwd_tile(length, nb)
    if rows is not None:
        got = torch.full((n, h, length, nb), 5.0)
        emu_lib.irpe_bwd_f32(*_c_args(grad, *(("ll", s) for s in grad.stride()), buckets, got, h, length, nb,
                                      ("ll", m), rows, 128 // rows, 3))
        torch.testing.assert_close(got, torch.ops.lomar_fast.irpe_bucket_reduce(grad, buckets, nb))


@pytest.mark.parametrize("p", [4, 16])  # 16: a patch has more values (768) than a block threads
@pytest.mark.parametrize("visible_only,norm_pix", [(False, True), (True, True), (False, False)])
def test_emulated_window_gather_matches_reference(emu_lib, visible_only, norm_pix, p):
    b, k, w, grid = 2, 3, 3, 5  # K > 1: the image of a (image, window) row must be row / K
    images, windows, masks, n_mask = make_window_inputs(b, k, w, grid, p, seed=7)
    big = torch.zeros(b, grid * p + 2, grid * p + 1, 4, dtype=torch.uint8)
    big[:, 1:-1, 1:, :3] = images
    view = big[:, 1:-1, 1:, :3]  # non-contiguous NHWC
    v = p * p * 3
    rows = w * w - n_mask if visible_only else w * w
    patches = torch.zeros((b * k, rows, v), dtype=torch.bfloat16)
    targets = torch.full((b * k, n_mask, v), 9.0)
    s = view.stride()
    emu_lib.gather_u8_bf16(*_c_args(view, ("ll", s[0]), ("ll", s[3]), ("ll", s[1]), ("ll", s[2]), windows,
                                    masks.view(torch.uint8), patches, targets, k, p, w, n_mask, int(visible_only),
                                    int(norm_pix), *map(float, wg_mod.IMAGENET_MEAN), *map(float, wg_mod.IMAGENET_STD),
                                    b * k * w * w))
    ref = wg_mod.gather_visible_reference if visible_only else wg_mod.gather_windows_reference
    want_p, want_t = ref(view, windows, masks, p, w, norm_pix, torch.bfloat16)
    torch.testing.assert_close(patches.float(), want_p.float(), **GATHER_TOL[torch.bfloat16])
    torch.testing.assert_close(targets, want_t, **TARGET_TOL)


_CHECK_ENTRY = r"""
#include <cstdio>
#include <random>
int main() {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  {  // iRPE forward (fp32, head_dim 64) and backward reduction at L = 50, NB = 50: 2 blocks over 100 rows
    const int n = 1, h = 2, L = 50, D = 64, NB = 50, Lp = LP, rows = ROWS;
    const long long M = (long long)n * h * L;
    std::vector<float> q((size_t)M * D), t((size_t)D * NB), out((size_t)M * Lp), g((size_t)M * L), G((size_t)M * NB);
    std::vector<long long> bk((size_t)L * L);
    for (auto& x : q) x = nd(rng);
    for (auto& x : t) x = nd(rng);
    for (auto& x : g) x = nd(rng);
    for (auto& x : bk) x = rng() % NB;
    emu_launch_sized(2, 256, FWD_BYTES, [&] { irpe_ns::irpe_fwd<float, D>(q.data(), (long long)h * L * D, (long long)L * D, D, 1, t.data(),
                                                         bk.data(), out.data(), h, L, NB, Lp, M); });
    emu_launch_sized(2, 128, BWD_BYTES, [&] { irpe_ns::irpe_bwd_reduce<float>(g.data(), (long long)h * L * L, (long long)L * L, L, 1,
                                                             bk.data(), G.data(), h, L, NB, M, rows, 128 / rows); });
    std::printf("irpe\n");
  }
  for (int vis = 0; vis < 2; ++vis) {  // window gather: p = 16 (768 values a patch, 256 threads), norm-pix targets
    const int B = 1, K = 1, w = 2, p = 16, grid = 3, nm = 3, S = grid * p, V = p * p * 3;
    std::vector<unsigned char> img((size_t)B * S * S * 3), masks = {1, 0, 1, 1};
    for (auto& x : img) x = rng() % 256;
    std::vector<long long> win = {1, 0};
    std::vector<window_gather_ns::lomar_bf16> P((size_t)B * K * w * w * V);
    std::vector<float> T((size_t)B * K * nm * V);
    emu_launch_sized(B * K * w * w, 256, 4 * V, [&] {
      window_gather_ns::window_gather<unsigned char, window_gather_ns::lomar_bf16>(
          img.data(), (long long)S * S * 3, 1, (long long)S * 3, 3, win.data(), masks.data(), P.data(), T.data(), K, p,
          w, nm, vis, 1, 0.485f, 0.456f, 0.406f, 0.229f, 0.224f, 0.225f);
    });
    std::printf("gather %d\n", vis);
  }
  return 0;
}
"""


@pytest.mark.slow  # a sanitizer build and run
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_emulated_kernels_have_no_race_and_stay_inside_their_shared_memory(tmp_path, sanitizer):
    """The iRPE forward and backward reduction and the window gather (both outputs), each launch given exactly the
    dynamic shared memory the wrapper asks for: under ThreadSanitizer (every emulated GPU thread a host thread) no
    thread reads shared memory another wrote without a barrier between them; under AddressSanitizer no access
    falls past the shared memory or a buffer (tests/test_window_attention.py shows both checks finding a fault
    put into a kernel)."""
    length, nb, d = 50, 50, 64
    rows = _irpe_cuda._bwd_tile(length, nb)
    values = {"LP": _irpe_cuda.padded_length(length), "ROWS": rows, "FWD_BYTES": _irpe_cuda._fwd_shared_bytes(d, nb),
              "BWD_BYTES": 4 * (2 * rows * (length | 1) + _irpe_cuda.BWD_THREADS * (nb | 1))}
    entry = _CHECK_ENTRY
    for name, value in values.items():
        entry = entry.replace(name, str(value))
    exe = build_sanitized(_emulation_source_with(entry), tmp_path, sanitizer)
    status, out, reports = run_sanitized(exe, sanitizer)
    assert status == 0 and reports == 0, out[-6000:]
    assert out.split() == ["irpe", "gather", "0", "gather", "1"], out[-3000:]


def test_emulated_visible_only_gather_writes_no_row_past_a_window_with_too_few_masked(emu_lib):
    """With validate=False a caller's mask may hold fewer masked patches than n_mask in a window; the kernel
    then has one visible patch too many there, which went to the next window's first row, or past the end of
    the output for the last window. It is dropped now."""
    b, k, w, p, grid = 1, 2, 3, 4, 5
    images, windows, masks, n_mask = make_window_inputs(b, k, w, grid, p, seed=7)
    masks = masks.clone()
    last = masks[0, 1]
    last[last.nonzero()[0, 0]] = False  # the last window masks one patch fewer than n_mask
    v, rows = p * p * 3, w * w - n_mask
    store = torch.zeros((b * k * rows + 1, v), dtype=torch.bfloat16)  # one canary row after the output
    patches = store[: b * k * rows].view(b * k, rows, v)
    targets = torch.full((b * k, n_mask, v), 9.0)
    s = images.stride()
    emu_lib.gather_u8_bf16(*_c_args(images, ("ll", s[0]), ("ll", s[3]), ("ll", s[1]), ("ll", s[2]), windows,
                                    masks.view(torch.uint8), patches, targets, k, p, w, n_mask, 1, 1,
                                    *map(float, wg_mod.IMAGENET_MEAN), *map(float, wg_mod.IMAGENET_STD), b * k * w * w))
    assert bool((store[-1] == 0).all()), "a visible patch was written past the end of the output"
    want_p, _ = wg_mod.gather_visible_reference(images, windows[:, :1], masks[:, :1], p, w, True, torch.bfloat16)
    torch.testing.assert_close(patches[:1].float(), want_p.float(), **GATHER_TOL[torch.bfloat16])  # untouched


def test_gather_kernel_leaves_room_for_its_static_shared_memory():
    """48 KB per block holds the dynamic patch buffer and the kernel's own arrays together: patch size 64
    (exactly 48 KB of patch values) would fail to launch, so it takes the reference path."""
    assert _window_gather_cuda.fits_shared(16) and _window_gather_cuda.fits_shared(63)
    assert not _window_gather_cuda.fits_shared(64)


@pytest.mark.parametrize("visible_only", [False, True])
def test_emulated_window_gather_of_float_nchw_images_to_fp32(emu_lib, visible_only):
    """The float input path (normalized NCHW images, read through their channel stride; the wrapper passes the
    ImageNet mean/std, which float inputs must not get again) with fp32 patches, on a non-contiguous view, K = 3
    windows per image."""
    b, k, w, p, grid = 3, 3, 3, 4, 5
    images_u8, windows, masks, n_mask = make_window_inputs(b, k, w, grid, p, seed=11)
    x = (images_u8.permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25  # already normalized floats
    big = torch.zeros(b, 4, grid * p + 1, grid * p + 3)
    big[:, :3, 1:, 2:-1] = x
    view = big[:, :3, 1:, 2:-1]  # non-contiguous NCHW
    v = p * p * 3
    rows = w * w - n_mask if visible_only else w * w
    patches = torch.full((b * k, rows, v), 5.0)
    targets = torch.full((b * k, n_mask, v), 9.0)
    s = view.stride()
    emu_lib.gather_f32_f32(*_c_args(view, ("ll", s[0]), ("ll", s[1]), ("ll", s[2]), ("ll", s[3]), windows,
                                    masks.view(torch.uint8), patches, targets, k, p, w, n_mask, int(visible_only), 1,
                                    *map(float, wg_mod.IMAGENET_MEAN), *map(float, wg_mod.IMAGENET_STD),  # as launched
                                    b * k * w * w))
    ref = wg_mod.gather_visible_reference if visible_only else wg_mod.gather_windows_reference
    want_p, want_t = ref(view, windows, masks, p, w, True, torch.float32)
    torch.testing.assert_close(patches, want_p, **GATHER_TOL[torch.float32])
    torch.testing.assert_close(targets, want_t, **TARGET_TOL)


def test_launch_wraps_torchs_stream_once_and_keeps_cupys_deprecation_notice_out(monkeypatch):
    """Each launch runs on PyTorch's current stream of its GPU. CuPy 14 deprecates ExternalStream (a warning on
    every launch, an error under -W error); the handle is made once per stream, with the notice silenced."""
    import types
    import warnings

    from lomar_fast.ops import _cuda_build as cb

    made, entered, calls = [], [], []

    class Ctx:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class ExternalStream(Ctx):
        def __init__(self, ptr, device_id=-1):
            warnings.warn("ExternalStream is deprecated", DeprecationWarning)
            self.ptr = ptr
            made.append((ptr, device_id))

        def __enter__(self):
            entered.append(self.ptr)
            return self

    current = {"ptr": 4242}
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda i: Ctx(), ExternalStream=ExternalStream))
    monkeypatch.setattr(cb, "_import_cupy", lambda: fake)
    monkeypatch.setattr(cb, "get_module", lambda *a: types.SimpleNamespace(
        get_function=lambda name: lambda grid, block, args, shared_mem=0: calls.append((name, grid, block, shared_mem))))
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda index: types.SimpleNamespace(cuda_stream=current["ptr"] + index))
    monkeypatch.setattr(cb, "_STREAMS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ptr in (4242, 4242, 7000, 4242, 7000):  # e.g. a side stream for a while
            current["ptr"] = ptr
            cb.launch("window_gather.cu", ("k",), "k", torch.device("cuda", 1), 5, 256, (), 64)
    assert made == [(4243, 1), (7001, 1)]
    assert entered == [4243, 4243, 7001, 4243, 7001]  # each launch on the stream current at its call
    assert calls == [("k", (5,), (256,), 64)] * 5

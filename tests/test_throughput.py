"""The throughput benchmark: FLOP formulas against hand counts, and one end-to-end CPU run of the harness.

No speed is asserted: images/sec, MFU and memory come from the benchmark's own results, never from tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lomar_fast import flops

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- FLOPs
def hand_vit_b16_224_macs() -> int:
    """ViT-B/16 at 224 counted by hand: 196 patches + cls = 197 tokens, width 768, 12 blocks, MLP 3072."""
    tokens, d, hidden = 197, 768, 3072
    per_block = (tokens * d * 3 * d  # qkv
                 + 12 * tokens * tokens * 64  # q @ k^T, 12 heads of 64
                 + 12 * tokens * tokens * 64  # att @ v
                 + tokens * d * d  # proj
                 + tokens * d * hidden + tokens * hidden * d)  # fc1, fc2
    patch_embed = 196 * 768 * (16 * 16 * 3)
    head = 768 * 1000
    return 12 * per_block + patch_embed + head


def test_vit_b16_forward_macs_match_hand_count():
    got = flops.vit_forward_macs(224, 16, 768, 12)
    want = hand_vit_b16_224_macs()
    assert abs(got - want) / want < 0.01
    assert 17.4e9 < got < 17.8e9  # the familiar ~17.6 GMACs


def test_vit_macs_grow_with_tokens():
    # attention is quadratic in the tokens, everything else linear: 384 costs more than (384/224)^2 x 224
    ratio = flops.vit_forward_macs(384) / flops.vit_forward_macs(224)
    assert ratio > (24 * 24 + 1) / (14 * 14 + 1)


def test_lomar_and_mae_training_flops_near_design_numbers():
    import torch

    from lomar_fast.models import create_model

    with torch.device("meta"):  # shapes only: the formula reads the model's sizes, not its weights
        lomar = flops.training_flops_per_image(create_model("lomar_vit_base_patch16"))
        mae = flops.training_flops_per_image(create_model("mae_vit_base_patch16"))
    assert abs(lomar / 105e9 - 1) < 0.10, lomar
    assert abs(mae / 59e9 - 1) < 0.10, mae
    # independent hand count of LoMaR: 4 windows x (49 patch tokens + cls) through 12 blocks + embed + head
    t, d = 50, 768
    block = 12 * t * d * d + 2 * t * t * d + t * d * 50  # linear layers, attention, iRPE q@T
    per_window = 12 * block + 2 * 49 * 768 * 768
    assert lomar == 2 * 3 * 4 * per_window


def test_lomar_flops_do_not_depend_on_image_size_but_mae_flops_do():
    from lomar_fast.models import create_model

    lomar = [flops.model_forward_macs(create_model("lomar_vit_tiny_patch16", img_size=s)) for s in (224, 448)]
    mae = [flops.model_forward_macs(create_model("mae_vit_tiny_patch16", img_size=s)) for s in (224, 448)]
    assert lomar[0] == lomar[1]
    assert mae[1] > 3.5 * mae[0]
    # the DESIGN's crossover: MAE costs more than LoMaR per image somewhere between 224 and 384
    assert flops.mae_forward_macs(224) < flops.lomar_forward_macs() < flops.mae_forward_macs(384)


def test_flops_of_unknown_model_is_an_error():
    with pytest.raises(TypeError, match="no FLOP formula"):
        flops.model_forward_macs(object())


# --------------------------------------------------------------------------------------------- harness pieces
def test_failing_variant_is_recorded_not_raised():
    from benchmarks.throughput import Result, guarded

    def boom():
        raise RuntimeError("CUDA kernel window_gather failed to build")

    r = guarded(Result("m", "lomar", 224, "compile+kernels", 8), boom)
    assert r.status == "error" and "window_gather failed" in r.error
    r = guarded(Result("m", "mae", 224, "eager", 8), lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.")))
    assert r.status == "oom"


def test_profile_groups():
    from benchmarks.throughput import profile_group

    assert profile_group("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert profile_group("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert profile_group("aten::addmm") == "matmul"
    assert profile_group("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert profile_group("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert profile_group("void at::native::_fused_adamw_kernel_cuda") == "optimizer"
    assert profile_group("void at::native::gather_kernel<...>") == "gather"
    assert profile_group("triton_poi_fused_add_native_layer_norm_3") == "fused elementwise (triton)"
    assert profile_group("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL") == "communication"


def test_speedups_pair_lomar_with_mae_per_size():
    from benchmarks.throughput import speedups

    rows = [dict(kind="lomar", size=448, variant="eager", status="ok", images_per_sec=300.0),
            dict(kind="mae", size=448, variant="eager", status="ok", images_per_sec=100.0),
            dict(kind="lomar", size=448, variant="compile", status="ok", images_per_sec=400.0),
            dict(kind="mae", size=448, variant="compile", status="error", images_per_sec=None)]
    out = {(s["variant"]): s["lomar_over_mae"] for s in speedups(rows)}
    assert out == {"eager": 3.0, "best": 4.0}


def test_bad_size_is_rejected_before_any_work(capsys):
    from benchmarks.throughput import main

    with pytest.raises(SystemExit) as e:
        main(["--sizes", "100", "--device", "cpu"])
    assert e.value.code == 2 and "--sizes 100" in capsys.readouterr().err


def test_rows_are_run_as_given_and_sizes_filter_them(capsys):
    """--rows is an explicit plan (the GPU check's order: the figures needed first), engine modes innermost;
    --sizes keeps the rows at those sizes (the CPU rehearsal's --sizes 224); a malformed row is one error."""
    import torch

    from benchmarks.throughput import build_plan, parse_args, resolve_defaults

    rows = ["lomar:224:compile", "mae:224:compile-model", "lomar:384:compile", "lomar:224:compile-model"]
    args = resolve_defaults(parse_args(["--rows", *rows]), torch.device("cuda"))
    args.engine_mode = ["torch_autocast", "bf16"]
    assert build_plan(args) == [(k, int(s), v, m) for k, s, v in (r.split(":") for r in rows)
                                for m in ("torch_autocast", "bf16")]
    assert args.models == ["lomar", "mae"] and args.sizes == [224, 384]
    args = resolve_defaults(parse_args(["--rows", *rows, "--sizes", "224"]), torch.device("cuda"))
    args.engine_mode = ["torch_autocast"]
    assert [p[:3] for p in build_plan(args)] == [("lomar", 224, "compile"), ("mae", 224, "compile-model"),
                                                 ("lomar", 224, "compile-model")]
    for bad, msg in ((["--rows", "lomar:224"], "is not MODEL:SIZE:VARIANT"),
                     (["--rows", "vit:224:compile"], "is not MODEL:SIZE:VARIANT"),
                     (["--rows", "lomar:200:compile"], "200 is not a positive multiple"),
                     (["--rows", "lomar:224:compile", "--variants", "eager"], "drop --variants"),
                     (["--rows", "lomar:384:compile", "--sizes", "224"], "keeps none of the --rows")):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert msg in capsys.readouterr().err, bad


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture
def bench(in_process_world):
    """``benchmarks.throughput.main`` in this process (a world of one on the CPU); the kernel mode it sets is put
    back afterwards."""
    from benchmarks.throughput import main
    from lomar_fast.ops._dispatch import set_kernels

    yield lambda *argv: main(["--tiny", "--device", "cpu", *argv])
    set_kernels(None)


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_cpu(tmp_path, bench):
    bench("--steps", "2", "--warmup", "1", "--sizes", "64", "--variants", "eager", "compile+kernels", "--profile",
          "--profile_steps", "1", "--out", str(tmp_path), "--name", "smoke")

    report = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("schema", "device", "versions", "config", "matmul", "results", "speedups", "profile"):
        assert key in report
    assert report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["deepspeed"]
    assert report["config"]["dtype"] == "float32" and report["matmul"]["tflops"] > 0
    assert report["config"]["engine_mode"] == "fp32" and report["matmul"]["dtype"] == "float32"

    by = {(r["kind"], r["variant"]): r for r in report["results"]}
    assert set(by) == {("lomar", "eager"), ("mae", "eager"), ("lomar", "compile+kernels"), ("mae", "compile+kernels")}
    for kind in ("lomar", "mae"):
        r = by[(kind, "eager")]
        assert r["status"] == "ok", r["error"]
        assert r["images_per_sec"] > 0 and len(r["step_times_ms"]) == 2
        assert r["train_flops_per_image"] > 0 and 0 < r["mfu"]
        assert r["engine_mode"] == "fp32" and r["compute_dtype"] == "float32"
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / report["matmul_by_dtype"]["float32"]["tflops"])
        assert r["host_sync_method"].startswith("cpu proxy") and r["host_syncs_in_step"] is not None
        assert r["loss"] is not None and r["loss"] > 0
        assert r["host_load_1m"] >= 0 and r["host_cpus"] >= 1 and r["gpu_state"] is None  # no GPU state on a CPU
        assert by[(kind, "compile+kernels")]["status"] == "skipped"
    # tiny LoMaR at 64 px shrinks its windows to the 4x4 grid, and the FLOPs follow the model it ran
    lo = by[("lomar", "eager")]
    assert lo["model_kwargs"]["window_size"] <= 4
    w, k = lo["model_kwargs"]["window_size"], lo["model_kwargs"]["num_window"]
    assert lo["train_flops_per_image"] == flops.training_flops(
        flops.lomar_forward_macs(16, 192, 12, 768, w, k, 50))

    assert report["profile"]["target"] == "lomar:64:eager" and report["profile"]["groups"]
    md = (tmp_path / "smoke.md").read_text()
    assert "| lomar | 64 | eager | fp32 | float32 | 4 |" in md and "LoMaR / MAE" in md
    png = (tmp_path / "smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert (tmp_path / "smoke_profile.md").read_text().startswith("# Profile: lomar:64:eager")


def test_benchmark_rewrites_its_json_after_every_row(tmp_path, bench, monkeypatch):
    """A run cut short (a device call's time limit) keeps every row measured before the cut: the JSON on disk
    holds the rows so far, marked incomplete, and the finished run marks it complete."""
    from benchmarks import throughput as tp

    path, on_disk = tmp_path / "cut.json", []

    def fake_run_config(args, kind, size, variant, batch, device, ds_raw, world, peak, spec, profile, mode):
        doc = json.loads(path.read_text()) if path.exists() else None
        on_disk.append(None if doc is None else (doc["complete"], [r["variant"] for r in doc["results"]]))
        r = tp.Result(model=f"{kind}_vit_tiny_patch16", kind=kind, size=size, variant=variant, batch_size=batch,
                      engine_mode=mode, compute_dtype="float32", status="ok", images_per_sec=10.0,
                      step_ms_median=1.0, mfu=0.1, first_step_s=0.1)
        return r, None

    monkeypatch.setattr(tp, "run_config", fake_run_config)
    bench("--models", "lomar", "--sizes", "64", "--variants", "eager", "compile", "compile+kernels",
          "--matmul_size", "64", "--out", str(tmp_path), "--name", "cut")
    assert on_disk == [None, (False, ["eager"]), (False, ["eager", "compile"])]
    doc = json.loads(path.read_text())
    assert doc["complete"] is True and [r["variant"] for r in doc["results"]] == ["eager", "compile", "compile+kernels"]


def test_find_max_batch_with_rows_searches_only_their_model_and_size_pairs(tmp_path, bench, monkeypatch):
    """--rows is exactly those rows: --find_max_batch searches the (model, size) pairs they name, not every
    model at every size they hold between them (LoMaR at MAE's sizes, MAE at LoMaR's)."""
    from benchmarks import throughput as tp

    def fake_run_config(args, kind, size, variant, batch, device, ds_raw, world, peak, spec, profile, mode):
        return tp.Result(model=f"{kind}_vit_tiny_patch16", kind=kind, size=size, variant=variant, batch_size=batch,
                         engine_mode=mode, compute_dtype="float32", status="ok", images_per_sec=10.0,
                         step_ms_median=1.0, mfu=0.1, first_step_s=0.1), None

    searched = []

    def fake_find_max_batch(args, kind, size, device, ds_raw, world, start, deadline, mode):
        searched.append((kind, size))
        return {"model": kind, "size": size, "variant": args.max_batch_variant, "engine_mode": mode,
                "max_batch": start, "tried": []}

    monkeypatch.setattr(tp, "run_config", fake_run_config)
    monkeypatch.setattr(tp, "find_max_batch", fake_find_max_batch)
    bench("--rows", "lomar:64:eager", "mae:96:eager", "lomar:64:compile", "--find_max_batch", "--matmul_size", "64",
          "--out", str(tmp_path), "--name", "rows_max")
    assert searched == [("lomar", 64), ("mae", 96)]


def test_benchmark_records_the_op_paths_its_rows_ran(tmp_path, bench, monkeypatch):
    """$LOMAR_ATTN_PATH / $LOMAR_IRPE_PATH / $LOMAR_WA_KERNEL change what a row times, so the report says which
    paths ran."""
    from benchmarks import throughput as tp

    def fake_run_config(args, kind, size, variant, batch, device, ds_raw, world, peak, spec, profile, mode):
        return tp.Result(model=f"{kind}_vit_tiny_patch16", kind=kind, size=size, variant=variant, batch_size=batch,
                         engine_mode=mode, compute_dtype="float32", status="ok", images_per_sec=10.0,
                         step_ms_median=1.0, mfu=0.1, first_step_s=0.1), None

    monkeypatch.setattr(tp, "run_config", fake_run_config)
    monkeypatch.setenv("LOMAR_ATTN_PATH", "math")
    monkeypatch.setenv("LOMAR_WA_KERNEL", "mma")
    monkeypatch.delenv("LOMAR_IRPE_PATH", raising=False)
    bench("--models", "lomar", "--sizes", "64", "--variants", "eager", "--matmul_size", "64", "--out", str(tmp_path),
          "--name", "paths")
    doc = json.loads((tmp_path / "paths.json").read_text())
    assert doc["config"]["paths"] == {"irpe": "bmm", "attention": "math", "window_attention_kernel": "mma"}
    assert "iRPE path bmm, attention path math, window-attention kernel mma" in (tmp_path / "paths.md").read_text()
    monkeypatch.setenv("LOMAR_ATTN_PATH", "flex")
    monkeypatch.setenv("LOMAR_FLEX_BLOCK", "64")
    assert tp.op_paths() == {"irpe": "bmm", "attention": "flex", "window_attention_kernel": "mma", "flex_block": "64"}
    monkeypatch.delenv("LOMAR_FLEX_BLOCK")
    monkeypatch.setenv("LOMAR_FLEX_OPTIONS", '{"WRITE_DQ": false}')
    paths = tp.op_paths()
    assert paths["flex_block"] == "auto" and paths["flex_options"] == '{"WRITE_DQ": false}'


def _skipped_rows_report(bench, tmp_path: Path, name: str, *extra: str) -> dict:
    """A CPU run whose rows are all skipped (the fused kernels need CUDA): the run's dtypes, peaks and records only."""
    bench("--models", "lomar", "--variants", "compile+kernels", "--matmul_size", "64", "--out", str(tmp_path),
          "--name", name, *extra)
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_benchmark_times_the_peak_in_the_engine_modes_compute_dtype(tmp_path, bench):
    # ds_configs/zero2.json trains in torch_autocast: bf16 matmuls, so MFU must be taken against a bf16 peak
    # (an fp32 peak made a torch_autocast run look like 81% MFU)
    report = _skipped_rows_report(bench, tmp_path, "autocast", "--ds_config", "ds_configs/zero2.json")
    assert report["matmul"]["dtype"] == "bfloat16" and report["config"]["dtype"] == "bfloat16"
    assert report["config"]["engine_mode"] == "torch_autocast" and set(report["matmul_by_dtype"]) == {"bfloat16"}
    (row,) = report["results"]
    assert (row["engine_mode"], row["compute_dtype"], row["status"]) == ("torch_autocast", "bfloat16", "skipped")

    # several engine modes in one run: each row carries its mode and dtype, and each dtype gets its own peak
    report = _skipped_rows_report(bench, tmp_path, "modes", "--ds_config", "ds_configs/cpu.json",
                                  "--engine_mode", "bf16", "torch_autocast", "no_deepspeed")
    assert report["config"]["engine_modes"] == ["bf16", "torch_autocast", "no_deepspeed"]
    assert {(r["engine_mode"], r["compute_dtype"]) for r in report["results"]} == {
        ("bf16", "bfloat16"), ("torch_autocast", "bfloat16"), ("no_deepspeed", "float32")}
    assert set(report["matmul_by_dtype"]) == {"bfloat16", "float32"}
    assert report["matmul"]["dtype"] == "bfloat16"  # the first mode's


def test_benchmark_rejects_a_contradictory_precision_config(tmp_path):
    bad = tmp_path / "both.json"
    bad.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero2.json").read_text()), "bf16": {"enabled": True}}))
    from benchmarks.throughput import main

    with pytest.raises(SystemExit, match="enables torch_autocast and bf16"):  # before any process group or work
        main(["--tiny", "--device", "cpu", "--ds_config", str(bad), "--out", str(tmp_path)])


def test_best_against_best_pairs_each_models_fastest_row():
    from benchmarks.throughput import best_against_best, speedups

    rows = [dict(kind="lomar", size=224, variant="compile", engine_mode="torch_autocast", status="ok",
                 images_per_sec=3000.0, batch_size=512),
            dict(kind="lomar", size=224, variant="compile", engine_mode="bf16", status="ok", images_per_sec=2100.0,
                 batch_size=256),
            dict(kind="mae", size=224, variant="compile-model", engine_mode="torch_autocast", status="ok",
                 images_per_sec=4000.0, batch_size=256),
            dict(kind="mae", size=224, variant="eager", engine_mode="bf16", status="ok", images_per_sec=2200.0,
                 batch_size=256),
            dict(kind="mae", size=224, variant="compile", engine_mode="no_deepspeed", status="ok",
                 images_per_sec=9000.0, batch_size=256)]  # the plain PyTorch bound never counts as MAE's best
    report = {"config": {"engine_modes": ["torch_autocast", "bf16", "no_deepspeed"]}, "speedups": speedups(rows)}
    (best,) = best_against_best(report)
    assert best["lomar_over_mae"] == pytest.approx(0.75)
    assert best["lomar_row"] == "compile, torch_autocast, B=512" and best["mae_row"] == "compile-model, torch_autocast, B=256"
    per_mode = {(s["engine_mode"], s["variant"]): s["lomar_over_mae"] for s in report["speedups"]}
    assert per_mode[("bf16", "best")] == pytest.approx(2100 / 2200)
    assert ("no_deepspeed", "best") not in per_mode  # no LoMaR row without DeepSpeed


def test_whole_model_inductor_variants_are_gpu_only_and_pass_their_mode(monkeypatch):
    from benchmarks import throughput as tp

    cpu = torch.device("cpu")
    for v in ("compile-autotune", "compile-model-autotune", "compile-model-cudagraphs"):
        assert "CUDA" in tp.skip_reason("lomar", v, cpu)
        assert tp.skip_reason("lomar", v, torch.device("cuda")) is None
    calls = []
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    tp.apply_compile(model, "model", mode=tp.INDUCTOR_MODES["compile-model-cudagraphs"])
    tp.apply_compile(model, "model")
    assert calls == [{"dynamic": False, "mode": "reduce-overhead"}, {"dynamic": False}]


def test_rows_run_the_shipped_kernels_unless_told_otherwise(monkeypatch):
    """Without +kernels a row runs the kernels' auto choice (the entry points' default: the window gather where
    CuPy is installed), or none with --kernel_mode off; +kernels runs every kernel; each row says which."""
    from benchmarks import throughput as tp
    from lomar_fast.ops import _dispatch

    cuda = torch.device("cuda")
    monkeypatch.setattr(_dispatch, "cupy_available", lambda: True)
    try:
        for mode, want in (("auto", ["window_gather"]), ("off", []), ("on", ["window_gather", "window_attention"])):
            tp.set_kernel_mode(mode)  # "on": the fused attention computes the iRPE term itself
            assert tp.kernels_in_use(cuda) == want, mode
            assert tp.kernels_in_use(cuda, "mae") == [] and tp.kernels_in_use(torch.device("cpu")) == []
        monkeypatch.setattr(_dispatch, "cupy_available", lambda: False)
        tp.set_kernel_mode("auto")
        assert tp.kernels_in_use(cuda) == []
    finally:
        tp.set_kernel_mode(None)
    assert tp.parse_args([]).kernel_mode == "auto"


def test_spec_peak_takes_the_longest_matching_card_name():
    from benchmarks.throughput import spec_tflops

    assert spec_tflops("NVIDIA H200") == 989.4 and spec_tflops("NVIDIA H200 NVL") == 835.0
    assert spec_tflops("NVIDIA H100 80GB HBM3") == 989.4 and spec_tflops("NVIDIA H100 PCIe") == 756.0
    assert spec_tflops("Some CPU") is None


def test_compiled_rows_are_skipped_under_zero3_with_deepspeed():
    """The entry points refuse --compile on under ZeRO-3 (dynamo traces the partitioned parameters); the
    benchmark skips those rows with the reason, and keeps them without DeepSpeed or below ZeRO-3."""
    from benchmarks import throughput as tp

    cuda = torch.device("cuda")
    for v in ("compile", "compile-model", "compile+kernels"):
        assert "ZeRO-3" in tp.skip_reason("lomar", v, cuda, 3, "torch_autocast")
        assert tp.skip_reason("lomar", v, cuda, 3, "no_deepspeed") is None
        assert tp.skip_reason("lomar", v, cuda, 2, "bf16") is None
    assert tp.skip_reason("lomar", "eager", cuda, 3, "torch_autocast") is None


def test_gpu_state_reads_nvidia_smi_for_the_visible_device(monkeypatch):
    """A row's GPU state is nvidia-smi's line for the row's device (mapped through CUDA_VISIBLE_DEVICES), by field;
    None when nvidia-smi is missing or answers otherwise."""
    import subprocess

    from benchmarks import throughput as tp

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="1980, 3201, 612.35, 55, 100, 0x0000000000000000\n", stderr="")

    monkeypatch.setattr(tp.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    state = tp.gpu_state(torch.device("cuda", 1))
    assert calls[0][:3] == ["nvidia-smi", "-i", "5"]
    assert state == {"clocks.sm": "1980", "clocks.mem": "3201", "power.draw": "612.35", "temperature.gpu": "55",
                     "utilization.gpu": "100", "clocks_throttle_reasons.active": "0x0000000000000000"}
    monkeypatch.setattr(tp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 9, "", "err"))
    assert tp.gpu_state(torch.device("cuda", 0)) is None

    def missing(cmd, **kw):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(tp.subprocess, "run", missing)
    assert tp.gpu_state(torch.device("cuda", 0)) is None
    assert tp.gpu_state(torch.device("cpu")) is None


def test_gpu_sync_count_leaves_out_the_debug_modes_notice_and_other_threads(monkeypatch):
    """torch.cuda.set_sync_debug_mode("warn") first warns that it is a prototype; that notice is not a sync (the
    first row of a GPU run had counted it), nor is another thread's sync: the mode is process-wide."""
    import threading
    import warnings

    from benchmarks import throughput as tp

    def set_mode(mode):
        if mode == "warn":
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations")

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    class Step:
        def step(self):
            warnings.warn(f"{tp.SYNC_WARNING} (Triggered internally at CUDAFunctions.cpp:162.)")
            # a loader thread's blocking copy (--data_path) warns too; it does not hold up the step
            loader = threading.Thread(target=warnings.warn, args=(f"{tp.SYNC_WARNING} (loader thread)",))
            loader.start()
            loader.join()

    n, msgs, _ = tp.count_host_syncs(Step(), torch.device("cuda", 0))
    assert n == 1 and len(msgs) == 1 and tp.SYNC_WARNING in msgs[0] and "loader" not in msgs[0], msgs


def test_contiguous_gradients_flag_sets_the_json_and_the_one_rank_rule_gives_way_to_it():
    from benchmarks import throughput as tp
    from lomar_fast.ds_config import resolve_ds_config

    cpu = torch.device("cpu")
    for flag, want in ((None, False), ("true", True), ("false", False)):
        args = tp.resolve_defaults(tp.parse_args(["--tiny", "--device", "cpu"] + (["--contiguous_gradients", flag]
                                                                                  if flag else [])), cpu)
        ds_raw, *_ = tp.plan_run(args, cpu)
        ds, _, _ = resolve_ds_config(ds_raw, batch_size=2, accum_iter=1, world_size=1, explicit=set(),
                                     zero_stage=None, device=cpu)
        assert ds["zero_optimization"]["contiguous_gradients"] is want, flag
        assert tp.contiguous_gradients(ds_raw, 2, 1) is want  # what the report records
    assert tp.contiguous_gradients(tp.plan_run(args, cpu)[0], 2, 4) is False  # the last flag: false
    args = tp.resolve_defaults(tp.parse_args(["--tiny", "--device", "cpu"]), cpu)
    assert tp.contiguous_gradients(tp.plan_run(args, cpu)[0], 2, 4) is True  # several ranks: DeepSpeed's default
    assert tp.contiguous_gradients(tp.plan_run(args, cpu)[0], 3, 1) is None


# ------------------------------------------------------------------------------------------ benchmarks.combine
def _reports(folder, rows_by_stage: dict) -> None:
    """Throughput reports as the lever stages write them: {stage: [(variant, batch, images/sec, status)]}."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage, rows in rows_by_stage.items():
        results = [{"kind": "lomar", "size": 224, "variant": v, "batch_size": b, "images_per_sec": ips, "status": st}
                   for v, b, ips, st in rows]
        results.append({"kind": "mae", "size": 224, "variant": "compile-model", "batch_size": 256,
                        "images_per_sec": 9999.0, "status": "ok"})  # another model: not a LoMaR lever
        (folder / f"{stage}.json").write_text(json.dumps({"results": results}))


def _combine(tmp_path, rows_by_stage: dict) -> tuple[dict, list[str]]:
    """benchmarks.combine on those reports: (its plan, the lines it printed)."""
    import contextlib
    import io

    from benchmarks import combine

    _reports(tmp_path / "r", rows_by_stage)
    plan_file = tmp_path / "plan.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert combine.main(["--results", str(tmp_path / "r"), "--plan", str(plan_file)]) == 0
    return json.loads(plan_file.read_text()), printed.getvalue().splitlines()


BASE = {"throughput": [("compile", 256, 3400.0, "ok"), ("compile-model", 256, 3500.0, "ok")]}


def test_combine_runs_the_winning_levers_together(tmp_path):
    plan, lines = _combine(tmp_path, {
        **BASE, "attention_flex": [("compile", 256, 3450.0, "ok"), ("compile-model", 256, 3700.0, "ok")],
        "attention_mma": [("compile+kernels", 256, 3300.0, "ok"), ("compile-model+kernels", 256, 3600.0, "ok")],
        "irpe_aligned": [("compile", 256, 3450.0, "ok")],
        "batch512": [("compile", 512, 3380.0, "ok"), ("compile-model", 512, 3600.0, "ok")]})
    # FlexAttention with the whole model compiled is the fastest row; micro-batch 512 beat 256 with the whole model
    # compiled; the aligned iRPE bias does not apply to FlexAttention
    assert plan["skip"] is None
    assert plan["choice"] == {"attention": "flex", "irpe": "bmm", "scope": "model", "batch": 512}
    assert "fastest row: flex, iRPE bmm, model compiled, micro-batch 256, 3700 img/s" in plan["why"]
    assert lines == ["LOMAR_ATTN_PATH=flex", "--models lomar --sizes 224 --variants compile-model --lomar_batch 512"]


def test_combine_keeps_sdpas_aligned_bias_and_names_the_kernel_variants(tmp_path):
    from benchmarks import combine

    plan, lines = _combine(tmp_path, {**BASE, "irpe_aligned": [("compile", 256, 3450.0, "ok")],
                                      "batch512": [("compile-model", 512, 3550.0, "ok")]})
    assert plan["choice"] == {"attention": "sdpa", "irpe": "bmm_aligned", "scope": "model", "batch": 512}
    assert lines == ["LOMAR_IRPE_PATH=bmm_aligned",
                     "--models lomar --sizes 224 --variants compile-model --lomar_batch 512"]
    assert combine.command({"attention": "mma", "irpe": "bmm", "scope": "blocks", "batch": "default"}) == (
        ["LOMAR_WA_KERNEL=mma"], ["--models", "lomar", "--sizes", "224", "--variants", "compile+kernels"])


def test_combine_runs_nothing_a_stage_measured_already_or_without_a_baseline(tmp_path):
    # only FlexAttention won: its own row is the combination; a failed row does not count
    plan, lines = _combine(tmp_path / "a", {**BASE, "attention_flex": [("compile-model", 256, 3600.0, "ok")],
                                            "batch512": [("compile-model", 512, 9000.0, "error")]})
    assert lines == [] and plan["skip"].startswith("measured already: flex, iRPE bmm, model compiled, micro-batch 256")
    plan, lines = _combine(tmp_path / "b", {"attention_flex": [("compile-model", 256, 3600.0, "ok")]})
    assert lines == [] and "no baseline row" in plan["skip"]

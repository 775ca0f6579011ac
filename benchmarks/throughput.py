"""Training-step throughput of LoMaR against the MAE baseline on the same DeepSpeed harness.

    python -m benchmarks.throughput --quick                 # GPU: ViT-B/16 at 224/384/448, ~2.5 min on an H200
    python -m benchmarks.throughput --tiny --device cpu     # CPU smoke run: tiny models, same code path

Each measured configuration (engine mode x model x image size x variant) builds a fresh DeepSpeed engine (ZeRO
stage from the DeepSpeed JSON: ds_configs/zero2.json on GPU, ds_configs/cpu.json on CPU) around a fused AdamW,
runs warm-up steps, then times the real step - engine forward, backward and optimizer step - on a
device-resident synthetic uint8 NHWC batch (or a real ``.beton`` with --data_path). Windows and masks are drawn
on the device with a device generator; nothing in the step waits for the host.

Engine modes (lomar_fast.precision): the JSON's own mode by default (``torch_autocast`` for ds_configs/zero*.json:
fp32 master weights, bf16 matmuls), or any of ``--engine_mode torch_autocast bf16 no_deepspeed`` in one run.
``bf16`` is DeepSpeed's bf16 mode (bf16 parameters, fp32 master weights in the optimizer); ``no_deepspeed`` is
the same model and fused AdamW in plain PyTorch (fp32 parameters, autocast in the JSON's compute dtype), an
upper bound for the engine's overhead. The compute dtype follows the mode, and MFU is measured against a
matmul timed in that dtype.

Variants: ``eager`` (reference), ``compile`` (torch.compile per block, or of the whole model with
--compile_scope model: lomar_fast.compilation, what the entry points' --compile does), ``compile-model`` (the
whole model, whatever --compile_scope says), ``compile-autotune`` and ``compile-model-autotune`` (the same two
scopes in inductor's max-autotune mode: GEMMs autotuned against Triton templates, which take the bias/GELU
epilogues, GPU only; the blocks share one graph, so their autotuning covers a block's GEMMs once),
``compile-model-cudagraphs`` (inductor's reduce-overhead mode: the compiled forward and backward replayed as CUDA
graphs, GPU only), and ``eager``, ``compile`` or ``compile-model`` with ``+kernels`` (every fused CUDA kernel on).
Without ``+kernels`` a row runs the kernels' shipped ``auto`` choice (those a committed GPU result made default,
where CuPy is installed), which is what the entry points run, or none with ``--kernel_mode off``; each row records
the kernels it ran (``kernels``). Each model has its own variant list and micro-batch (``--mae_variants``,
``--lomar_batch``, ``--mae_batch``), so each runs at its best; the LoMaR/MAE ratios are also given best row
against best row per size. A variant that fails (kernels missing, out of memory, compile
error) is recorded with its error and the run goes on.

Reported per configuration: images/sec (median step time over the timed steps, CUDA events on GPU), model
FLOPs per training image (lomar_fast.flops), achieved TFLOP/s, MFU against the matrix-multiply rate measured
on the same device in the same run (8192^3 in the row's compute dtype), peak memory, and host syncs in one
step (under torch.cuda.set_sync_debug_mode on GPU; on CPU the lomar_fast.host_sync proxy, with DeepSpeed on
its GPU code paths). Output under --out: <name>.json (device, versions, config, raw step times), <name>.md
(tables) and <name>.png (bar chart); --profile adds <name>_profile.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import write_json
from lomar_fast.compilation import SCOPES, apply_compile

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "lomar_fast.throughput/2"  # 2: engine mode and compute dtype per row, matmul peak per dtype
VARIANTS = ("eager", "compile", "compile-autotune", "compile-model", "compile-model-autotune", "compile-model-cudagraphs",
            "eager+kernels", "compile+kernels", "compile-model+kernels")
# inductor mode of the variants that set one: autotuned GEMM templates with fused epilogues, or CUDA graphs
INDUCTOR_MODES = {"compile-autotune": "max-autotune-no-cudagraphs", "compile-model-autotune": "max-autotune-no-cudagraphs",
                  "compile-model-cudagraphs": "reduce-overhead"}
MODEL_KINDS = ("lomar", "mae")
SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") says per sync
ENGINES = ("torch_autocast", "bf16", "no_deepspeed")

# published dense bf16 matrix peaks (TFLOP/s), for a second MFU column next to the measured one
SPEC_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "H200 NVL": 835.0, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}

# micro-batch per (model, size) for ViT-B on a GPU: LoMaR's cost per image does not depend on the image size
# (K windows of 50 tokens), so its batch stays; MAE's grows with (S/16)^2, so its batch shrinks.
GPU_BATCH = {("lomar", 224): 256, ("lomar", 384): 256, ("lomar", 448): 256,
             ("mae", 224): 256, ("mae", 384): 128, ("mae", 448): 64}


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    p.add_argument("--arch", default=None, choices=("tiny", "small", "base", "large", "huge"),
                   help="ViT size (default base; tiny with --tiny)")
    p.add_argument("--large", action="store_true", help="shortcut for --arch large (batches halved)")
    p.add_argument("--tiny", action="store_true", help="tiny models at small sizes: the CPU smoke configuration")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="image sides (default 224 384 448; 64 with --tiny)")
    p.add_argument("--kernel_mode", default="auto", choices=("auto", "off"),
                   help="the CUDA kernels of the variants without +kernels: auto (the entry points' default: those a "
                        "committed GPU result made default) or off (the PyTorch reference paths)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"any of {', '.join(VARIANTS)} (default: GPU eager compile compile+kernels; CPU eager)")
    p.add_argument("--mae_variants", nargs="+", default=None,
                   help="MAE's own variants (default: --variants if given, else GPU eager compile compile-model; CPU eager)")
    p.add_argument("--rows", nargs="+", default=None, metavar="MODEL:SIZE:VARIANT",
                   help="exactly these rows, in this order (e.g. lomar:224:compile mae:224:compile-model), instead of "
                        "--models x --sizes x variants; --sizes then keeps the rows at those sizes")
    p.add_argument("--engine_mode", nargs="+", default=None, choices=ENGINES,
                   help="engine modes to run, each a row group (default: the mode of the DeepSpeed JSON)")
    p.add_argument("--compile_scope", default="blocks", choices=SCOPES,
                   help="what the compile variants compile: each ViT block (fast to compile, one graph shared by the "
                        "blocks; the entry points' --compile default) or the whole model")
    p.add_argument("--batch_size", type=int, default=None, help="micro-batch for every configuration (default: per model/size table)")
    p.add_argument("--lomar_batch", type=int, default=None, help="LoMaR's micro-batch at every size (e.g. 512); beats --batch_size")
    p.add_argument("--mae_batch", type=int, default=None, help="MAE's micro-batch at every size; beats --batch_size")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 with --quick, else 50; 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10 with --quick, else 15; 1 on CPU)")
    p.add_argument("--quick", action="store_true", help="the short GPU run (< 6 min on one H100): fewer steps, a time budget")
    p.add_argument("--time_budget", type=float, default=None,
                   help="seconds after which remaining configurations are skipped (default 320 with --quick)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when available)")
    p.add_argument("--ds_config", default=None, help="DeepSpeed JSON (default ds_configs/zero2.json on GPU, cpu.json on CPU)")
    p.add_argument("--zero_stage", type=int, default=None, help="override the ZeRO stage of the DeepSpeed JSON")
    p.add_argument("--contiguous_gradients", default=None, choices=("true", "false"),
                   help="set ZeRO-1/2's contiguous gradient buffer (default: the JSON's; without one, off on one rank "
                        "and DeepSpeed's default on several: lomar_fast.ds_config.one_rank_gradients)")
    p.add_argument("--data_path", default=None, help="feed a real .beton instead of synthetic batches (loader time included)")
    p.add_argument("--num_workers", type=int, default=8, help="loader workers with --data_path")
    p.add_argument("--find_max_batch", action="store_true", help="also find the largest micro-batch that fits per model/size")
    p.add_argument("--max_batch_variant", default="eager", help="variant used by --find_max_batch")
    p.add_argument("--max_batch_cap", type=int, default=16384, help="stop doubling at this micro-batch")
    p.add_argument("--profile", action="store_true", help="torch.profiler over a few steps of one configuration")
    p.add_argument("--profile_target", default=None,
                   help="model:size:variant to profile (default: the first of the run, preferring a compile variant)")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--profile_trace", action="store_true", help="also write a Chrome trace of the profiled steps")
    p.add_argument("--matmul_size", type=int, default=None, help="side of the peak matmul (default 8192 GPU, 1024 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output directory")
    p.add_argument("--name", default=None, help="file stem of the outputs (default throughput_<device type>)")
    args = p.parse_args(argv)

    for flag in ("variants", "mae_variants"):
        for v in getattr(args, flag) or ():
            if v not in VARIANTS:
                p.error(f"--{flag} {v!r} is unknown; choose from {', '.join(VARIANTS)}")
    for s in args.sizes or ():
        if s <= 0 or s % 16:
            p.error(f"--sizes {s} is not a positive multiple of the patch size 16")
    if args.rows is not None:
        if args.variants is not None or args.mae_variants is not None:
            p.error("--rows names each row's variant; drop --variants and --mae_variants")
        rows = []
        for spec in args.rows:
            kind, _, rest = spec.partition(":")
            size, _, variant = rest.partition(":")
            if kind not in MODEL_KINDS or not size.isdigit() or variant not in VARIANTS:
                p.error(f"--rows {spec!r} is not MODEL:SIZE:VARIANT with MODEL one of {', '.join(MODEL_KINDS)} and "
                        f"VARIANT one of {', '.join(VARIANTS)}")
            if int(size) <= 0 or int(size) % 16:
                p.error(f"--rows {spec!r}: {size} is not a positive multiple of the patch size 16")
            if args.sizes is None or int(size) in args.sizes:
                rows.append((kind, int(size), variant))
        if not rows:
            p.error(f"--sizes {' '.join(map(str, args.sizes))} keeps none of the --rows")
        args.rows = list(dict.fromkeys(rows))
        # the selectors the rest of the benchmark reads, from the rows
        args.models = list(dict.fromkeys(k for k, _, _ in args.rows))
        args.sizes = list(dict.fromkeys(s for _, s, _ in args.rows))
        named = {(k, v) for k, _, v in args.rows}
        args.variants = [v for v in VARIANTS if ("lomar", v) in named] or None
        args.mae_variants = [v for v in VARIANTS if ("mae", v) in named] or None
    for flag in ("batch_size", "lomar_batch", "mae_batch", "steps", "warmup", "profile_steps"):
        v = getattr(args, flag)
        if v is not None and (v < (0 if flag == "warmup" else 1)):
            p.error(f"--{flag} {v} is too small")
    if args.data_path is not None and not Path(args.data_path).exists():
        p.error(f"--data_path {args.data_path} does not exist; give the path of a .beton file")
    if args.ds_config is not None and not Path(args.ds_config).is_file():
        p.error(f"--ds_config {args.ds_config} does not exist; pick one of ds_configs/*.json")
    return args


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the defaults that depend on the device and the --quick/--tiny switches."""
    gpu = device.type == "cuda"
    args.arch = args.arch or ("large" if args.large else ("tiny" if args.tiny else "base"))
    args.sizes = args.sizes or ([64] if args.tiny else [224, 384, 448])
    args.mae_variants = args.mae_variants or args.variants or (["eager", "compile", "compile-model"] if gpu else ["eager"])
    args.variants = args.variants or (["eager", "compile", "compile+kernels"] if gpu else ["eager"])
    if args.steps is None:
        args.steps = (20 if args.quick else 50) if gpu else 3
    if args.warmup is None:
        args.warmup = (10 if args.quick else 15) if gpu else 1
    if args.time_budget is None and args.quick:
        args.time_budget = 320.0
    args.matmul_size = args.matmul_size or (8192 if gpu else 1024)
    args.ds_config = args.ds_config or str(REPO / "ds_configs" / ("zero2.json" if gpu else "cpu.json"))
    args.name = args.name or f"throughput_{device.type}"
    return args


def default_batch(args: argparse.Namespace, kind: str, size: int, device: torch.device) -> int:
    own = args.lomar_batch if kind == "lomar" else args.mae_batch
    if own is not None:
        return own
    if args.batch_size is not None:
        return args.batch_size
    if device.type != "cuda" or args.tiny:
        return 4 if device.type != "cuda" else 256
    b = GPU_BATCH.get((kind, size))
    if b is None:  # other sizes: scale MAE with the token count, keep LoMaR
        b = 256 if kind == "lomar" else max(8, int(256 * (224 / size) ** 2) // 8 * 8)
    if args.arch in ("large", "huge"):
        b //= 2 if args.arch == "large" else 4
    return max(1, b)


def model_kwargs(kind: str, size: int, tiny: bool) -> dict[str, Any]:
    """Constructor kwargs; tiny runs at small sizes shrink the window to fit the grid."""
    kw: dict[str, Any] = {"img_size": size}
    if kind == "lomar" and tiny:
        grid = size // 16
        w = min(7, max(2, grid // 2))
        kw.update(window_size=w, num_window=min(4, grid - w + 1))
    return kw


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Result:
    model: str
    kind: str
    size: int
    variant: str
    batch_size: int
    engine_mode: str = ""  # torch_autocast | bf16 | fp16 | fp32 | no_deepspeed
    compute_dtype: str = ""
    status: str = "pending"  # ok | error | oom | skipped
    error: str | None = None
    images_per_sec: float | None = None
    step_ms_median: float | None = None
    step_ms_mean: float | None = None
    step_times_ms: list[float] = field(default_factory=list)
    warmup_times_ms: list[float] = field(default_factory=list)
    first_step_s: float | None = None  # includes compilation for compile variants
    build_s: float | None = None
    fwd_flops_per_image: float | None = None
    train_flops_per_image: float | None = None
    achieved_tflops: float | None = None
    mfu: float | None = None
    mfu_spec: float | None = None
    peak_mem_gib: float | None = None
    host_syncs_in_step: int | None = None
    host_sync_method: str | None = None
    host_sync_messages: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # the ops whose CUDA kernel ran (kernels_in_use)
    loss: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # the host and the GPU right after the timed steps: the 1-minute load average (with the number of CPUs), and
    # nvidia-smi's SM clock, power, temperature and active clock-throttle reasons, so that a slow or noisy row
    # says whether the host was busy or the GPU throttled
    host_load_1m: float | None = None
    host_cpus: int | None = None
    gpu_state: dict[str, Any] | None = None


def guarded(result: Result, fn: Callable[[], None]) -> Result:
    """Run ``fn`` (which fills ``result``); any exception becomes the result's status instead of ending the run."""
    try:
        fn()
        result.status = "ok"
    except BaseException as e:  # noqa: BLE001 - a benchmark variant must never end the whole run
        if isinstance(e, KeyboardInterrupt):
            raise
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        result.status = "oom" if oom else "error"
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        result.error = f"{type(e).__name__}: {str(e).strip()[:600]}\n" + "".join(tb[-4:])[-1500:]
    return result


# ------------------------------------------------------------------------------------------------ device info
GPU_STATE_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "utilization.gpu",
                    "clocks_throttle_reasons.active")


def gpu_state(device: torch.device) -> dict[str, Any] | None:
    """nvidia-smi's view of ``device`` now (``GPU_STATE_FIELDS``), or None off CUDA or without nvidia-smi."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    smi_index = visible[index].strip() if index < len(visible) and visible[index].strip() else str(index)
    try:
        out = subprocess.run(["nvidia-smi", "-i", smi_index, f"--query-gpu={','.join(GPU_STATE_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(values) != len(GPU_STATE_FIELDS):
        return None
    return dict(zip(GPU_STATE_FIELDS, values))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(name=prop.name, capability=f"{prop.major}.{prop.minor}", sms=prop.multi_processor_count,
                    memory_gib=round(prop.total_memory / 2**30, 2), count=torch.cuda.device_count())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    cpus=os.cpu_count())
    return info


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        out["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        out["cudnn"] = None
    for mod in ("deepspeed", "timm", "triton", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["git_commit"] = None
    return out


def spec_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for key, v in sorted(SPEC_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return v
    return None


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int, iters: int = 20) -> dict[str, Any]:
    """Dense n x n x n matmul rate in ``dtype``: the ceiling MFU is measured against."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=gen).to(dtype)
    iters = iters if device.type == "cuda" else 5
    for _ in range(3):
        c = a @ b
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        sync(device)
        for i in range(iters):
            starts[i].record()
            c = a @ b
            ends[i].record()
        sync(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            c = a @ b
            times.append((time.perf_counter() - t) * 1e3)
    del a, b, c
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "times_ms": times, "median_ms": med,
            "tflops": 2 * n**3 / (med * 1e-3) / 1e12}


# ------------------------------------------------------------------------------------------------ the step
class Batches:
    """Endless device-resident uint8 NHWC batches: two synthetic ones alternating, or a real loader."""

    def __init__(self, args, batch: int, size: int, device: torch.device, world: int):
        self.loader = None
        if args.data_path is not None:
            from lomar_fast.data import build_pretrain_loader  # imported only here: ffcv is optional

            self.loader = build_pretrain_loader(args.data_path, batch_size=batch, input_size=size,
                                                num_workers=args.num_workers, device=device,
                                                distributed=world > 1, seed=args.seed)
            self._it = iter(self.loader)
        else:
            gen = torch.Generator(device=device).manual_seed(args.seed)
            self.synthetic = [torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device,
                                            generator=gen) for _ in range(2)]
            self._i = 0

    def next(self) -> torch.Tensor:
        if self.loader is None:
            self._i += 1
            return self.synthetic[self._i % 2]
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = None  # the ended epoch's iterator dropped first: the loader then reuses its buffers
            self._it = iter(self.loader)
            batch = next(self._it)
        return batch[0] if isinstance(batch, (tuple, list)) else batch


def reset_compiler() -> None:
    """Fresh dynamo state per variant (the on-disk inductor cache stays, so identical graphs compile fast)."""
    try:
        torch._dynamo.reset()
        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, key):
                setattr(cfg, key, max(64, getattr(cfg, key)))
    except Exception:  # noqa: BLE001
        pass


def set_kernel_mode(mode: str) -> None:
    from lomar_fast.ops._dispatch import set_kernels

    set_kernels(mode)


def kernels_in_use(device: torch.device, kind: str = "lomar") -> list[str]:
    """The ops whose CUDA kernel a ``kind`` model runs under the current kernel mode on ``device``: the gather,
    the iRPE bias, the fused window attention (where it runs, the blocks take no separate iRPE bias). MAE uses
    none of them."""
    from lomar_fast.ops import irpe, window_attention, window_gather
    from lomar_fast.ops._dispatch import kernel_chosen

    if device.type != "cuda" or kind != "lomar":
        return []
    ops = {"window_gather": window_gather.AUTO_USES_KERNEL, "irpe": irpe.AUTO_USES_KERNEL,
           "window_attention": window_attention.AUTO_USES_KERNEL}
    used = [name for name, auto in ops.items() if kernel_chosen(auto)]
    return [n for n in used if not (n == "irpe" and "window_attention" in used)]


def op_paths() -> dict[str, str]:
    """The pure-PyTorch paths the rows ran (``$LOMAR_IRPE_PATH``, ``$LOMAR_ATTN_PATH``; the kernels follow the
    variant), and the form of the window-attention kernel where a variant runs it (``$LOMAR_WA_KERNEL``); on the
    flex path, FlexAttention's tile side (``$LOMAR_FLEX_BLOCK``; ``auto``: its own) and any other kernel options
    given (``$LOMAR_FLEX_OPTIONS``)."""
    from lomar_fast.ops._window_attention_cuda import kernel_choice
    from lomar_fast.ops.irpe import irpe_path
    from lomar_fast.ops.window_attention import FLEX_OPTIONS_ENV, attention_path, flex_kernel_options

    paths = {"irpe": irpe_path(), "attention": attention_path(), "window_attention_kernel": kernel_choice()}
    if paths["attention"] == "flex":
        paths["flex_block"] = str(flex_kernel_options().get("fwd_BLOCK_M", "auto"))
        extra = os.environ.get(FLEX_OPTIONS_ENV, "").strip()
        if extra:
            paths["flex_options"] = extra
    return paths


def engine_config(ds_raw: dict, mode: str) -> dict:
    """The DeepSpeed JSON switched to an engine mode (unchanged when it already is in that mode)."""
    from lomar_fast.precision import engine_mode, set_engine_mode

    return ds_raw if mode in (engine_mode(ds_raw), "no_deepspeed") else set_engine_mode(ds_raw, mode)


def mode_dtype(ds_raw: dict, mode: str) -> torch.dtype:
    """The compute dtype of a row: the engine mode's, or the JSON's own for the plain PyTorch row."""
    from lomar_fast.precision import compute_dtype

    return compute_dtype(engine_config(ds_raw, mode))


class Harness:
    """One configuration: a fresh model + fused AdamW + DeepSpeed engine (or plain PyTorch), and its step."""

    def __init__(self, args, kind: str, size: int, variant: str, batch: int, device: torch.device,
                 ds_raw: dict, world: int, result: Result, mode: str):
        from lomar_fast.ds_config import one_rank_engine, resolve_ds_config
        from lomar_fast.optim import param_groups_weight_decay
        from lomar_fast.flops import model_forward_macs, training_flops
        from lomar_fast.models import create_model

        self.kind, self.device, self.batch, self.mode = kind, device, batch, mode
        self.engine = None
        kernels = variant.endswith("+kernels")
        set_kernel_mode("on" if kernels else args.kernel_mode)  # auto: the entry points' default
        result.kernels = kernels_in_use(device, kind)
        reset_compiler()
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        kw = model_kwargs(kind, size, args.tiny)
        result.model_kwargs = kw
        model = create_model(f"{kind}_vit_{args.arch}_patch16", **kw)
        macs = model_forward_macs(model)
        result.fwd_flops_per_image = 2.0 * macs
        result.train_flops_per_image = float(training_flops(macs))
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups_weight_decay(model, 0.05)]
        self.dtype = mode_dtype(ds_raw, mode)
        if mode == "no_deepspeed":
            model.to(device)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, fused=True)
        if variant.startswith("compile"):
            apply_compile(model, "model" if variant.startswith("compile-model") else args.compile_scope,
                          mode=INDUCTOR_MODES.get(variant))
        if mode == "no_deepspeed":
            self.module, self.optimizer = model, optimizer
        else:
            import deepspeed

            ds_cfg, _, _ = resolve_ds_config(engine_config(ds_raw, mode), batch_size=batch, accum_iter=1,
                                             world_size=world, explicit=set(), zero_stage=args.zero_stage,
                                             device=device, source=f"--ds_config {args.ds_config}")
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
            one_rank_engine(self.engine, world)
            self.module = self.engine.module
        self.module.train()
        self.batches = Batches(args, batch, size, device, world)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(args.seed)
        sync(device)
        result.build_s = time.perf_counter() - t0

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        run = self.engine if self.engine is not None else self.module
        if self.kind == "lomar":
            windows, masks = self.module.sample(images.shape[0], generator=self.gen, device=self.device)
            loss, _, _ = run(images, windows, masks, validate=False)
        else:
            loss, _, _ = run(images)
        return loss

    def step(self) -> torch.Tensor:
        """One training step; returns the detached loss (no host sync)."""
        images = self.batches.next()
        if self.engine is None:  # plain PyTorch: autocast in the compute dtype, fused AdamW
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss = self._forward(images)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        loss = self._forward(images)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def close(self) -> None:
        eng = self.engine
        if eng is not None and hasattr(eng, "destroy"):
            try:
                eng.destroy()
            except Exception:  # noqa: BLE001
                pass
        self.engine = self.module = self.optimizer = self.batches = None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_steps(h: Harness, n: int, device: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """Per-step milliseconds of ``n`` steps: CUDA events between steps, one synchronize at the end."""
    loss = None
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        sync(device)
        events[0].record()
        for i in range(n):
            loss = h.step()
            events[i + 1].record()
        sync(device)
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)], loss
    times = []
    for _ in range(n):
        t = time.perf_counter()
        loss = h.step()
        times.append((time.perf_counter() - t) * 1e3)
    return times, loss


def count_host_syncs(h: Harness, device: torch.device) -> tuple[int, list[str], str]:
    """Run one step and count the synchronising calls: on GPU torch.cuda.set_sync_debug_mode('warn') (reads and
    blocking copies) plus the device and event waits it does not report (torch.cuda.synchronize, which DeepSpeed's
    accelerator calls, and torch.cuda.Event.synchronize); the lomar_fast.host_sync proxy on CPU. Returns (count,
    up to 10 distinct messages, method)."""
    from lomar_fast.host_sync import HostSyncCounter

    if device.type != "cuda":
        with HostSyncCounter() as counter:
            h.step()
        return len(counter.events), counter.lines()[:10], "cpu proxy (lomar_fast.host_sync)"
    sync(device)
    step_thread, caught = threading.get_ident(), []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # the debug mode is process-wide: a real loader's thread (--data_path) syncs its own copy stream, which
        # does not hold up the step, so only warnings raised in this thread count
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            caught.append(warnings.WarningMessage(message, category, filename, lineno))
            if threading.get_ident() == step_thread else None)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncCounter(device_waits_only=True) as waits:
                h.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    msgs = [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:120]}" for w in caught
            if SYNC_WARNING in str(w.message)]  # not the "debug mode is a prototype feature" notice
    return (len(msgs) + len(waits.events), (sorted(set(msgs)) + waits.lines())[:10],
            "torch.cuda.set_sync_debug_mode + device/event waits")


def gpu_paths(device: torch.device, mode: str):
    """On CPU, DeepSpeed's accelerator answers like a GPU one while a configuration runs, so the host-sync proxy
    sees DeepSpeed's GPU code paths (lomar_fast.host_sync); a no-op on GPU and for the plain PyTorch row."""
    import contextlib

    if device.type == "cuda" or mode == "no_deepspeed":
        return contextlib.nullcontext()
    from lomar_fast.host_sync import gpu_like_accelerator

    return gpu_like_accelerator()


def skip_reason(kind: str, variant: str, device: torch.device, zero_stage: int = 0,
                mode: str = "torch_autocast") -> str | None:
    """Why a configuration is not measured at all, or None."""
    if variant.startswith("compile") and zero_stage >= 3 and mode != "no_deepspeed":
        return "torch.compile traces ZeRO-3's partitioned parameters (the entry points refuse --compile on there)"
    if variant.endswith("+kernels") and device.type != "cuda":
        return "fused kernels run on CUDA tensors only"
    if variant.endswith("+kernels") and kind == "mae":
        return "MAE uses no fused kernels (same as the variant without +kernels)"
    if variant in INDUCTOR_MODES and device.type != "cuda":
        return f"inductor mode {INDUCTOR_MODES[variant]} is for CUDA (autotuned GEMMs, CUDA graphs)"
    return None


def run_config(args, kind: str, size: int, variant: str, batch: int, device: torch.device, ds_raw: dict,
               world: int, peak_tflops: float, spec: float | None, profile: bool,
               mode: str) -> tuple[Result, dict | None]:
    result = Result(model=f"{kind}_vit_{args.arch}_patch16", kind=kind, size=size, variant=variant, batch_size=batch,
                    engine_mode=mode, compute_dtype=dtype_name(mode_dtype(ds_raw, mode)))
    reason = skip_reason(kind, variant, device, getattr(args, "zero", 0), mode)
    if reason:
        result.status, result.error = "skipped", reason
        return result, None
    prof: dict | None = None
    holder: dict[str, Harness] = {}

    def body() -> None:
        nonlocal prof
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        h = holder["h"] = Harness(args, kind, size, variant, batch, device, ds_raw, world, result, mode)
        t = time.perf_counter()
        h.step()
        sync(device)
        result.first_step_s = time.perf_counter() - t
        warm, _ = timed_steps(h, max(0, args.warmup - 1), device)
        result.warmup_times_ms = [round(x, 4) for x in warm]
        times, loss = timed_steps(h, args.steps, device)
        result.gpu_state = gpu_state(device)
        result.host_load_1m, result.host_cpus = round(os.getloadavg()[0], 2), os.cpu_count()
        result.step_times_ms = [round(x, 4) for x in times]
        result.loss = float(loss) if loss is not None else None
        if result.loss is not None and not math.isfinite(result.loss):
            raise FloatingPointError(f"loss is {result.loss}")
        med = statistics.median(times)
        result.step_ms_median, result.step_ms_mean = med, statistics.fmean(times)
        result.images_per_sec = batch / (med * 1e-3)  # per device
        result.achieved_tflops = result.images_per_sec * result.train_flops_per_image / 1e12
        result.mfu = result.achieved_tflops / peak_tflops if peak_tflops else None
        result.mfu_spec = result.achieved_tflops / spec if spec else None
        if device.type == "cuda":
            result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
        result.host_syncs_in_step, result.host_sync_messages, result.host_sync_method = count_host_syncs(h, device)
        if profile:
            prof = profile_steps(h, args, device, result)

    with gpu_paths(device, mode):
        guarded(result, body)
        if "h" in holder:
            holder["h"].close()
    holder.clear()
    free_memory(device)
    return result, prof


def find_max_batch(args, kind: str, size: int, device: torch.device, ds_raw: dict, world: int,
                   start: int, deadline: float | None, mode: str) -> dict[str, Any]:
    """Double the micro-batch from ``start`` until a step fails (OOM) or the cap; the largest that ran."""
    tried, best, b = [], None, max(1, start)
    while b <= args.max_batch_cap:
        if deadline is not None and time.perf_counter() > deadline:
            tried.append({"batch": b, "status": "skipped: time budget"})
            break
        r = Result(model=f"{kind}_vit_{args.arch}_patch16", kind=kind, size=size, variant=args.max_batch_variant,
                   batch_size=b, engine_mode=mode)
        holder: dict[str, Harness] = {}

        def body() -> None:
            free_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            h = holder["h"] = Harness(args, kind, size, args.max_batch_variant, b, device, ds_raw, world, r, mode)
            for _ in range(2):
                h.step()
            sync(device)
            if device.type == "cuda":
                r.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30

        with gpu_paths(device, mode):
            guarded(r, body)
            if "h" in holder:
                holder["h"].close()
        holder.clear()
        free_memory(device)
        tried.append({"batch": b, "status": r.status, "peak_mem_gib": r.peak_mem_gib,
                      "error": (r.error or "").split("\n")[0] or None})
        if r.status != "ok":
            break
        best = b
        b *= 2
    return {"model": kind, "size": size, "variant": args.max_batch_variant, "engine_mode": mode, "max_batch": best,
            "tried": tried}


# ------------------------------------------------------------------------------------------------ profile
PROFILE_GROUPS = (  # first match wins; kernel names (GPU) or aten op names (CPU)
    ("optimizer", r"adam|multi_tensor|_foreach_|optimizer"),
    ("communication", r"nccl|all_reduce|allreduce|reduce_scatter|all_gather|broadcast|gloo"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention|_scaled_dot|cudnn_attn|softmax"),
    ("matmul", r"gemm|cutlass|xmma|wgmma|nvjet|sm\d\d_|cublas|aten::mm\b|aten::addmm|aten::bmm|aten::matmul|"
               r"aten::linear|aten::_convolution|aten::convolution|conv"),
    ("gather", r"gather|scatter|index|window|irpe|take_along|argsort|sort|masked"),
    ("fused elementwise (triton)", r"^triton_"),
    ("copy / cast", r"copy|memcpy|memset|_to_copy|contiguous|cat"),
)


def profile_group(name: str) -> str:
    """The profile summary group of a kernel or op name."""
    low = name.lower()
    for group, pat in PROFILE_GROUPS:
        if re.search(pat, low if group != "fused elementwise (triton)" else name):
            return group
    return "other elementwise / norm"


def profile_steps(h: Harness, args, device: torch.device, result: Result) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            h.step()
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.profile_steps
    rows = []
    gpu = device.type == "cuda"
    for evt in prof.key_averages():
        if gpu:
            is_kernel = str(getattr(evt, "device_type", "")).endswith("CUDA")
            t = getattr(evt, "self_device_time_total", None)
            if t is None:
                t = getattr(evt, "self_cuda_time_total", 0)
            if not is_kernel or t <= 0:
                continue
        else:
            t = evt.self_cpu_time_total
            if t <= 0:
                continue
        rows.append({"name": evt.key, "group": profile_group(evt.key), "time_us": float(t), "calls": int(evt.count)})
    rows.sort(key=lambda r: -r["time_us"])
    total = sum(r["time_us"] for r in rows) or 1.0
    groups: dict[str, float] = {}
    for r in rows:
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["time_us"]
    trace = None
    if args.profile_trace:
        trace = str(Path(args.out) / f"{args.name}_trace.json")
        prof.export_chrome_trace(trace)
    return {"target": f"{result.kind}:{result.size}:{result.variant}", "batch_size": result.batch_size,
            "steps": args.profile_steps, "clock": "GPU kernel time" if gpu else "CPU self time",
            "total_ms_per_step": total / 1e3 / args.profile_steps, "wall_ms_per_step": wall_ms,
            "busy_share": (total / 1e3 / args.profile_steps) / wall_ms if wall_ms > 0 else None,
            "groups": {g: {"ms_per_step": t / 1e3 / args.profile_steps, "share": t / total}
                       for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [dict(r, share=r["time_us"] / total) for r in rows[:25]], "trace": trace}


def profile_markdown(p: dict[str, Any]) -> str:
    lines = [f"# Profile: {p['target']} (batch {p['batch_size']}, {p['steps']} steps, {p['clock']})", "",
             f"Total {p['total_ms_per_step']:.2f} ms per step of {p['clock']} in {p['wall_ms_per_step']:.2f} ms of wall "
             f"time per step (under the profiler)" + (f": the device is busy {100 * p['busy_share']:.0f}% of the step."
                                                      if p.get("busy_share") and p["clock"].startswith("GPU") else "."), "", "| group | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {g} | {v['ms_per_step']:.3f} | {100 * v['share']:.1f}% |" for g, v in p["groups"].items()]
    lines += ["", "| op / kernel | group | calls | ms / step | share |", "|---|---|---:|---:|---:|"]
    for r in p["top"]:
        name = r["name"].replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{name}` | {r['group']} | {r['calls']} | {r['time_us'] / 1e3 / p['steps']:.3f} | "
                     f"{100 * r['share']:.1f}% |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ reports
def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


ANY_DEEPSPEED = "any DeepSpeed mode"


def _row_label(r: dict) -> str:
    mode = r.get("engine_mode") or ""
    return f"{r['variant']}{', ' + mode if mode else ''}, B={r.get('batch_size', '?')}"


def speedups(results: list[dict]) -> list[dict]:
    """LoMaR images/sec over MAE's at each size: per engine mode and variant, and best row against best row per
    engine mode (whatever variant and micro-batch each model ran best at). With several DeepSpeed modes in the
    run, also best DeepSpeed row against best DeepSpeed row (``engine_mode`` "any DeepSpeed mode")."""
    ok = [r for r in results if r["status"] == "ok"]
    modes = list(dict.fromkeys(r.get("engine_mode", "") for r in ok))
    ds_modes = [m for m in modes if m != "no_deepspeed"]
    out = []
    for size in sorted({r["size"] for r in ok}):
        at = [r for r in ok if r["size"] == size]
        groups = [(m, [r for r in at if r.get("engine_mode", "") == m]) for m in modes]
        if len(ds_modes) > 1:
            groups.append((ANY_DEEPSPEED, [r for r in at if r.get("engine_mode", "") in ds_modes]))
        for mode, rows in groups:
            variants = ("best",) if mode == ANY_DEEPSPEED else VARIANTS + ("best",)
            for variant in variants:
                if variant == "best":
                    lo = max((r for r in rows if r["kind"] == "lomar"), key=lambda r: r["images_per_sec"], default=None)
                    ma = max((r for r in rows if r["kind"] == "mae"), key=lambda r: r["images_per_sec"], default=None)
                else:
                    lo = next((r for r in rows if r["kind"] == "lomar" and r["variant"] == variant), None)
                    ma = next((r for r in rows if r["kind"] == "mae" and r["variant"] == variant), None)
                if lo and ma and lo["images_per_sec"] and ma["images_per_sec"]:
                    out.append({"size": size, "engine_mode": mode, "variant": variant,
                                "lomar_images_per_sec": lo["images_per_sec"], "mae_images_per_sec": ma["images_per_sec"],
                                "lomar_over_mae": lo["images_per_sec"] / ma["images_per_sec"],
                                "lomar_row": _row_label(lo), "mae_row": _row_label(ma)})
    return out


def best_against_best(report: dict[str, Any]) -> list[dict]:
    """Per size, the LoMaR/MAE ratio of each model's best DeepSpeed row (all DeepSpeed modes of the run)."""
    ds_modes = [m for m in report["config"].get("engine_modes", [""]) if m != "no_deepspeed"]
    key = ANY_DEEPSPEED if len(ds_modes) > 1 else (ds_modes[0] if ds_modes else "")
    return [sp for sp in report["speedups"] if sp["variant"] == "best" and sp.get("engine_mode", "") == key]


def markdown(report: dict[str, Any]) -> str:
    d, m, c = report["device"], report["matmul"], report["config"]
    v = report["versions"]
    peaks = "; ".join(f"measured {mm['dtype']} matmul {mm['n']}^3: {mm['tflops']:.4g} TFLOP/s"
                      for mm in report.get("matmul_by_dtype", {"": m}).values())
    lines = [f"# Training-step throughput: LoMaR vs MAE ({c['arch']}, {d.get('name')})", "",
             f"Device {d.get('name')} ({d['type']}); torch {v['torch']}, deepspeed {v.get('deepspeed')}; "
             f"DeepSpeed config `{Path(c['ds_config']).name}` (ZeRO-{c['zero_stage']}); engine mode(s) "
             f"{', '.join(c.get('engine_modes', [c.get('engine_mode', '?')]))}; compute dtype {c['dtype']}; {peaks}"
             + (f"; spec {report['spec_tflops']:.0f} TFLOP/s" if report.get("spec_tflops") else "") + ".",
             f"{c['warmup']} warm-up + {c['steps']} timed steps per row; images/sec from the median step; "
             f"FLOPs = matmul FLOPs per training image (fwd+bwd = 3x fwd); MFU against the measured matmul in the "
             f"row's dtype; {c['data']}"
             + (f"; iRPE path {c['paths']['irpe']}, attention path {c['paths']['attention']}" if c.get("paths") else "")
             + (f", window-attention kernel {c['paths']['window_attention_kernel']}"
                if c.get("paths", {}).get("window_attention_kernel") else "")
             + (f", FlexAttention tiles {c['paths']['flex_block']}" if c.get("paths", {}).get("flex_block") else "")
             + (f", FlexAttention options {c['paths']['flex_options']}" if c.get("paths", {}).get("flex_options")
                else "")
             + ".", "",
             "| model | size | variant | engine | dtype | batch | img/s | step ms (median) | GFLOP/img | TFLOP/s | MFU | "
             "peak GiB | syncs/step | status |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['error'] or '').splitlines()[0][:60]}"
        lines.append(
            f"| {r['kind']} | {r['size']} | {r['variant']}{' [' + ', '.join(r['kernels']) + ']' if r.get('kernels') else ''} | "
            f"{r.get('engine_mode', '')} | {r.get('compute_dtype', '')} | "
            f"{r['batch_size']} | {_f(r['images_per_sec'], '.1f')} | "
            f"{_f(r['step_ms_median'], '.2f')} | {_f(r['train_flops_per_image'] and r['train_flops_per_image'] / 1e9, '.1f')} | "
            f"{_f(r['achieved_tflops'], '.4g')} | {_f(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{_f(r['peak_mem_gib'], '.2f')} | {_f(r['host_syncs_in_step'], 'd')} | {status.replace('|', '/')} |")
    methods = sorted({r.get("host_sync_method") for r in report["results"] if r.get("host_sync_method")})
    if methods:
        lines += ["", f"Host syncs counted with {', '.join(methods)}."]
    best = best_against_best(report)
    if best:
        lines += ["", "LoMaR over MAE, best row against best row (each model at its fastest variant, engine mode and "
                  "micro-batch; DeepSpeed rows):", "",
                  "| size | LoMaR img/s | LoMaR row | MAE img/s | MAE row | LoMaR / MAE |", "|---:|---:|---|---:|---|---:|"]
        lines += [f"| {b['size']} | {b['lomar_images_per_sec']:.1f} | {b['lomar_row']} | {b['mae_images_per_sec']:.1f} | "
                  f"{b['mae_row']} | **{b['lomar_over_mae']:.2f}x** |" for b in best]
    if report["speedups"]:
        lines += ["", "LoMaR over MAE (images/sec ratio) per engine mode and variant:", "",
                  "| size | engine | variant | LoMaR img/s | MAE img/s | LoMaR / MAE |", "|---:|---|---|---:|---:|---:|"]
        lines += [f"| {sp['size']} | {sp.get('engine_mode', '')} | {sp['variant']} | {sp['lomar_images_per_sec']:.1f} | "
                  f"{sp['mae_images_per_sec']:.1f} | {sp['lomar_over_mae']:.2f}x |" for sp in report["speedups"]]
    if report.get("max_batch"):
        lines += ["", "Largest micro-batch that ran (doubling until out of memory):", "",
                  "| model | size | variant | max batch | tried |", "|---|---:|---|---:|---|"]
        for mb in report["max_batch"]:
            tried = ", ".join(f"{t['batch']}:{t['status']}" for t in mb["tried"])
            lines.append(f"| {mb['model']} | {mb['size']} | {mb['variant']} | {mb['max_batch'] or '-'} | {tried} |")
    if report.get("skipped_for_time"):
        lines += ["", f"Skipped for the time budget: {', '.join(report['skipped_for_time'])}."]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    sizes = sorted({r["size"] for r in report["results"]})
    modes = list(dict.fromkeys(r.get("engine_mode", "") for r in ok))
    series = sorted({(r["kind"], r["variant"], r.get("engine_mode", "")) for r in ok},
                    key=lambda kv: (MODEL_KINDS.index(kv[0]), VARIANTS.index(kv[1]), modes.index(kv[2])))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sizes) * max(1, len(series)) / 3 + 3), 4.5))
    width = 0.8 / max(1, len(series))
    for j, (kind, variant, mode) in enumerate(series):
        vals = []
        for s in sizes:
            hit = [r["images_per_sec"] for r in ok if r["size"] == s and r["kind"] == kind and r["variant"] == variant
                   and r.get("engine_mode", "") == mode]
            vals.append(hit[0] if hit else 0.0)
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(sizes))]
        label = f"{kind} {variant}" + (f" {mode}" if len(modes) > 1 else "")
        bars = ax.bar(xs, vals, width, label=label, hatch="//" if kind == "mae" else None)
        for b, v in zip(bars, vals):
            if v > 0:
                ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(sizes)), [f"{s}px" for s in sizes])
    ax.set_ylabel("images / sec (training step)")
    ax.set_title(f"LoMaR vs MAE, ViT-{report['config']['arch']}/16, {report['device'].get('name')}")
    if series:  # no measured row, no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, name: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    report["files"] = {k: str(v) for k, v in paths.items()}
    if report.get("profile"):
        paths["profile"] = out / f"{name}_profile.md"
        report["files"]["profile"] = str(paths["profile"])
        paths["profile"].write_text(profile_markdown(report["profile"]))
    write_json(paths["json"], report)
    paths["markdown"].write_text(markdown(report))
    bar_chart(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------ main
def pick_device(requested: str | None) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {requested}: torch sees no GPU; pass --device cpu")
        dev = torch.device("cuda", dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise SystemExit(f"--device {requested} is not supported; pass cuda or cpu")
    return dev


def profile_choice(args, plan: list[tuple[str, int, str, str]],
                   device: torch.device) -> tuple[str, int, str, str] | None:
    """The configuration (model, size, variant, engine mode) to profile, or None."""
    if not args.profile or not plan:
        return None
    if args.profile_target:
        parts = args.profile_target.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--profile_target {args.profile_target!r} must be model:size:variant[:engine_mode], "
                             f"e.g. lomar:224:compile")
        hits = [p for p in plan if p[:3] == (parts[0], int(parts[1]), parts[2]) and (len(parts) == 3 or p[3] == parts[3])]
        if not hits:
            raise SystemExit(f"--profile_target {args.profile_target} is not among the measured configurations")
        return hits[0]
    runnable = [p for p in plan if not skip_reason(p[0], p[2], device, getattr(args, "zero", 0), p[3])]
    if not runnable:
        return None
    return next((p for p in runnable if p[2].startswith("compile")), runnable[0])


def build_plan(args) -> list[tuple[str, int, str, str]]:
    """(model, size, variant, engine mode) in run order: variants outermost, so the cheap eager rows of every size
    come first, then the compiled ones; engine modes innermost, so the rows they compare run back to back.
    With --rows, those rows in their order (engine modes innermost)."""
    if getattr(args, "rows", None):
        return [(k, s, v, m) for k, s, v in args.rows for m in args.engine_mode]
    by_kind = {"lomar": args.variants, "mae": args.mae_variants}
    variants = [v for v in VARIANTS if any(v in by_kind[k] for k in args.models)]
    return [(k, s, v, m) for v in variants for s in args.sizes for k in args.models if v in by_kind[k]
            for m in args.engine_mode]


def max_batch_pairs(args) -> list[tuple[str, int]]:
    """The (model, size) pairs --find_max_batch searches: those of --rows, in their order, else --models x
    --sizes."""
    if getattr(args, "rows", None):
        return list(dict.fromkeys((k, s) for k, s, _ in args.rows))
    return [(k, s) for k in args.models for s in args.sizes]


# Rough seconds a ViT-B row needs on an H200 (build, engine, compile, 10 + 20 steps), with a margin: a row is
# started only when this much of --time_budget is left. Measured 2026-11-27 (first step / whole row): eager
# 1-2 s / about 8 s; compiled blocks 10 s / 16 s (later sizes reuse the graph); whole model 36-51 s / 45-57 s.
# The CUDA-graph and autotuned variants have not run on a GPU: their costs are guesses.
ROW_COST_S = {"eager": 15.0, "eager+kernels": 20.0, "compile": 30.0, "compile+kernels": 30.0, "compile-autotune": 180.0,
              "compile-model": 70.0, "compile-model+kernels": 70.0, "compile-model-cudagraphs": 90.0,
              "compile-model-autotune": 300.0}


def row_cost(variant: str) -> float:
    """Rough seconds a configuration of ``variant`` needs (:data:`ROW_COST_S`)."""
    return ROW_COST_S[variant]


def contiguous_gradients(ds_raw: dict, zero: int, world: int) -> bool | None:
    """Whether the DeepSpeed rows keep ZeRO-1/2's contiguous gradient buffer (None outside ZeRO-1/2)."""
    from lomar_fast.ds_config import one_rank_gradients

    if zero not in (1, 2):
        return None
    ds = json.loads(json.dumps(ds_raw))
    ds.setdefault("zero_optimization", {})["stage"] = zero
    one_rank_gradients(ds, world)
    return bool(ds["zero_optimization"].get("contiguous_gradients", True))  # DeepSpeed's default: on


def plan_run(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict[str, torch.dtype], list, int,
                                                                      tuple[str, int, str, str] | None]:
    """What a run will measure, decided before the device does any work (so a bad flag stops it at once):
    (DeepSpeed JSON, compute dtype per engine mode, plan, ZeRO stage, profile target). Fills args.engine_mode and
    args.zero."""
    from lomar_fast.ds_config import load_ds_config, zero_stage_of
    from lomar_fast.errors import ConfigError
    from lomar_fast.precision import engine_mode, resolve_precision

    ds_raw = load_ds_config(args.ds_config)
    if args.contiguous_gradients is not None:
        ds_raw.setdefault("zero_optimization", {})["contiguous_gradients"] = args.contiguous_gradients == "true"
    args.engine_mode = list(dict.fromkeys(args.engine_mode or [engine_mode(ds_raw)]))
    try:
        for mode in args.engine_mode:
            resolve_precision(engine_config(ds_raw, mode), device, f"--ds_config {args.ds_config}")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    dtypes = {mode: mode_dtype(ds_raw, mode) for mode in args.engine_mode}
    plan = build_plan(args)
    zero = args.zero = zero_stage_of(ds_raw) if args.zero_stage is None else args.zero_stage
    return ds_raw, dtypes, plan, zero, profile_choice(args, plan, device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    req = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if req.startswith("cpu") else "cuda")
    device = pick_device(args.device)
    args = resolve_defaults(args, device)

    from lomar_fast.distributed import init_distributed

    ds_raw, dtypes, plan, zero, target = plan_run(args, device)
    dtype = dtypes[args.engine_mode[0]]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _, world, _ = init_distributed(device)

    matmuls = {dtype_name(d): measure_matmul(device, d, args.matmul_size) for d in dict.fromkeys(dtypes.values())}
    matmul = matmuls[dtype_name(dtype)]
    dinfo = device_info(device)
    spec_bf16 = spec_tflops(dinfo.get("name")) if device.type == "cuda" else None
    spec = spec_bf16 if dtype == torch.bfloat16 else None
    for mm in matmuls.values():
        print(f"[throughput] {dinfo.get('name')}: {mm['dtype']} matmul {mm['n']}^3 = {mm['tflops']:.4g} TFLOP/s", flush=True)

    config = {k: v for k, v in vars(args).items()}
    config.update(dtype=dtype_name(dtype), engine_mode=args.engine_mode[0], engine_modes=args.engine_mode,
                  dtype_by_engine_mode={m: dtype_name(d) for m, d in dtypes.items()}, zero_stage=zero, world_size=world,
                  data=f"real batches from {args.data_path}" if args.data_path else "synthetic uint8 NHWC batches on the device",
                  paths=op_paths(), contiguous_gradients=contiguous_gradients(ds_raw, zero, world))
    report = {"schema": SCHEMA, "complete": False, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": dinfo, "versions": versions(), "config": config, "matmul": matmul,
              "matmul_by_dtype": matmuls, "spec_tflops": spec,
              "results": [], "speedups": [], "max_batch": [], "profile": None, "skipped_for_time": [], "wall_s": None}
    results, skipped = report["results"], report["skipped_for_time"]

    deadline = t_start + args.time_budget if args.time_budget else None
    for kind, size, variant, mode in plan:
        batch = default_batch(args, kind, size, device)
        cost = row_cost(variant)
        if deadline is not None and time.perf_counter() + cost > deadline and not skip_reason(kind, variant, device,
                                                                                               zero, mode):
            r = Result(model=f"{kind}_vit_{args.arch}_patch16", kind=kind, size=size, variant=variant, batch_size=batch,
                       engine_mode=mode, compute_dtype=dtype_name(dtypes[mode]), status="skipped",
                       error="time budget spent")
            skipped.append(f"{kind}:{size}:{variant}:{mode}")
        else:
            row_dtype = dtypes[mode]
            r, p = run_config(args, kind, size, variant, batch, device, ds_raw, world,
                              matmuls[dtype_name(row_dtype)]["tflops"],
                              spec_bf16 if row_dtype == torch.bfloat16 else None,
                              profile=(kind, size, variant, mode) == target, mode=mode)
            report["profile"] = p or report["profile"]
        results.append(asdict(r))
        # the JSON so far ("complete": false), rewritten after every row: a run cut short keeps its rows
        report.update(speedups=speedups(results), wall_s=time.perf_counter() - t_start)
        write_json(Path(args.out) / f"{args.name}.json", report)
        msg = (f"{r.images_per_sec:9.1f} img/s  step {r.step_ms_median:8.2f} ms  MFU {100 * (r.mfu or 0):5.1f}%  "
               f"first step {r.first_step_s:.1f}s" if r.status == "ok" else f"{r.status}: {(r.error or '').splitlines()[0][:150]}")
        print(f"[throughput] {kind:5s} {size:4d} {variant:16s} {mode:14s} B={batch:<5d} {msg}", flush=True)

    max_batch = report["max_batch"]
    if args.find_max_batch:
        for kind, size in max_batch_pairs(args):
            mb = find_max_batch(args, kind, size, device, ds_raw, world, default_batch(args, kind, size, device),
                                deadline, args.engine_mode[0])
            max_batch.append(mb)
            print(f"[throughput] max batch {kind} {size}: {mb['max_batch']}", flush=True)

    report.update(complete=True, speedups=speedups(results), wall_s=time.perf_counter() - t_start)
    files = write_outputs(report, Path(args.out), args.name)
    print(markdown(report), flush=True)
    if report["profile"]:
        print(profile_markdown(report["profile"]), flush=True)
    print(f"[throughput] wrote {', '.join(files.values())} in {report['wall_s']:.0f}s", flush=True)
    return report


if __name__ == "__main__":
    main()
    from lomar_fast.distributed import shutdown_distributed

    shutdown_distributed()

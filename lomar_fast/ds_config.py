"""DeepSpeed JSON configs: reading them and making the flags the single source of truth for batch sizes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lomar_fast.errors import ConfigError
from lomar_fast.precision import compute_dtype, param_dtype, resolve_precision  # noqa: F401 (re-exported)


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed_config {p} does not exist; pick one of ds_configs/*.json")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {p} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {p} holds a JSON {type(ds).__name__}, not an object of DeepSpeed "
                          f"settings ({{\"zero_optimization\": ...}}); start from one of ds_configs/*.json")
    return ds


def resolve_ds_config(ds: dict[str, Any], *, batch_size: int, accum_iter: int, world_size: int,
                      explicit: set[str], zero_stage: int | None, device: torch.device,
                      source: str = "the DeepSpeed config") -> tuple[dict[str, Any], int, int]:
    """Make the flags the single source of truth for batch sizes.

    A concrete value in the JSON that contradicts a flag the user gave is an error naming both; one the
    user did not override is adopted. A batch-size key that is neither a positive integer nor "auto", and a
    ZeRO stage outside 0-3, are errors naming ``source`` and the key. Returns (config, micro batch,
    accumulation steps).
    """
    ds = json.loads(json.dumps(ds))

    def concrete(key):
        v = ds.get(key)
        if v is None or v == "auto":
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{source} sets {key}={json.dumps(v)}, which is neither a positive integer nor "
                              f"\"auto\"; set it to \"auto\" (the flags decide batch sizes) or remove it")
        return v

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source} sets zero_optimization={json.dumps(zero)}; it must be an object such as "
                          f"{{\"stage\": 2}}")
    stage = zero.get("stage", 0)
    if zero_stage is None and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        raise ConfigError(f"{source} sets zero_optimization.stage={json.dumps(stage)}; it must be 0, 1, 2 or 3 "
                          f"(fix the JSON, or override it with --zero_stage)")

    for key, flag, value in (("train_micro_batch_size_per_gpu", "batch_size", batch_size),
                             ("gradient_accumulation_steps", "accum_iter", accum_iter)):
        js = concrete(key)
        if js is not None and js != value:
            if flag in explicit:
                raise ConfigError(f"{source} sets {key}={js} but --{flag} {value} was given; the flags decide batch "
                                  f"sizes: remove {key} from the JSON or set it to \"auto\"")
            if flag == "batch_size":
                batch_size = js
            else:
                accum_iter = js
    total = batch_size * accum_iter * world_size
    js_total = concrete("train_batch_size")
    if js_total is not None and js_total != total:
        raise ConfigError(f"{source} sets train_batch_size={js_total} but batch_size {batch_size} x accum_iter "
                          f"{accum_iter} x world size {world_size} = {total}; remove train_batch_size or set it to \"auto\"")
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds["gradient_accumulation_steps"] = accum_iter
    ds["train_batch_size"] = total
    if zero_stage is not None:
        if zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero_stage {zero_stage} must be 0, 1, 2 or 3")
        ds.setdefault("zero_optimization", {})["stage"] = zero_stage
    ds = resolve_precision(ds, device, source)
    one_rank_gradients(ds, world_size)
    if zero_stage_of(ds) == 3:
        # DeepSpeed's default replaces torch.nn.functional.linear for the rest of the process, and under torch 2.11
        # a model compiled after that got weight gradients unlike eager ones; zero3.json sets it off, and so does
        # any ZeRO-3 config that leaves it unset (--zero_stage 3 with another JSON)
        ds["zero_optimization"].setdefault("memory_efficient_linear", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds, batch_size, accum_iter


def one_rank_gradients(ds: dict[str, Any], world_size: int) -> None:
    """ZeRO-1/2 on one rank, where no gradient is shared with another rank: gradients stay in their own tensors
    (``contiguous_gradients`` off) unless the JSON sets it, or turns ``overlap_comm`` on.

    With the contiguous buffer, DeepSpeed copies each gradient into it from a per-parameter backward hook and
    once more into the rank's partition; without it, it flattens each bucket once and copies it back. That is
    about half the copy calls and a fifth fewer bytes moved; at ViT-B's 164 parameter tensors about 6 ms of
    host time a step (measured on a CPU with DeepSpeed on its GPU code paths: 29 -> 23 ms with compiled
    blocks, 35 -> 29 ms eager), with the same losses to the bit. On several ranks DeepSpeed's default (the
    buffer, which lets it reduce-scatter) stays.
    """
    zero = ds.get("zero_optimization")
    if (world_size == 1 and zero_stage_of(ds) in (1, 2) and "contiguous_gradients" not in zero
            and not zero.get("overlap_comm")):  # overlapped, the unbuffered path synchronizes per bucket
        zero["contiguous_gradients"] = False


def one_rank_engine(engine: Any, world_size: int) -> bool:
    """ZeRO-0 on one rank: skip the engine's backward all-reduce (it flattens every gradient, all-reduces the
    flat copy with no other rank and copies it back; 2.5-3 ms of host time a ViT-B-depth step on a CPU). Only
    with a plain PyTorch optimizer (``torch_autocast`` and fp32 modes); returns whether it was skipped."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    if (world_size != 1 or not isinstance(engine, DeepSpeedEngine) or engine.zero_optimization_stage() != 0
            or not isinstance(engine.optimizer, torch.optim.Optimizer)):
        return False
    engine.enable_backward_allreduce = False
    return True


def zero_stage_of(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))



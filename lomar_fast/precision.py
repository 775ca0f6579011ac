"""Engine precision modes: what a DeepSpeed config trains in, and the checks that keep it coherent.

A DeepSpeed JSON selects one of four modes:

| mode | selected by | parameters, gradients, master weights | matmuls / convs |
|---|---|---|---|
| ``torch_autocast`` | ``"torch_autocast": {"enabled": true, "dtype": "bfloat16"}`` | fp32, fp32, the parameters themselves (ZeRO-3) or an fp32 shard copy (ZeRO-1/2) | bf16 under ``torch.autocast`` |
| ``bf16`` | ``"bf16": {"enabled": true}`` | bf16, bf16, fp32 shard in the optimizer | bf16 |
| ``fp16`` | ``"fp16": {"enabled": true}`` | fp16, fp16, fp32 shard; loss scaling | fp16 |
| ``fp32`` | none of them (``ds_configs/cpu.json``) | fp32 | fp32 |

``ds_configs/zero{1,2,3}.json`` ship ``torch_autocast``: DeepSpeed's ``bf16`` mode checks the gradients for
overflow and computes their global norm with per-parameter kernels and host reads on every step
(``deepspeed/runtime/zero/stage_1_and_2.py`` ``step``), which ``torch_autocast`` does not need.

``compute_dtype`` is the dtype matmuls run in (what MFU is measured against); ``param_dtype`` is the dtype
of the engine's parameters, which is also the dtype float inputs should arrive in (under autocast the
inputs stay fp32 and each matmul casts them). ``resolve_precision`` rejects contradictory configs and
turns back on the gradient norm that gradient clipping needs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from lomar_fast.errors import ConfigError

ENGINE_MODES = ("torch_autocast", "bf16", "fp16", "fp32")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


def _enabled(ds: dict[str, Any], section: str) -> bool:
    value = ds.get(section)
    return isinstance(value, dict) and bool(value.get("enabled", False))


def _autocast_dtype(ds: dict[str, Any]) -> torch.dtype | None:
    name = ds.get("torch_autocast", {}).get("dtype")
    return _DTYPES.get(str(name).lower()) if name is not None else None


def engine_mode(ds: dict[str, Any]) -> str:
    """``torch_autocast``, ``bf16``, ``fp16`` or ``fp32``: the mode the config selects (autocast first when
    a config enables several; ``resolve_precision`` rejects that)."""
    if _enabled(ds, "torch_autocast"):
        return "torch_autocast"
    if _enabled(ds, "bf16"):
        return "bf16"
    if _enabled(ds, "fp16"):
        return "fp16"
    return "fp32"


def compute_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype the model's matmuls run in under this config."""
    mode = engine_mode(ds)
    if mode == "torch_autocast":
        return _autocast_dtype(ds) or torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)


def param_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype of the engine's parameters, and the dtype float inputs to the engine should have."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine_mode(ds), torch.float32)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def resolve_precision(ds: dict[str, Any], device: torch.device,
                      source: str = "the DeepSpeed config") -> dict[str, Any]:
    """Check the precision settings of a resolved config; return it with the settings that follow from others.

    Raises ConfigError (naming ``source`` and the fix) for: more than one of torch_autocast / bf16 / fp16
    enabled, a torch_autocast dtype other than bfloat16 or float16, and fp16 on the CPU. Adjusts, in a copy:
    ``zero_optimization.compute_grad_norm`` is dropped outside ZeRO-1/2 (DeepSpeed refuses it there) and set
    back to true when ``gradient_clipping`` is on (clipping needs the norm; it costs one host sync a step).
    """
    on = [s for s in ("torch_autocast", "bf16", "fp16") if _enabled(ds, s)]
    if len(on) > 1:
        raise ConfigError(
            f"{source} enables {' and '.join(on)}; a config selects one precision mode. Keep torch_autocast "
            f"(fp32 master weights, bf16 compute: the shipped ds_configs/zero*.json) and set "
            f"{' and '.join(repr(s) for s in on if s != 'torch_autocast')} enabled false, or remove torch_autocast")
    if _enabled(ds, "torch_autocast"):
        name = ds["torch_autocast"].get("dtype")
        if _autocast_dtype(ds) is None:
            raise ConfigError(f"{source} sets torch_autocast dtype {name!r}; use \"bfloat16\" (or \"float16\" on a GPU)")
    if device.type == "cpu" and compute_dtype(ds) == torch.float16:
        raise ConfigError(f"{source} computes in fp16, which needs a GPU; on the CPU use ds_configs/cpu.json or a "
                          f"torch_autocast config with dtype \"bfloat16\"")
    out = copy.deepcopy(ds)
    zero = out.get("zero_optimization")
    if isinstance(zero, dict) and "compute_grad_norm" in zero:
        if zero_stage(out) not in (1, 2):
            del zero["compute_grad_norm"]
        elif float(out.get("gradient_clipping", 0.0) or 0.0) > 0.0:
            zero["compute_grad_norm"] = True
    return out


def set_engine_mode(ds: dict[str, Any], mode: str) -> dict[str, Any]:
    """A copy of ``ds`` switched to ``mode`` (``torch_autocast`` in bf16, or ``bf16``); everything else is kept."""
    if mode not in ("torch_autocast", "bf16"):
        raise ConfigError(f"engine mode {mode!r} must be torch_autocast or bf16")
    out = copy.deepcopy(ds)
    out.pop("fp16", None)
    if mode == "bf16":
        out.pop("torch_autocast", None)
        out["bf16"] = {**out.get("bf16", {}), "enabled": True}
    else:
        out.pop("bf16", None)
        section = out.get("torch_autocast", {})
        out["torch_autocast"] = {"lower_precision_safe_modules": [], **section, "enabled": True, "dtype": "bfloat16"}
    return out

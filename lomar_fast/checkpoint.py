"""Read and write the published LoMaR checkpoint layout: ``{"model": state_dict, ...}``.

The pretraining model's state dict uses exactly the published names, so writing is a float32 copy and
reading is a strict check: every missing, unexpected or misshaped key is listed in one error. Files are read
with ``weights_only=True``; the reference MAE/LoMaR scripts' own entries (an ``argparse.Namespace`` of args,
numpy scalars) are allowed as well.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from lomar_fast.errors import InputError


class CheckpointMismatch(InputError, ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


WEIGHTS_FILES = "a lomar_fast.export model.pth, a published LoMaR checkpoint or a checkpoint-best.pth"


def named(path: str | os.PathLike, flag: str | None = None) -> str:
    """How the errors name a weights file: ``--flag PATH`` when it came from a flag, else ``checkpoint PATH``."""
    return f"{flag or 'checkpoint'} {path}"


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict out of a loaded checkpoint: ``{"model": sd}``, ``{"module": sd}`` or ``sd``.
    ``source`` names the file in the error (see :func:`named`)."""
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if sd:
            return sd
    raise CheckpointMismatch(f"{source} holds no state dict (expected {{'model': state_dict}} or a state dict); "
                             f"pass {WEIGHTS_FILES}")


# what the reference scripts' checkpoints hold besides tensors: MAE's misc.save_model stores ``args`` as a Namespace
_SAFE_GLOBALS = [argparse.Namespace, np.dtype, *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64,
                                                                          np.int32, np.bool_)}]
_SCALAR = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
# numpy scalars pickle through it, named numpy.core.multiarray.scalar (numpy 1) or numpy._core... (numpy 2)
_SAFE_GLOBALS += [(_SCALAR, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]


PRETRAINING_FILES = "a lomar_fast.export model.pth or a published LoMaR pretraining checkpoint"


def load_object(path: str | os.PathLike, flag: str | None = None, expect: str = WEIGHTS_FILES) -> Any:
    """The object a ``.pth`` holds, loaded on the CPU with ``weights_only=True`` (clear errors for a missing file,
    a folder, or a file that is not a weights file). ``flag``: the option the path came from, named in the errors;
    ``expect``: the files the caller takes, which the errors suggest."""
    p = Path(path)
    if p.is_dir():
        raise FileNotFoundError(f"{named(p, flag)} is a folder; pass a .pth file (a pretraining run folder becomes "
                                f"one with python -m lomar_fast.export --checkpoint {p} --out model.pth)")
    if not p.is_file():
        raise FileNotFoundError(f"{named(p, flag)} does not exist; pass the path of a .pth written by "
                                f"lomar_fast.export or a published LoMaR checkpoint")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:  # the file system's refusal (permissions, I/O), not the content's
        raise CheckpointMismatch(f"{named(p, flag)} cannot be read ({e.strerror or e})") from e
    except RuntimeError as e:
        if "zip archive" not in str(e):
            raise
        # torch's zip reader: a file torch saves, cut short (an interrupted copy or download) or damaged
        raise CheckpointMismatch(f"{named(p, flag)} is truncated or damaged (torch cannot read it as the zip "
                                 f"archive it saves); copy it again, or pass {expect}") from e
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means it is no weights file
        # torch's own text runs to several lines and suggests weights_only=False; only the object it refused is kept
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        held = f" (it holds a {found.group(1)})" if found else ""
        raise CheckpointMismatch(f"{named(p, flag)} is not a weights file{held}; pass {expect}") from None


def load_weights(path: str | os.PathLike, flag: str | None = None,
                 expect: str = WEIGHTS_FILES) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the object a ``.pth`` holds, its model state dict), read once (see :func:`load_object`); the errors name
    the file by ``flag`` (see :func:`named`) and suggest ``expect``."""
    obj = load_object(path, flag, expect)
    return obj, extract_state_dict(obj, named(path, flag))


def load_file(path: str | os.PathLike, flag: str | None = None) -> dict[str, torch.Tensor]:
    """Load a ``.pth`` on the CPU and return its model state dict (see :func:`load_object`)."""
    return load_weights(path, flag)[1]


def state_dict_of(path_or_state: str | os.PathLike | Mapping[str, Any],
                  source: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """(the model state dict, how errors name the weights) of a ``.pth`` path or a checkpoint loaded already:
    a path names itself unless ``source`` does; a loaded checkpoint keeps ``source`` (None: unnamed)."""
    if isinstance(path_or_state, Mapping):
        return extract_state_dict(path_or_state, source or "checkpoint"), source
    return load_file(path_or_state), source or named(path_or_state)


def checkpoint_args(obj: Any) -> dict[str, Any]:
    """The run settings a loaded checkpoint carries (``args``: a dict, or the reference scripts' Namespace)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def compare_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Problems between two state dicts: missing, unexpected and misshaped keys (empty when they fit)."""
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    for k in sorted(set(expected) & set(given)):
        if tuple(expected[k].shape) != tuple(given[k].shape):
            problems.append(f"misshaped key {k}: checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)}")
    return problems


def published_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The pretraining model's weights as float32 CPU tensors under the published names."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}


def save_checkpoint(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                    **extra: Any) -> Path:
    """Write ``{"model": fp32 state dict, **extra}`` atomically (temporary name, then rename)."""
    sd = published_state_dict(model_or_state) if isinstance(model_or_state, nn.Module) else {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in model_or_state.items()}
    return write_atomically(path, lambda f: torch.save({"model": sd, **extra}, f))


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file through ``write(f)`` under a temporary name, then rename it over ``path``: a failure or a kill
    while writing leaves the previous file whole and no partial one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous file: a power loss keeps one of the two
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def load_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Any]) -> None:
    """Load a published-layout checkpoint into the pretraining model, exactly.

    Raises CheckpointMismatch listing every missing, unexpected or misshaped key.
    """
    sd, _ = state_dict_of(path_or_state)
    problems = compare_keys(model.state_dict(), sd)
    if problems:
        raise CheckpointMismatch("checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def module_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A live model's full weights as CPU float32 tensors, gathering ZeRO-3 partitions (call on every rank)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def load_module_weights(module: nn.Module, state: Mapping[str, torch.Tensor] | None) -> None:
    """Load the full weights ``state`` into a live model exactly. Under ZeRO-3 (partitioned parameters) call it on
    every rank: rank 0's ``state`` is loaded and broadcast with the buffers, the other ranks may pass None, so only
    rank 0 holds the whole model in host memory. Raises CheckpointMismatch, on every rank, listing every missing,
    unexpected or misshaped key. For evaluation: a ZeRO-3 optimizer's own fp32 master partitions keep their old
    values, and its next step would write them back."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        load_checkpoint(module, state)
        return
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    problems = [None]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):  # rank 0's values go to every rank's partition
        if rank == 0:
            problems[0] = compare_keys(module.state_dict(), state)
            if not problems[0]:
                module.load_state_dict(state, strict=True)
    dist.broadcast_object_list(problems, src=0)
    if problems[0]:
        raise CheckpointMismatch("checkpoint does not fit the model: " + "; ".join(problems[0]))
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)

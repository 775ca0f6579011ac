"""Training components with one job each: distributed start, optimizer groups, lr schedule,
DeepSpeed config resolution. The entry points (pretrain.py, finetune.py) compose them.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn


class ConfigError(ValueError):
    """A setting, file or combination of them that cannot work; the message names it and the fix."""


# ---------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world, local_rank).

    Works under the ``deepspeed`` launcher, ``torchrun``, and a plain one-process ``python`` start.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # plain python: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(requested: str | None) -> torch.device:
    """``cuda`` (this rank's GPU) when available or asked for, else ``cpu``."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} asked for a GPU but torch sees none; pass --device cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


# ------------------------------------------------------------------------------------------ optimizer
def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Two groups: decay for matrices/tensors, none for 1-D parameters, biases and ``skip`` names.

    Frozen parameters are left out.
    """
    skip = set(skip)
    decay, no_decay, names_decay, names_no = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
            names_no.append(name)
        else:
            decay.append(p)
            names_decay.append(name)
    return [
        {"params": no_decay, "weight_decay": 0.0, "names": names_no},
        {"params": decay, "weight_decay": weight_decay, "names": names_decay},
    ]


def build_adamw(groups: list[dict], lr: float, betas=(0.9, 0.95), device: torch.device | None = None):
    """AdamW (fused on GPU) over the groups; the ``names`` lists are kept out of the optimizer."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
    kwargs: dict[str, Any] = {}
    if device is not None and device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(clean, lr=lr, betas=betas, **kwargs)


def effective_lr(blr: float, lr: float | None, effective_batch: int) -> float:
    """lr = blr * effective batch / 256 unless an absolute lr is given."""
    return lr if lr is not None else blr * effective_batch / 256


def lr_at(step: float, steps_per_epoch: int, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Per-iteration schedule: linear warmup for ``warmup_epochs``, then half-cosine down to ``min_lr``."""
    epoch = step / max(1, steps_per_epoch)
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Apply ``lr`` to every param group, times the group's ``lr_scale`` (layer decay) when it has one."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------------- DeepSpeed
def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed_config {p} does not exist; pick one of ds_configs/*.json")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {p} is not valid JSON: {e}") from e


def resolve_ds_config(ds: dict[str, Any], *, batch_size: int, accum_iter: int, world_size: int,
                      explicit: set[str], zero_stage: int | None, device: torch.device,
                      source: str = "the DeepSpeed config") -> tuple[dict[str, Any], int, int]:
    """Make the flags the single source of truth for batch sizes.

    A concrete value in the JSON that contradicts a flag the user gave is an error naming both; one the
    user did not override is adopted. Returns (config, micro batch, accumulation steps).
    """
    ds = json.loads(json.dumps(ds))

    def concrete(key):
        v = ds.get(key)
        return None if v in (None, "auto") else int(v)

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
    from lomar_fast.precision import resolve_precision

    ds = resolve_precision(ds, device, source)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds, batch_size, accum_iter


def compute_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype the model's matmuls run in (lomar_fast.precision owns the engine modes)."""
    from lomar_fast.precision import compute_dtype as of_config

    return of_config(ds)


def start_run(cfg, extra_ds: dict[str, Any] | None = None):
    """The common start of a DeepSpeed job, after its own input checks.

    Picks the device, applies ``cfg.kernels``, resolves the DeepSpeed JSON against the batch flags (before
    any process group exists: the world size comes from the launcher's environment), merges ``extra_ds``,
    starts torch.distributed, and writes the resolved micro batch and accumulation back into ``cfg``.
    Returns (device, DeepSpeed config dict, rank, world size).
    """
    device = pick_device(cfg.device)
    ds_raw = load_ds_config(cfg.deepspeed_config)
    if cfg.kernels:
        from lomar_fast.ops._dispatch import set_kernels

        set_kernels(cfg.kernels)
    world = int(os.environ.get("WORLD_SIZE", 1))
    ds_cfg, micro, accum = resolve_ds_config(ds_raw, batch_size=cfg.batch_size, accum_iter=cfg.accum_iter,
                                             world_size=world, explicit=cfg.explicit, zero_stage=cfg.zero_stage,
                                             device=device, source=f"--deepspeed_config {cfg.deepspeed_config}")
    ds_cfg.update(extra_ds or {})
    from lomar_fast.precision import resolve_precision

    ds_cfg = resolve_precision(ds_cfg, device, f"--deepspeed_config {cfg.deepspeed_config}")
    rank, world, _ = init_distributed(device)
    cfg.batch_size, cfg.accum_iter = micro, accum
    return device, ds_cfg, rank, world


class LossMeter:
    """Sums step losses on the device and reads them back only when asked: the step's one host sync.

    ``add(loss)`` after each step; ``due(i, last_i)`` says when a read-back is due (every ``every``
    steps and at the epoch's last step); ``read(epoch, step)`` returns (mean loss, steps, seconds since
    the last read) and raises FloatingPointError for a non-finite mean. ``epoch_mean`` is the mean over
    the epoch's read-backs.
    """

    def __init__(self, device: torch.device, every: int, output_dir: str):
        self.device, self.every, self.output_dir = device, every, output_dir
        self.epoch_loss, self.epoch_steps = 0.0, 0
        self._reset()

    def _reset(self) -> None:
        self.total, self.n, self.t0 = torch.zeros((), device=self.device), 0, time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_steps = 0.0, 0
        self._reset()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.n += 1

    def due(self, i: int, last_i: int) -> bool:
        return self.n == self.every or (i == last_i and self.n > 0)

    def read(self, epoch: int, step: int) -> tuple[float, int, float]:
        value = float(self.total) / self.n  # the one host sync, every `every` steps
        if not math.isfinite(value):
            raise FloatingPointError(
                f"loss became {value} at epoch {epoch} step {step}; stopping. The last good checkpoint under "
                f"{self.output_dir} is untouched: lower --blr or check the data, then --resume auto")
        n, dt = self.n, time.perf_counter() - self.t0
        self.epoch_loss += value * n
        self.epoch_steps += n
        self._reset()
        return value, n, dt

    @property
    def epoch_mean(self) -> float:
        return self.epoch_loss / max(self.epoch_steps, 1)


def run_cli(main, *errors: type[BaseException]) -> None:
    """Run an entry point: bad input (ConfigError, FileNotFoundError, ValueError and ``errors``) exits 2
    with one line, a non-finite loss exits 3; anything else keeps its traceback."""
    try:
        main()
    except (ConfigError, FileNotFoundError, ValueError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any training work."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir {p} is not writable ({e.strerror}); pass a directory you can write to") from e
    return p

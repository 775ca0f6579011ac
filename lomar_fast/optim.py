"""Optimizer and schedule: AdamW parameter groups, the effective lr, the per-iteration warmup + cosine."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Two groups: decay for matrices/tensors, none for 1-D parameters, biases and ``skip`` names.

    Frozen parameters are left out. Each group carries the parameter ``names``.
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


def place_steps(optimizer: torch.optim.Optimizer) -> int:
    """Give each parameter's Adam state a ``step`` tensor of its own, and for a fused (or capturable) AdamW put
    it on that parameter's device as fp32, as ``Optimizer.load_state_dict`` does; returns how many it replaced.
    DeepSpeed's universal-checkpoint load assigns the tensor it read instead: on the host, or on the device of
    the rank that saved it, which the fused GPU kernel cannot read. Its ZeRO-3 load assigns one tensor to every
    flat partition, and each AdamW group increments its step in place, so each step of two groups counted two.
    A state whose parameter is in no group (ZeRO-3 puts its partition into a group only for the time of its
    step) follows the optimizer's groups."""
    owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    any_fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    seen: set[int] = set()
    moved = 0
    for p, state in optimizer.state.items():
        step = state.get("step")
        if step is None:
            continue
        group = owner.get(id(p))
        on_device = any_fused if group is None else bool(group.get("fused") or group.get("capturable"))
        shared = torch.is_tensor(step) and id(step) in seen
        if on_device and (not torch.is_tensor(step) or step.device != p.device or step.dtype != torch.float32):
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
            moved += 1
        elif shared:
            state["step"] = step.clone()
            moved += 1
        if torch.is_tensor(state["step"]):
            seen.add(id(state["step"]))
    return moved


def restore_group_settings(optimizer: torch.optim.Optimizer, saved_groups: list[dict]) -> int:
    """Set each parameter group's settings (everything but its parameters) to those of the saved group at its
    index, as ``Optimizer.load_state_dict`` does; returns how many values changed. DeepSpeed 0.19.8's ZeRO-3
    universal-checkpoint load gives every group the settings of the first, which turns weight decay off for the
    decay group (and gives every group the first layer-decay ``lr_scale``)."""
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise RuntimeError(f"the checkpoint holds {len(saved_groups)} optimizer parameter group(s), this optimizer "
                           f"{len(groups)}: it was written by another model or optimizer setup")
    changed = 0
    for group, saved in zip(groups, saved_groups):
        for key, value in saved.items():
            if key == "params":
                continue
            now = group.get(key)
            if not (key in group and (now is value or not (torch.is_tensor(now) or torch.is_tensor(value))
                                      and now == value)):
                changed += 1
            group[key] = value
    return changed


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

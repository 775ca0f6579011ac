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
    """Put the ``step`` of each fused (or capturable) AdamW parameter on that parameter's device as fp32, as
    ``Optimizer.load_state_dict`` does; returns how many it moved. DeepSpeed's universal-checkpoint load assigns
    the CPU tensor it read instead, and the fused GPU kernel reads its step on the device."""
    moved = 0
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if step is None:
                continue
            if not torch.is_tensor(step) or step.device != p.device or step.dtype != torch.float32:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
                moved += 1
    return moved


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

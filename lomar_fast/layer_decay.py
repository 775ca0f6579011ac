"""Layer-wise learning-rate decay for fine-tuning ViTs.

Every parameter gets a layer id: the patch embedding and the cls token sit at depth 0, block ``i``
at ``i + 1``, and everything after the blocks (fc_norm, head) at ``num_layers + 1``. Its lr is the
schedule's lr times ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``, so the head trains at
the full lr and the patch embedding at ``layer_decay ** (num_layers + 1)`` of it. 1-D parameters
(norms, biases) and the tokens (``cls_token``, shaped (1, 1, D)) get no weight decay.

Each returned group carries ``lr_scale``; :func:`lomar_fast.optim.set_lr` multiplies it in at every
step, so the scales survive any optimizer wrapper that keeps the group dicts (DeepSpeed ZeRO does).
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

EMBED_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "mask_token")
NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "mask_token")  # tokens are not weights, whatever their ndim


def layer_id(name: str, num_layers: int) -> int:
    """Depth of parameter ``name``: embeddings 0, ``blocks.i.*`` i + 1, anything else num_layers + 1."""
    if name.startswith(EMBED_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def lr_scale(layer: int, num_layers: int, layer_decay: float) -> float:
    """``layer_decay ** (num_layers + 1 - layer)``."""
    return float(layer_decay) ** (num_layers + 1 - layer)


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float,
                             num_layers: int | None = None,
                             no_weight_decay: Iterable[str] = NO_WEIGHT_DECAY) -> list[dict]:
    """Optimizer groups, one per (layer, decay or not), each with ``lr_scale``, ``weight_decay``,
    ``layer_id`` and the parameter ``names`` (``build_adamw`` drops the names).

    ``num_layers`` defaults to ``len(model.blocks)``. Frozen parameters are left out. Groups are
    ordered by layer, then no-decay before decay.
    """
    if num_layers is None:
        num_layers = len(model.blocks)  # type: ignore[arg-type]
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        lid = layer_id(name, num_layers)
        g = groups.setdefault((lid, decay), {
            "params": [], "names": [], "layer_id": lid,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": lr_scale(lid, num_layers, layer_decay)})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]

"""Models: LoMaR pretraining, the MAE baseline and the iRPE fine-tuning ViT.

``create_model(name, **kwargs)`` builds any of them by factory name.
"""
from __future__ import annotations

from . import classifier, lomar, mae
from .classifier import VisionTransformerRPE
from .lomar import LoMaR, sample_masks, sample_windows
from .mae import MAE

_MODULES = (lomar, mae, classifier)


def model_names() -> list[str]:
    """Every factory name: lomar_vit_*_patch16, mae_vit_*_patch16, vit_*_patch16."""
    return sorted(n for m in _MODULES for n in dir(m) if n.endswith("_patch16") and callable(getattr(m, n)))


def create_model(name: str, **kwargs):
    """Build a model by factory name; unknown names list the valid ones."""
    for m in _MODULES:
        fn = getattr(m, name, None)
        if fn is not None and name.endswith("_patch16"):
            return fn(**kwargs)
    raise ValueError(f"--model {name!r} is unknown; choose one of: {', '.join(model_names())}")


__all__ = ["LoMaR", "MAE", "VisionTransformerRPE", "create_model", "model_names", "sample_masks", "sample_windows"]

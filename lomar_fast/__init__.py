"""lomar_fast: fast LoMaR self-supervised ViT pretraining on DeepSpeed with FFCV loaders.

Importing the package registers the fine-tuning models with timm (``lomar_fast.timm_models``) without
importing timm itself: if timm is already imported they are registered now, otherwise right after
timm's own import finishes, so ``import lomar_fast; import timm`` and the reverse order both work.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register_timm_models() -> None:
    try:
        import lomar_fast.timm_models  # noqa: F401
    except Exception as e:  # noqa: BLE001 - registration is a convenience; never break the importer
        warnings.warn(f"lomar_fast: could not register the timm models ({type(e).__name__}: {e})", stacklevel=2)


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``timm`` is first imported, it wraps timm's loader so the lomar_fast
    models are registered as soon as timm has finished executing, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_timm_models()

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    _register_timm_models()
elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimmImport())

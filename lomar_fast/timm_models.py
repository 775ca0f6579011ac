"""The fine-tuning ViTs as timm models: ``timm.create_model("lomar_vit_base_patch16_224", ...)``.

Importing this module (``import lomar_fast.timm_models``) registers them with timm:
lomar_vit_{tiny,small,base,large,huge}_patch16_224 and lomar_vit_{base,large}_patch16_384. Their
``pretrained_cfg`` gives timm's data config MAE's evaluation crop: crop_pct 224/256 up to 224 px, 1.0 above.

``checkpoint_path=`` takes either kind of file:

- a fine-tuned classifier (``checkpoint-best.pth`` from ``lomar_fast.finetune``, or any state dict with
  ``fc_norm``/``head``): timm loads it strictly, as for any timm model;
- a pretraining export (``lomar_fast.export``'s ``model.pth``) or a published LoMaR checkpoint: the
  model's ``load_state_dict`` recognises the pretraining layout (no ``fc_norm``) and loads the encoder
  as ``--finetune`` does, dropping ``mask_token``, ``pos_embed``, ``norm`` and ``encoder_pred`` and
  keeping the fresh ``fc_norm`` and small-init ``head``; ``model.load_report`` lists what happened.

``pretrained=True`` with ``pretrained_cfg_overlay=dict(file="model.pth")`` loads the same way.
Keyword arguments follow timm: ``num_classes``, ``img_size`` (iRPE needs no interpolation),
``drop_path_rate``, ``global_pool`` ("avg" or "token"); ``depth``/``embed_dim``/``num_heads`` override
the size.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.models import register_model

from lomar_fast.images import IMAGENET_MEAN, IMAGENET_STD, eval_crop_pct
from lomar_fast.models.classifier import VisionTransformerRPE
from lomar_fast.models.vit import VIT_SIZES



class LomarVisionTransformer(VisionTransformerRPE):
    """VisionTransformerRPE with timm's model interface (pretrained_cfg, classifier reset) and a
    ``load_state_dict`` that also accepts pretraining checkpoints."""

    load_report: dict[str, list[str]] | None = None

    @property
    def num_features(self) -> int:
        return self.embed_dim

    def get_classifier(self) -> torch.nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = _pool_flag(global_pool)
        self.num_classes = num_classes
        self.head = torch.nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else torch.nn.Identity()
        if num_classes > 0:
            torch.nn.init.trunc_normal_(self.head.weight, std=2e-5)
            torch.nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        # fc_norm, like the head, is left unmatched: timm puts it past the last block, at the full lr under layer
        # decay (as lomar_fast.layer_decay and timm's own pooled ViT); matching it with (99999,) merged it into
        # the last block's layer (0.65x)
        return dict(stem=r"^cls_token|^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    _in_load_pretrained = False

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if self._in_load_pretrained:  # load_pretrained's own partial, non-strict load
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if is_pretraining_layout(state_dict):
            self._in_load_pretrained = True
            try:
                report = self.load_pretrained(dict(state_dict))
            finally:
                self._in_load_pretrained = False
            self.load_report = report
            return torch.nn.modules.module._IncompatibleKeys(report["initialized"], report["dropped"])
        self.load_report = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def is_pretraining_layout(sd: Mapping[str, Any]) -> bool:
    """A LoMaR pretraining state dict: encoder keys but no classifier ``fc_norm``."""
    return "fc_norm.weight" not in sd and any(k.startswith("blocks.") for k in sd) and "cls_token" in sd


def _pool_flag(global_pool: Any) -> bool:
    if isinstance(global_pool, bool):
        return global_pool
    if global_pool in ("avg", "mean"):
        return True
    if global_pool in ("token", "cls"):
        return False
    raise ValueError(f"global_pool {global_pool!r}: use 'avg' (mean of patch tokens) or 'token' (cls token)")


def _cfg_file(pretrained_cfg: Any, overlay: Mapping[str, Any] | None) -> str | None:
    if overlay and overlay.get("file"):
        return str(overlay["file"])
    if pretrained_cfg is None:
        return None
    file = pretrained_cfg.get("file") if isinstance(pretrained_cfg, Mapping) else getattr(pretrained_cfg, "file", None)
    return str(file) if file else None


def _build(name: str, size: str, default_size: int, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: Mapping[str, Any] | None = None, **kwargs) -> LomarVisionTransformer:
    kwargs.pop("cache_dir", None)
    for ignored in ("pretrained_strict", "device", "dtype"):
        kwargs.pop(ignored, None)
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    if "global_pool" in kwargs:
        kwargs["global_pool"] = _pool_flag(kwargs["global_pool"])
    if kwargs.pop("in_chans", 3) != 3:
        raise ValueError(f"{name}: only 3-channel input is supported")
    if kwargs.pop("drop_rate", 0.0):
        raise ValueError(f"{name}: drop_rate (head dropout) is not supported; use drop_path_rate")
    cfg = dict(VIT_SIZES[size], patch_size=16, img_size=default_size, drop_path=0.0)
    cfg.update(kwargs)
    model = LomarVisionTransformer(**cfg)
    s = model.img_size
    model.pretrained_cfg = dict(architecture=name, url="", file=None, num_classes=model.num_classes,
                                input_size=(3, s, s), crop_pct=eval_crop_pct(s), interpolation="bicubic",
                                mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj",
                                classifier="head", license="see lomar_fast")
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        file = _cfg_file(pretrained_cfg, pretrained_cfg_overlay)
        if not file:
            raise RuntimeError(f"{name} has no hosted weights: pass checkpoint_path='model.pth' or "
                               f"pretrained_cfg_overlay=dict(file='model.pth')")
        from lomar_fast.checkpoint import load_file

        sd = load_file(file)
        if is_pretraining_layout(sd):
            model.load_state_dict(sd)
        else:  # a classifier: keep the head only when it fits (timm's pretrained semantics)
            own = model.state_dict()
            head_fits = all(k in sd and tuple(sd[k].shape) == tuple(own[k].shape) for k in own if k.startswith("head."))
            keep = {k: v for k, v in sd.items() if head_fits or not k.startswith("head.")}
            missing, unexpected = super(LomarVisionTransformer, model).load_state_dict(keep, strict=False)
            if unexpected or [k for k in missing if not k.startswith("head.")]:
                raise RuntimeError(f"{file} does not fit {name}: missing {missing}, unexpected {unexpected}")
        model.pretrained_cfg["file"] = file
    return model


def _register(size: str, img_size: int):
    name = f"lomar_vit_{size}_patch16_{img_size}"

    def entry(pretrained: bool = False, **kwargs) -> LomarVisionTransformer:
        return _build(name, size, img_size, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"LoMaR iRPE ViT-{size}/16 classifier at {img_size} px ({VIT_SIZES[size]})."
    globals()[name] = register_model(entry)
    return entry


MODEL_NAMES = [f"lomar_vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large", "huge")] + [
    f"lomar_vit_{s}_patch16_384" for s in ("base", "large")]

for _name in MODEL_NAMES:
    _size, _px = _name.split("_")[2], int(_name.rsplit("_", 1)[1])
    _register(_size, _px)

"""lomar_fast: fast LoMaR self-supervised ViT pretraining on DeepSpeed with FFCV loaders.

The fine-tuning ViTs become timm models when ``lomar_fast.timm_models`` is imported (``import
lomar_fast.timm_models``); timm's ``create_model("lomar_vit_base_patch16_224", ...)`` then builds them.
"""

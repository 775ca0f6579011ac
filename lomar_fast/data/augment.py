"""Fine-tuning augmentation on the device, after the loader: normalization, random erasing, Mixup/CutMix
with label smoothing, and the matching training criterion (MAE's fine-tuning recipe)."""
from __future__ import annotations

import torch

from lomar_fast.images import normalize_images


class BatchAugment:
    """``(uint8 images (B, S, S, 3), int64 labels (B,)) -> (normalized float images (B, 3, S, S), targets)``.

    Targets are soft (B, num_classes) when Mixup/CutMix is on, else class indices; ``criterion`` takes
    (logits, targets). Random draws come from the global torch/NumPy streams, which the trainer seeds
    per (seed, rank, epoch).
    """

    def __init__(self, cfg, num_classes: int, device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.mixup = None
        if cfg.mixup_active:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.smoothing, num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.erase = None
        if cfg.reprob > 0:
            self.erase = RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device=device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, info=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_images(images)
        targets = labels.reshape(-1).long()
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            x, targets = self.mixup(x, targets)
        return x, targets

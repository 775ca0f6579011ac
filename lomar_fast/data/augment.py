"""Fine-tuning augmentation on the device, after the loader: RandAugment on the uint8 batch, normalization,
random erasing, Mixup/CutMix with label smoothing, and the matching training criterion (MAE's fine-tuning
recipe)."""
from __future__ import annotations

import torch

from lomar_fast.images import normalize_images


class BatchAugment:
    """``(uint8 images (B, S, S, 3), int64 labels (B,)) -> (normalized float images (B, 3, S, S), targets)``.

    Targets are soft (B, num_classes) when Mixup/CutMix is on, else class indices; ``criterion`` takes
    (logits, targets). RandAugment's draws are a function of (seed, epoch, sample index)
    (lomar_fast.data.randaugment); erasing and Mixup/CutMix draw from the global torch/NumPy streams,
    which the trainer seeds per (seed, rank, epoch).
    """

    def __init__(self, cfg, num_classes: int, device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        from lomar_fast.data.randaugment import build_rand_augment

        self.seed = cfg.seed
        self.rand_augment = build_rand_augment(cfg.aa, cfg.input_size)
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
        """``info``: the trainer's StepInfo (epoch and the batch's dataset indices, for RandAugment)."""
        if self.rand_augment is not None:
            indices = torch.as_tensor(info.sample_ids, dtype=torch.long)  # host indices: the plan is drawn there
            images = self.rand_augment(images, seed=self.seed, epoch=info.epoch, indices=indices)
        x = normalize_images(images)
        targets = labels.reshape(-1).long()
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            x, targets = self.mixup(x, targets)
        return x, targets

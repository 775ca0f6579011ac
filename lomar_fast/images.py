"""Image constants and the one normalization every consumer of loader batches shares."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 NHWC (0..255) -> float32 NCHW normalized with ``mean``/``std``; float NCHW passes through."""
    if images.dtype == torch.uint8:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        m, s = channel_stats(mean, std, x.device, x.dtype)
        return (x - m) / s
    return images


_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def channel_stats(mean, std, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as (1, 3, 1, 1) tensors on ``device``, made once per device and dtype: building them
    is a copy from host memory, which on a GPU makes the host wait for the device (twice a step, as it was).
    Inside a compiled graph they are constants."""
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1),
                torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1))

    if torch.compiler.is_compiling():
        return make()
    key = (device, dtype, tuple(mean), tuple(std))
    got = _STATS.get(key)
    if got is None:
        with torch.inference_mode(False):  # usable by training steps after an evaluation filled the cache
            got = _STATS[key] = make()
    return got


def eval_crop_pct(input_size: int) -> float:
    """The evaluation crop as a fraction of the short side (MAE's): 224/256 up to 224 px, 1.0 (a plain
    resize of the whole short side) above."""
    return 224 / 256 if input_size <= 224 else 1.0


# How the training crops and the evaluation center crop are resized (lomar_fast.data.seeded_crop):
# "bicubic" is PIL's antialiased bicubic of the MAE/LoMaR reference pipelines, pixel for pixel; "area" is
# FFCV's OpenCV INTER_AREA (faster where crops are enlarged, e.g. at 384 px and above).
DEFAULT_INTERPOLATION = "bicubic"
INTERPOLATIONS = ("area", "bicubic")

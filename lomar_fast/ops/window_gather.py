"""Window gather: cut K windows of w x w patches out of each image, normalize and patchify them,
and build the reconstruction targets of the masked patches.

This file owns the operation: :func:`gather_windows` dispatches to the fused CUDA kernel for CUDA
tensors when kernels are enabled (see :mod:`lomar_fast.ops._dispatch`) and to the reference path of
:mod:`lomar_fast.ops.window_gather_ref` otherwise. The reference path defines the meaning.
"""
from __future__ import annotations

import torch

from lomar_fast.images import IMAGENET_MEAN, IMAGENET_STD, normalize_images

from ._dispatch import use_kernel
from .window_gather_ref import (NORM_PIX_EPS, check_window_inputs, gather_visible_reference,
                                gather_windows_reference, masked_positions, n_mask_of, norm_pix, patchify,
                                visible_positions, window_patch_ids)

__all__ = ["gather_windows", "gather_windows_reference", "gather_visible_reference", "check_window_inputs",
           "masked_positions", "visible_positions", "norm_pix", "patchify", "window_patch_ids", "normalize_images",
           "IMAGENET_MEAN", "IMAGENET_STD", "NORM_PIX_EPS", "AUTO_USES_KERNEL"]

# On by default: benchmarks/results/h200/kernels.md shows the kernel correct and faster than the
# torch.compile'd reference (0.31 vs 0.36-0.38 ms at ViT-B shapes, 4x the eager reference).
AUTO_USES_KERNEL = True


def gather_windows(
    images: torch.Tensor,
    windows: torch.Tensor,
    masks: torch.Tensor,
    patch_size: int,
    window_size: int,
    norm_pix_loss: bool = True,
    out_dtype: torch.dtype = torch.float32,
    validate: bool = True,
    n_mask: int | None = None,
    visible_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window patches and masked-patch targets in one call.

    Args:
        images: uint8 (B, H, W, 3) straight from the loader (normalized here with ImageNet mean/std),
            or float (B, 3, H, W) already normalized.
        windows: int64 (B, K, 2) window origins (top, left) in patches.
        masks: bool (B, K, w*w), True = masked, row-major in the window; the same count in every window.
        patch_size: p. window_size: w.
        norm_pix_loss: normalize each target patch by its own mean and unbiased variance.
        out_dtype: dtype of the returned window patches (the model's compute dtype).
        validate: check shapes and ranges (costs host syncs; the training step turns it off).
        n_mask: masked patches per window when the caller knows it (saves a host sync).
        visible_only: return only the visible window patches (B*K, w*w - n_mask, p*p*3), ascending
            position, for a patch embedding that runs on the visible tokens alone.
    Returns:
        patches: (B*K, w*w, p*p*3) in ``out_dtype``, image-major (row = b*K + k).
        targets: (B*K, n_mask, p*p*3) float32, the masked patches in ascending position order.
    """
    if validate:
        check_window_inputs(images, windows, masks, patch_size, window_size)
    if use_kernel(images, auto_default=AUTO_USES_KERNEL):
        from . import _window_gather_cuda  # imported lazily: needs CuPy and a GPU

        if n_mask is None:
            n_mask = n_mask_of(masks, window_size)
        return _window_gather_cuda.gather_windows_kernel(images, windows, masks, patch_size, window_size,
                                                         norm_pix_loss, out_dtype, n_mask, visible_only)
    ref = gather_visible_reference if visible_only else gather_windows_reference
    return ref(images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype, n_mask)

"""Window gather: cut K windows of w x w patches out of each image, normalize and patchify them,
and build the reconstruction targets of the masked patches.

This file owns the operation: :func:`gather_windows` dispatches to the fused CUDA kernel for CUDA
tensors when kernels are enabled (see :mod:`lomar_fast.ops._dispatch`) and to the reference path
below otherwise. The reference path defines the meaning.

Patch vectors are ordered (row in patch, column in patch, channel), as MAE's ``patchify``.
"""
from __future__ import annotations

import torch

from ._dispatch import use_kernel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_PIX_EPS = 1e-6

# On by default: benchmarks/results/h200/kernels.md shows the kernel correct and faster than the
# torch.compile'd reference (0.31 vs 0.36-0.38 ms at ViT-B shapes, 4x the eager reference).
AUTO_USES_KERNEL = True


def normalize_images(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 NHWC (0..255) -> float32 NCHW normalized with ``mean``/``std``; float NCHW passes through."""
    if images.dtype == torch.uint8:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - m) / s
    return images


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches row-major, vectors (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def window_patch_ids(windows: torch.Tensor, window_size: int, grid_w: int) -> torch.Tensor:
    """(B, K, 2) window origins (top, left) in patches -> (B, K, w*w) flat patch ids, row-major."""
    r = torch.arange(window_size, device=windows.device)
    rows = windows[..., 0, None, None] + r.view(1, 1, -1, 1)  # (B, K, w, 1)
    cols = windows[..., 1, None, None] + r.view(1, 1, 1, -1)  # (B, K, 1, w)
    return (rows * grid_w + cols).reshape(*windows.shape[:2], window_size * window_size)


def masked_positions(masks: torch.Tensor, n_mask: int | None = None) -> torch.Tensor:
    """(N, P) bool masks with the same count per row -> (N, n_mask) masked positions, ascending.

    ``n_mask`` (the count per row) avoids a host sync when the caller knows it.
    """
    if n_mask is None:
        n_mask = int(masks[0].sum()) if masks.shape[0] else 0
    order = torch.argsort((~masks).to(torch.int8), dim=1, stable=True)
    return order[:, :n_mask]


def norm_pix(target: torch.Tensor) -> torch.Tensor:
    """Normalize each patch vector by its own mean and unbiased variance (eps 1e-6)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + NORM_PIX_EPS) ** 0.5


def gather_windows_reference(
    images: torch.Tensor,
    windows: torch.Tensor,
    masks: torch.Tensor,
    patch_size: int,
    window_size: int,
    norm_pix_loss: bool = True,
    out_dtype: torch.dtype = torch.float32,
    n_mask: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: normalize -> patchify -> gather. See :func:`gather_windows`."""
    x = normalize_images(images).float()
    b, _, h, w = x.shape
    grid_w = w // patch_size
    patches = patchify(x, patch_size)  # (B, G*G, P)
    k = windows.shape[1]
    ids = window_patch_ids(windows, window_size, grid_w).reshape(b, -1)  # (B, K*w*w)
    win = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))
    win = win.reshape(b * k, window_size * window_size, -1)
    pos = masked_positions(masks.reshape(b * k, -1), n_mask)
    target = torch.gather(win, 1, pos[..., None].expand(-1, -1, win.shape[-1]))
    if norm_pix_loss:
        target = norm_pix(target)
    return win.to(out_dtype), target.float()


def check_window_inputs(images, windows, masks, patch_size: int, window_size: int) -> None:
    """Raise ValueError naming the input when shapes, dtypes or ranges do not fit together."""
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: uint8 images must be NHWC with 3 channels, got shape {tuple(images.shape)}")
        h, w = images.shape[1], images.shape[2]
    elif images.is_floating_point():
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: float images must be NCHW with 3 channels, got shape {tuple(images.shape)}")
        h, w = images.shape[2], images.shape[3]
    else:
        raise ValueError(f"images: expected uint8 NHWC or float NCHW, got dtype {images.dtype}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"images: size {h}x{w} is not divisible by the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    b = images.shape[0]
    if windows.dim() != 3 or windows.shape[0] != b or windows.shape[2] != 2:
        raise ValueError(f"windows: expected ({b}, K, 2) (top, left) in patches, got {tuple(windows.shape)}")
    if windows.dtype != torch.long:
        raise ValueError(f"windows: expected int64, got {windows.dtype}")
    k = windows.shape[1]
    if masks.shape != (b, k, window_size * window_size) or masks.dtype != torch.bool:
        raise ValueError(
            f"masks: expected bool ({b}, {k}, {window_size * window_size}), got {masks.dtype} {tuple(masks.shape)}"
        )
    if windows.numel() and (
        int(windows.min()) < 0
        or int(windows[..., 0].max()) > gh - window_size
        or int(windows[..., 1].max()) > gw - window_size
    ):
        raise ValueError(
            f"windows: origins must lie in [0, {gh - window_size}] x [0, {gw - window_size}] "
            f"for a {gh}x{gw} grid and window {window_size}"
        )
    counts = masks.sum(-1)
    if counts.numel() and bool((counts != counts.reshape(-1)[0]).any()):
        raise ValueError("masks: every window must mask the same number of patches")


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
    Returns:
        patches: (B*K, w*w, p*p*3) in ``out_dtype``, image-major (row = b*K + k).
        targets: (B*K, n_mask, p*p*3) float32, the masked patches in ascending position order.
    """
    if validate:
        check_window_inputs(images, windows, masks, patch_size, window_size)
    if use_kernel(images, auto_default=AUTO_USES_KERNEL):
        from . import _window_gather_cuda  # imported lazily: needs CuPy and a GPU

        return _window_gather_cuda.gather_windows(
            images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype, n_mask=n_mask
        )
    return gather_windows_reference(images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype,
                                    n_mask)

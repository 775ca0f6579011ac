"""Meaning and input checks of the window gather, shared by the op's owner
(:mod:`lomar_fast.ops.window_gather`) and its CUDA wrapper (:mod:`lomar_fast.ops._window_gather_cuda`).

The reference paths define the op: normalize -> patchify -> gather the K windows -> gather and (optionally)
normalize the masked patches as targets. Patch vectors are ordered (row in patch, column in patch,
channel), as MAE's ``patchify``.
"""
from __future__ import annotations

import torch

from lomar_fast.images import normalize_images

NORM_PIX_EPS = 1e-6


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
    for name, t in (("windows", windows), ("masks", masks)):
        if t.device != images.device:  # the kernel would read a host pointer as device memory
            raise ValueError(f"{name}: on {t.device}, but the images are on {images.device}; sample them with "
                             f"device=images.device")
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


def visible_positions(masks: torch.Tensor, n_visible: int) -> torch.Tensor:
    """(N, P) bool masks -> (N, n_visible) visible positions, ascending."""
    order = torch.argsort(masks.to(torch.int8), dim=1, stable=True)
    return order[:, :n_visible]


def gather_visible_reference(images, windows, masks, patch_size: int, window_size: int,
                             norm_pix_loss: bool = True, out_dtype: torch.dtype = torch.float32,
                             n_mask: int | None = None):
    """Reference of the ``visible_only`` variant: (visible patches (B*K, n_vis, V), targets)."""
    win, target = gather_windows_reference(images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype,
                                           n_mask)
    n_vis = win.shape[1] - target.shape[1]
    pos = visible_positions(masks.reshape(win.shape[0], -1), n_vis)
    return torch.gather(win, 1, pos[..., None].expand(-1, -1, win.shape[-1])), target


def n_mask_of(masks: torch.Tensor, window_size: int) -> int:
    """Masked patches per window, read from the first window (one host sync)."""
    flat = masks.reshape(-1, window_size * window_size)
    return int(flat[0].sum()) if flat.shape[0] else 0

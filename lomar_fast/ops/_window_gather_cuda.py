"""CUDA side of the window gather (``cuda/window_gather.cu``), as a ``torch.library`` custom op.

Op (namespace ``lomar_fast``, forward only):

``gather_windows(images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype, n_mask, visible_only)
-> (patches, targets)``

* ``patches``: (B*K, w*w, p*p*3) in ``out_dtype``, or with ``visible_only`` (B*K, w*w - n_mask, p*p*3):
  only the visible patches, ascending position order (so a patch embedding can run on those alone).
* ``targets``: (B*K, n_mask, p*p*3) float32, the masked patches in ascending position order,
  normalized per patch (mean, unbiased variance, eps 1e-6) when ``norm_pix_loss``.

Inputs and meaning as :func:`lomar_fast.ops.window_gather.gather_windows`; ``n_mask`` must equal the
number of masked patches in every window (the caller knows it from the mask ratio; if it is not
given, :func:`gather_windows` reads it from the first window, one host sync).

The op runs the CUDA kernel on CUDA tensors and the reference path on other devices (so the
registration and fake implementation can be checked on CPU).
"""
from __future__ import annotations

import torch

from . import _cuda_build as cb
from lomar_fast.images import IMAGENET_MEAN, IMAGENET_STD

from .window_gather_ref import gather_visible_reference, gather_windows_reference

SOURCE = "window_gather.cu"
THREADS = 256  # LOMAR_GATHER_THREADS in window_gather.cu
MAX_SHARED = 48 * 1024  # per block without the opt-in, static and dynamic together
STATIC_SHARED = 256  # the kernel's own __shared__ arrays (red[33], s_rank: 144 B as ptxas lays them out), rounded up
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"window_gather<{cb.CUDA_TYPE_NAMES[ti]}, {cb.CUDA_TYPE_NAMES[to]}>"
    for ti in (torch.uint8,) + FLOAT_IN_DTYPES
    for to in OUT_DTYPES
)


def _image_geometry(images: torch.Tensor):
    """(height, width, strides in (batch, channel, y, x) order) of uint8 NHWC or float NCHW images."""
    s = images.stride()
    if images.dtype == torch.uint8:
        return images.shape[1], images.shape[2], (s[0], s[3], s[1], s[2])
    return images.shape[2], images.shape[3], (s[0], s[1], s[2], s[3])


@torch.library.custom_op("lomar_fast::gather_windows", mutates_args=())
def gather_windows_op(
    images: torch.Tensor,
    windows: torch.Tensor,
    masks: torch.Tensor,
    patch_size: int,
    window_size: int,
    norm_pix_loss: bool,
    out_dtype: torch.dtype,
    n_mask: int,
    visible_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    b, k = windows.shape[0], windows.shape[1]
    ww = window_size * window_size
    v = patch_size * patch_size * 3
    n_rows = ww - n_mask if visible_only else ww
    use_kernel = (
        images.is_cuda
        and (images.dtype == torch.uint8 or images.dtype in FLOAT_IN_DTYPES)
        and out_dtype in OUT_DTYPES
        and fits_shared(patch_size)
    )
    if not use_kernel:
        ref = gather_visible_reference if visible_only else gather_windows_reference
        return ref(images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype)

    patches = torch.empty((b * k, n_rows, v), dtype=out_dtype, device=images.device)
    targets = torch.empty((b * k, n_mask, v), dtype=torch.float32, device=images.device)
    if b * k * ww == 0:
        return patches, targets
    windows_c = windows.contiguous()
    masks_c = masks.contiguous().view(torch.uint8)
    _, _, (s_b, s_c, s_y, s_x) = _image_geometry(images)
    kernel = f"window_gather<{cb.CUDA_TYPE_NAMES[images.dtype]}, {cb.CUDA_TYPE_NAMES[out_dtype]}>"
    args = (
        cb.ptr(images), cb.i64(s_b), cb.i64(s_c), cb.i64(s_y), cb.i64(s_x),
        cb.ptr(windows_c), cb.ptr(masks_c), cb.ptr(patches), cb.ptr(targets),
        cb.i32(k), cb.i32(patch_size), cb.i32(window_size), cb.i32(n_mask),
        cb.i32(int(visible_only)), cb.i32(int(norm_pix_loss)),
        *(cb.f32(x) for x in IMAGENET_MEAN), *(cb.f32(x) for x in IMAGENET_STD),
    )
    cb.launch(SOURCE, NAME_EXPRESSIONS, kernel, images.device, b * k * ww, THREADS, args, 4 * v)
    return patches, targets


def fits_shared(patch_size: int) -> bool:
    """Whether one patch's fp32 values (the dynamic shared memory) fit beside the kernel's static arrays."""
    return 4 * patch_size * patch_size * 3 + STATIC_SHARED <= MAX_SHARED


@gather_windows_op.register_fake
def _gather_windows_fake(images, windows, masks, patch_size, window_size, norm_pix_loss, out_dtype, n_mask, visible_only):
    b, k = windows.shape[0], windows.shape[1]
    ww = window_size * window_size
    v = patch_size * patch_size * 3
    n_rows = ww - n_mask if visible_only else ww
    patches = images.new_empty((b * k, n_rows, v), dtype=out_dtype)
    targets = images.new_empty((b * k, n_mask, v), dtype=torch.float32)
    return patches, targets


def gather_windows_kernel(images: torch.Tensor, windows: torch.Tensor, masks: torch.Tensor, patch_size: int,
                          window_size: int, norm_pix_loss: bool, out_dtype: torch.dtype, n_mask: int,
                          visible_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel path of :func:`lomar_fast.ops.window_gather.gather_windows` (same arguments and results;
    ``n_mask`` must be given)."""
    return torch.ops.lomar_fast.gather_windows(images, windows, masks, patch_size, window_size, norm_pix_loss,
                                               out_dtype, n_mask, visible_only)

"""LoMaR pretraining model: masked reconstruction inside K small windows per image.

One step: cut K windows of w x w patches out of each image, embed their patches, replace the masked
ones by a learned mask token, prepend cls, run ViT blocks with contextual iRPE (the only position
signal), predict the pixels of every window patch, and take the MSE over the masked patches.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lomar_fast.ops.window_gather import gather_windows
from lomar_fast.ops.window_gather_ref import masked_positions

from .irpe import DEFAULT_RATIO, bucket_ids
from .vit import Block, PatchEmbed, drop_path_rates, init_vit_weights, sincos_pos_embed_2d, size_factory

WindowSampling = Literal["per_batch", "per_image"]
Pairing = Literal["all", "published"]


def validate_lomar_geometry(img_size: int, patch_size: int, window_size: int, num_window: int,
                            mask_ratio: float) -> None:
    """Raise ValueError naming the setting and its limit when the LoMaR geometry is impossible."""
    if img_size % patch_size:
        raise ValueError(f"input_size {img_size} is not divisible by the patch size {patch_size}; "
                         f"use a multiple of {patch_size}")
    grid = img_size // patch_size
    if window_size < 1 or window_size > grid:
        raise ValueError(f"window_size {window_size} must be between 1 and the grid side {grid} "
                         f"(input_size {img_size} / patch {patch_size})")
    if num_window < 1 or num_window > grid - window_size + 1:
        raise ValueError(f"num_window {num_window} must be between 1 and grid - window_size + 1 = "
                         f"{grid - window_size + 1} (grid {grid}, window_size {window_size})")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio {mask_ratio} must be in [0, 1)")
    if int(window_size * window_size * mask_ratio) < 1:
        raise ValueError(f"mask_ratio {mask_ratio} masks no patch of a {window_size}x{window_size} window; raise it")


def sample_windows(batch: int, num_window: int, grid: int, window_size: int, *,
                   sampling: WindowSampling = "per_batch", pairing: Pairing = "all",
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Window origins (B, K, 2) = (top, left) in patches.

    Tops are the first K of a random permutation of 0..G-w, lefts likewise (so tops are distinct and
    lefts are distinct). ``per_batch`` draws one set shared by the batch (published); ``per_image``
    draws a set per image. ``pairing="published"`` reproduces the published code's pairing: row
    r = k*B + n of its window-major feature copy meets window (r mod K) of image (r div K)'s set,
    i.e. image n's k-th window is set[(n + kB) div K][(n + kB) mod K].
    """
    if sampling not in ("per_batch", "per_image"):
        raise ValueError(f"window_sampling {sampling!r} must be 'per_batch' or 'per_image'")
    if pairing not in ("all", "published"):
        raise ValueError(f"pairing {pairing!r} must be 'all' or 'published'")
    span = grid - window_size + 1
    n_sets = 1 if sampling == "per_batch" else batch
    keys = torch.rand(n_sets, 2, span, generator=generator, device=device)
    origins = keys.argsort(dim=-1)[..., :num_window].transpose(1, 2)  # (n_sets, K, 2)
    sets = origins.expand(batch, -1, -1) if sampling == "per_batch" else origins
    if pairing == "published":
        r = torch.arange(num_window, device=origins.device) * batch + torch.arange(batch, device=origins.device)[:, None]
        sets = sets[r // num_window, r % num_window]  # (B, K, 2)
    return sets.contiguous()


def sample_masks(batch: int, num_window: int, window_size: int, mask_ratio: float, *,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B, K, w*w) bool masks, True = masked: a uniformly random set of int(w*w*ratio) per window."""
    n = window_size * window_size
    n_mask = int(n * mask_ratio)
    noise = torch.rand(batch, num_window, n, generator=generator, device=device)
    rank = noise.argsort(dim=-1).argsort(dim=-1)
    return rank < n_mask


class LoMaR(nn.Module):
    """LoMaR ViT for pretraining. State-dict names follow the published ``MaskedAutoencoderViT``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, window_size: int = 7, num_window: int = 4,
                 mask_ratio: float = 0.8, norm_pix_loss: bool = True, window_sampling: WindowSampling = "per_batch",
                 pairing: Pairing = "all", rpe_ratio: float = DEFAULT_RATIO, scaled_query: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        validate_lomar_geometry(img_size, patch_size, window_size, num_window, mask_ratio)
        if window_sampling not in ("per_batch", "per_image"):
            raise ValueError(f"window_sampling {window_sampling!r} must be 'per_batch' or 'per_image'")
        if pairing not in ("all", "published"):
            raise ValueError(f"pairing {pairing!r} must be 'all' or 'published'")
        self.img_size, self.patch_size = img_size, patch_size
        self.window_size, self.num_window, self.mask_ratio = window_size, num_window, mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.window_sampling, self.pairing = window_sampling, pairing
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.rpe_ratio = rpe_ratio
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # kept for checkpoint-layout compatibility with the published code; never added to the tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim), requires_grad=False)
        dpr = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, dpr[i], rpe=True, rpe_ratio=rpe_ratio, scaled_query=scaled_query)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.encoder_pred = nn.Linear(embed_dim, patch_size * patch_size * 3)
        self.register_buffer("buckets", bucket_ids(window_size, window_size, rpe_ratio, True), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        init_vit_weights(self)
        self.pos_embed.data.copy_(torch.from_numpy(
            sincos_pos_embed_2d(self.embed_dim, self.img_size // self.patch_size, cls_token=True)).float()[None])
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_masked(self) -> int:
        return int(self.window_size * self.window_size * self.mask_ratio)

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None):
        """Draw (windows (B, K, 2), masks (B, K, w*w)) per the model's sampling and pairing settings."""
        device = device if device is not None else self.cls_token.device
        windows = sample_windows(batch, self.num_window, self.grid, self.window_size,
                                 sampling=self.window_sampling, pairing=self.pairing,
                                 generator=generator, device=device)
        masks = sample_masks(batch, self.num_window, self.window_size, self.mask_ratio,
                             generator=generator, device=device)
        return windows, masks

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless ``images`` is float NCHW or uint8 NHWC at the model's size."""
        if images.dtype == torch.uint8:
            ok = images.dim() == 4 and images.shape[-1] == 3
            hw = tuple(images.shape[1:3]) if images.dim() == 4 else None
            layout = "uint8 NHWC"
        elif images.is_floating_point():
            ok = images.dim() == 4 and images.shape[1] == 3
            hw = tuple(images.shape[2:4]) if images.dim() == 4 else None
            layout = "float NCHW"
        else:
            raise ValueError(f"images: dtype {images.dtype} is not supported; pass uint8 NHWC or normalized float NCHW")
        if not ok:
            raise ValueError(f"images: {layout} needs shape (B, {'H, W, 3' if images.dtype == torch.uint8 else '3, H, W'}),"
                             f" got {tuple(images.shape)}")
        if hw != (self.img_size, self.img_size):
            raise ValueError(f"images: size {hw[0]}x{hw[1]} does not match the model's input_size {self.img_size}; "
                             f"resize/crop to {self.img_size} or build the model with img_size={hw[0]}")

    def forward_encoder(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(N, w*w, P) window patches + (N, w*w) masks -> (N, 1 + w*w, D) encoded tokens."""
        x = self.patch_embed.embed_patches(patches)
        x = torch.where(masks[..., None], self.mask_token.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x, self.buckets)
        return self.norm(x)

    def forward_loss(self, pred: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """MSE averaged over masked patches: pred (N, w*w, P), targets (N, n_mask, P), masks (N, w*w)."""
        pos = masked_positions(masks, targets.shape[1])
        pm = torch.gather(pred, 1, pos[..., None].expand(-1, -1, pred.shape[-1]))
        return (pm.float() - targets).pow(2).mean()

    def forward(self, images: torch.Tensor, windows: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                generator: torch.Generator | None = None, validate: bool = True):
        """Reconstruction loss on K windows per image.

        Args:
            images: float (B, 3, S, S) already normalized, or uint8 (B, S, S, 3) (normalized inside).
            windows: int64 (B, K, 2) window origins (top, left) in patches; drawn when None.
            masks: bool (B, K, w*w), True = masked, row-major in the window; drawn when None.
            generator: the RNG stream that draws windows and masks.
            validate: check inputs (host syncs); a training step that built them itself may skip it.
                Without validation, given masks must mask ``num_masked`` patches per window.
        Returns:
            (loss scalar fp32, pred (B*K, w*w, p*p*3) image-major, masks (B*K, w*w) bool).
        """
        if validate:
            self.check_images(images)
        b = images.shape[0]
        if windows is None or masks is None:
            sw, sm = self.sample(b, generator=generator, device=images.device)
            windows = sw if windows is None else windows
            masks = sm if masks is None else masks
        device_type = images.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else (
            self.patch_embed.proj.weight.dtype)
        n_mask = None if validate else self.num_masked
        patches, targets = gather_windows(images, windows, masks, self.patch_size, self.window_size,
                                          self.norm_pix_loss, out_dtype=dtype, validate=validate, n_mask=n_mask)
        flat_masks = masks.reshape(b * windows.shape[1], -1)
        x = self.forward_encoder(patches, flat_masks)
        pred = self.encoder_pred(x[:, 1:])
        loss = self.forward_loss(pred, targets, flat_masks)
        return loss, pred, flat_masks


def _lomar(**cfg) -> LoMaR:
    return LoMaR(**cfg)


lomar_vit_tiny_patch16 = size_factory(_lomar, "tiny", "lomar_vit_tiny_patch16", "LoMaR pretraining model")
lomar_vit_small_patch16 = size_factory(_lomar, "small", "lomar_vit_small_patch16", "LoMaR pretraining model")
lomar_vit_base_patch16 = size_factory(_lomar, "base", "lomar_vit_base_patch16", "LoMaR pretraining model")
lomar_vit_large_patch16 = size_factory(_lomar, "large", "lomar_vit_large_patch16", "LoMaR pretraining model")
lomar_vit_huge_patch16 = size_factory(_lomar, "huge", "lomar_vit_huge_patch16", "LoMaR pretraining model")

"""MAE baseline on the same blocks and SDPA path as LoMaR, so throughput comparisons are fair.

Encoder on the visible 25% of the patches with fixed 2-D sin-cos position embeddings; a light
decoder (8 blocks, 512 wide) reconstructs every patch; MSE on the masked patches (norm-pix by
default). Parameter names follow the published MAE checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from lomar_fast.images import normalize_images
from lomar_fast.ops.window_gather_ref import norm_pix, patchify

from .vit import Block, PatchEmbed, init_vit_weights, sincos_pos_embed_2d, size_factory


class MAE(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not divisible by the patch size {patch_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} must be in [0, 1)")
        self.img_size, self.patch_size = img_size, patch_size
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.decoder_embed_dim, self.decoder_depth = decoder_embed_dim, decoder_depth
        grid = img_size // patch_size
        self.num_patches = grid * grid

        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        self._init_weights(grid)

    def _init_weights(self, grid: int) -> None:
        init_vit_weights(self)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.embed_dim, grid, True)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.decoder_embed_dim, grid, True)).float()[None])
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep the patches with the smallest noise (argsort ascending, first kept).

        Returns (kept tokens (B, L_keep, D), mask (B, L) with 1 = removed, ids_restore (B, L)).
        """
        b, l, d = x.shape
        keep = int(l * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, l, device=x.device)
        elif noise.shape != (b, l):
            raise ValueError(f"noise: expected shape ({b}, {l}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
        mask = torch.ones(b, l, device=x.device)  # fp32 as MAE's: under bf16 its sum, the loss's count, was rounded
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        b, l = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, l + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            target = norm_pix(target)
        loss = (pred.float() - target).pow(2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """images: float (B, 3, S, S) normalized or uint8 (B, S, S, 3). Returns (loss, pred (B, L, P), mask (B, L))."""
        if images.dtype == torch.uint8:
            if images.dim() != 4 or images.shape[-1] != 3:
                raise ValueError(f"images: uint8 images must be NHWC, got shape {tuple(images.shape)}")
        elif not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected float NCHW or uint8 NHWC, got {images.dtype} {tuple(images.shape)}")
        images = normalize_images(images)
        if tuple(images.shape[2:]) != (self.img_size, self.img_size):
            raise ValueError(f"images: size {tuple(images.shape[2:])} does not match input_size {self.img_size}")
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(images, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask


def _mae(**cfg) -> MAE:
    return MAE(**cfg)


_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
mae_vit_tiny_patch16 = size_factory(_mae, "tiny", "mae_vit_tiny_patch16", "MAE baseline (8x512 decoder)", **_DECODER)
mae_vit_base_patch16 = size_factory(_mae, "base", "mae_vit_base_patch16", "MAE baseline (8x512 decoder)", **_DECODER)
mae_vit_large_patch16 = size_factory(_mae, "large", "mae_vit_large_patch16", "MAE baseline (8x512 decoder)", **_DECODER)
mae_vit_huge_patch16 = size_factory(_mae, "huge", "mae_vit_huge_patch16", "MAE baseline (8x512 decoder)", **_DECODER)

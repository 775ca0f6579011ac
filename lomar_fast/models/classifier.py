"""Fine-tuning ViT with iRPE over the whole G x G grid (+cls): average pool -> fc_norm -> head.

The iRPE tables (1, head_dim, 50) carry over from pretraining at any resolution: buckets depend on
offsets only, and offsets beyond the window saturate into the outer buckets.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from lomar_fast.checkpoint import CheckpointMismatch, state_dict_of

from .irpe import DEFAULT_RATIO, bucket_ids
from .vit import Block, PatchEmbed, drop_path_rates, init_vit_weights, size_factory


class VisionTransformerRPE(nn.Module):
    """ViT classifier; parameter names follow timm's ViT where the architectures agree."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_classes: int = 1000, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 rpe_ratio: float = DEFAULT_RATIO, scaled_query: bool = False, global_pool: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not divisible by the patch size {patch_size}")
        self.img_size, self.patch_size, self.num_classes = img_size, patch_size, num_classes
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.rpe_ratio, self.global_pool = rpe_ratio, global_pool
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, dpr[i], rpe=True, rpe_ratio=rpe_ratio, scaled_query=scaled_query)
            for i in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        grid = img_size // patch_size
        self.register_buffer("buckets", bucket_ids(grid, grid, rpe_ratio, True), persistent=False)
        init_vit_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)

    def _buckets_for(self, gh: int, gw: int) -> torch.Tensor:
        if self.buckets.shape[0] == gh * gw + 1 and gh * self.patch_size == self.img_size:
            return self.buckets
        return bucket_ids(gh, gw, self.rpe_ratio, True).to(self.buckets.device)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized -> (B, 1 + (H/p)(W/p), D) tokens."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % self.patch_size or images.shape[3] % self.patch_size:
            raise ValueError(f"images: expected (B, 3, H, W) with H, W divisible by {self.patch_size}, "
                             f"got {tuple(images.shape)}")
        gh, gw = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        buckets = self._buckets_for(gh, gw)
        for blk in self.blocks:
            x = blk(x, buckets)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def load_pretrained(self, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                        source: str | None = None) -> dict[str, list[str]]:
        """Load encoder weights from a lomar_fast export or a published LoMaR checkpoint.

        Returns {"used": keys loaded, "dropped": checkpoint keys not used (mask_token, encoder_pred,
        pos_embed, and norm under global pooling), "initialized": model keys left at their fresh init
        (fc_norm, head)}. With ``global_pool=False`` the pretrained final ``norm`` becomes ``fc_norm``, the
        LayerNorm applied to the cls token (MAE's and LoMaR's cls-token mode take ``norm(x)[:, 0]`` with the
        pretrained norm). Misshaped encoder keys or missing encoder keys raise CheckpointMismatch listing them.
        ``source`` names the weights in the errors (e.g. ``--finetune model.pth``; a path names itself).
        """
        sd, source = state_dict_of(path_or_state_dict, source)
        own = self.state_dict()
        fresh = {k for k in own if k.startswith(("fc_norm.", "head."))}
        used, dropped, problems = [], [], []
        cls_norm = {}  # norm.* -> fc_norm.* in cls-token mode, when every key of it fits
        if not self.global_pool and all(f"norm.{n}" in sd and tuple(sd[f"norm.{n}"].shape) == tuple(own[f"fc_norm.{n}"].shape)
                                        for n in ("weight", "bias")):
            cls_norm = {f"norm.{n}": f"fc_norm.{n}" for n in ("weight", "bias")}
        for k, v in sd.items():
            if k in cls_norm:
                used.append(k)
            elif k in own and k not in fresh:
                if tuple(v.shape) != tuple(own[k].shape):
                    problems.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
                else:
                    used.append(k)
            else:
                dropped.append(k)
        missing = sorted(set(own) - fresh - set(used) - {p.split(':')[0] for p in problems})
        if missing:
            problems.append("missing encoder keys: " + ", ".join(missing))
        if problems:
            raise CheckpointMismatch((f"{source}: " if source else "") + "pretrained weights do not fit the classifier: "
                                     + "; ".join(problems))
        self.load_state_dict({cls_norm.get(k, k): sd[k] for k in used}, strict=False)
        return {"used": sorted(used), "dropped": sorted(dropped), "initialized": sorted(fresh - set(cls_norm.values()))}


def load_finetune_weights(model: VisionTransformerRPE, path_or_sd: str | os.PathLike | Mapping[str, Any],
                          source: str | None = None) -> dict[str, list[str]]:
    """Encoder weights from a pretraining export or a published checkpoint, plus, from a fine-tuned classifier,
    ``fc_norm`` when it fits and ``head`` when it fits, each on its own, so a fine-tune can continue from one
    (MAE's script drops a head of another class count too, but refuses a checkpoint that holds ``fc_norm`` and
    re-initializes the head in any case). Returns ``load_pretrained``'s report ({"used", "dropped",
    "initialized"}) updated accordingly. ``source`` names the weights in the errors (a path names itself)."""
    sd, source = state_dict_of(path_or_sd, source)
    try:
        report = model.load_pretrained(sd, source)
    except CheckpointMismatch as e:
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        hint = (f" (the checkpoint has {n_blocks} blocks, the model {len(model.blocks)}: pass --depth {n_blocks} "
                f"or the matching --model)") if n_blocks and n_blocks != len(model.blocks) else ""
        raise CheckpointMismatch(f"{e}{hint}") from e
    own = model.state_dict()
    for prefix in ("fc_norm.", "head."):
        keys = [k for k in report["initialized"] if k.startswith(prefix)]
        if keys and all(k in sd and tuple(sd[k].shape) == tuple(own[k].shape) for k in keys):
            model.load_state_dict({k: sd[k] for k in keys}, strict=False)
            report = {"used": sorted(report["used"] + keys),
                      "dropped": sorted(k for k in report["dropped"] if k not in keys),
                      "initialized": sorted(k for k in report["initialized"] if k not in keys)}
    return report


def describe_load(report: dict[str, list[str]], path: str) -> str:
    """One line: what a weight load used, dropped and left fresh."""
    used, dropped, fresh = report["used"], report["dropped"], report["initialized"]
    return (f"loaded {len(used)} tensors from {path}; dropped {len(dropped)}: {', '.join(dropped) or '-'}; "
            f"freshly initialized: {', '.join(fresh) or '-'}")

def _vit(**cfg) -> VisionTransformerRPE:
    return VisionTransformerRPE(**cfg)


vit_tiny_patch16 = size_factory(_vit, "tiny", "vit_tiny_patch16", "Fine-tuning ViT with iRPE")
vit_small_patch16 = size_factory(_vit, "small", "vit_small_patch16", "Fine-tuning ViT with iRPE")
vit_base_patch16 = size_factory(_vit, "base", "vit_base_patch16", "Fine-tuning ViT with iRPE")
vit_large_patch16 = size_factory(_vit, "large", "vit_large_patch16", "Fine-tuning ViT with iRPE")
vit_huge_patch16 = size_factory(_vit, "huge", "vit_huge_patch16", "Fine-tuning ViT with iRPE")

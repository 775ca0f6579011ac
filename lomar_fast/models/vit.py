"""ViT building blocks shared by the LoMaR, MAE and fine-tuning models.

Parameter names match timm / MAE (``norm1 attn.qkv attn.proj attn.rpe_k.lookup_table_weight norm2
mlp.fc1 mlp.fc2``), so published checkpoints load without renaming.
"""
from __future__ import annotations


from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lomar_fast.ops.window_attention import window_attention_qkv

from .irpe import DEFAULT_RATIO, ContextualKeyRPE

LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Patch embedding holding a stride-p conv weight (D, 3, p, p) as ``proj``.

    ``forward`` takes images (B, 3, H, W); ``embed_patches`` takes patch vectors (..., p*p*3) ordered
    (row, col, channel) and applies the same weights as a matmul: the two give the same result.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p * W/p, D)."""
        return self.proj(images).flatten(2).transpose(1, 2)

    def linear_weight(self) -> torch.Tensor:
        """The conv weight as a (D, p*p*C) matrix in (row, col, channel) order."""
        w = self.proj.weight
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., p*p*C) patch vectors -> (..., D)."""
        w = self.linear_weight()
        return F.linear(patches, w.to(patches.dtype), self.proj.bias.to(patches.dtype))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or at rate 0).

    Eager, it draws as timm's DropPath does (``bernoulli_`` with the keep probability as a Python float).
    Under torch.compile a Python float read in the forward is baked into the graph, and with a different rate
    in every block the compiled blocks would need a graph each, beyond dynamo's recompile limit at ViT depths.
    So the compiled draw reads the keep probability from a buffer instead (``rand < keep``, the same
    distribution) and branches only on a bool, and the blocks share two graphs: rate 0, and one that takes the
    rate as an input. The buffer holds the probability in units of 2**-30 as an integer, which no
    ``.to(dtype)`` of the model rounds; it is not saved (``persistent=False``), so checkpoints are unchanged.
    """

    SCALE = 1 << 30

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.register_buffer("keep_units", torch.tensor(0), persistent=False)
        self.drop_prob = drop_prob

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = float(value)
        self.active = self._drop_prob > 0.0
        self.keep_units.fill_(round((1.0 - self._drop_prob) * self.SCALE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.active:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if torch.compiler.is_compiling():
            # a nonzero keep is at least 1 / SCALE, so the clamp only turns rate 1's 0 / 0 into 0, as timm does
            keep = self.keep_units.to(torch.float32) / self.SCALE
            return x * ((torch.rand(shape, device=x.device) < keep) / keep.clamp_min(1.0 / self.SCALE)).to(x.dtype)
        keep = 1.0 - self.drop_prob
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * (mask.div_(keep) if keep > 0.0 else mask)  # rate 1 drops every sample (no 0 / 0), as timm

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    With ``rpe`` the contextual iRPE key term (``rpe_k``) enters the logits through
    :func:`lomar_fast.ops.window_attention.window_attention_qkv` (the fused kernel where enabled, else SDPA
    with the iRPE additive bias); the forward then needs the (L, L) bucket ids of the token layout.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rpe: bool = False,
                 rpe_ratio: float = DEFAULT_RATIO, scaled_query: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpe_k = ContextualKeyRPE(self.head_dim, rpe_ratio, scaled_query) if rpe else None

    def forward(self, x: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
        n, l, d = x.shape
        qkv = self.qkv(x).reshape(n, l, 3, self.num_heads, self.head_dim)
        if self.rpe_k is not None:
            if buckets is None:
                raise ValueError("Attention with iRPE needs the bucket ids of the token layout")
            rpe_scale = self.head_dim**-0.5 if self.rpe_k.scaled_query else None
            x = window_attention_qkv(qkv, self.rpe_k.lookup_table_weight[0], buckets, rpe_scale=rpe_scale)
        else:
            x = F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
        return self.proj(x.transpose(1, 2).reshape(n, l, d))


class Block(nn.Module):
    """Pre-norm ViT block: x + DropPath(Attn(LN(x))), x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 rpe: bool = False, rpe_ratio: float = DEFAULT_RATIO, scaled_query: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, rpe=rpe, rpe_ratio=rpe_ratio, scaled_query=scaled_query)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), buckets))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed_2d(embed_dim: int, grid: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, (grid*grid (+1), embed_dim), as MAE's."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # MAE's convention: the first half encodes the column (w), the second the row (h).

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(gh), one_axis(gw)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def init_vit_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear, zero bias, unit LayerNorm; patch conv as a Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``drop_path`` over the blocks, as MAE's
    ``torch.linspace(0, drop_path, depth)`` (one block: rate 0)."""
    if depth <= 1:
        return [0.0] * depth
    return [drop_path * i / (depth - 1) for i in range(depth)]


# widths, depths and heads of the standard ViT sizes
VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}



def size_factory(build: Callable[..., nn.Module], size: str, name: str, what: str, **defaults) -> Callable[..., nn.Module]:
    """A factory ``name(**kwargs)`` building ``build(**VIT_SIZES[size], patch_size=16, **defaults, **kwargs)``."""

    def make(**kwargs) -> nn.Module:
        cfg = dict(VIT_SIZES[size], patch_size=16, **defaults)
        cfg.update(kwargs)
        return build(**cfg)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{what}, ViT-{size}/16 ({VIT_SIZES[size]}); keyword arguments override."
    return make

"""Model FLOPs per image, counted from the matrix multiplies of the ViT (the convention MFU uses).

Counted per token sequence of length L through a block of width D, MLP hidden H:
qkv 3*L*D*D, attention scores q@k^T L*L*D, attention-weighted values att@v L*L*D, output projection
L*D*D, MLP fc1 + fc2 2*L*D*H multiply-accumulates (MACs); iRPE adds q@T, L*D*NB (NB table entries).
Patch embedding, decoder embedding and prediction heads are the matmuls on the tokens that meet them.
Norms, softmax, GELU, the window gather and the loss are left out (memory-bound, a few percent of
the time, no matrix FLOPs). One MAC = 2 FLOPs; a training step = forward + backward = 3 x forward.

Nothing here imports the models: the functions take plain numbers, and
:func:`training_flops_per_image` reads those numbers off a LoMaR or MAE instance.
"""
from __future__ import annotations

from typing import Any

TRAIN_MULTIPLIER = 3  # forward 1x, backward 2x (grads w.r.t. activations and weights)


def block_macs(tokens: int, dim: int, mlp_hidden: int | None = None, rpe_buckets: int = 0) -> int:
    """MACs of one pre-norm ViT block on one sequence of ``tokens`` tokens of width ``dim``."""
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    qkv = 3 * tokens * dim * dim
    scores = tokens * tokens * dim  # summed over heads: H * L * L * (D/H)
    weighted = tokens * tokens * dim
    proj = tokens * dim * dim
    mlp = 2 * tokens * dim * hidden
    rpe = tokens * dim * rpe_buckets  # contextual iRPE: q (L, D/H) @ T (D/H, NB) per head
    return qkv + scores + weighted + proj + mlp + rpe


def vit_forward_macs(img_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                     mlp_hidden: int | None = None, num_classes: int = 1000, cls_token: bool = True) -> int:
    """Forward MACs of the plain full-image ViT classifier (G*G patches + cls, linear head on one token).

    ViT-B/16 at 224: about 17.56 G MACs.
    """
    grid = img_size // patch_size
    patches = grid * grid
    tokens = patches + (1 if cls_token else 0)
    embed = patches * (patch_size * patch_size * 3) * dim
    head = dim * num_classes
    return embed + depth * block_macs(tokens, dim, mlp_hidden) + head


def lomar_forward_macs(patch_size: int = 16, dim: int = 768, depth: int = 12, mlp_hidden: int | None = None,
                       window_size: int = 7, num_window: int = 4, rpe_buckets: int = 50) -> int:
    """Forward MACs per image of LoMaR: K windows of (w*w + 1) tokens through the encoder and the head.

    Independent of the image size: only the window gather (no matrix FLOPs) sees the whole image.
    """
    n = window_size * window_size
    pdim = patch_size * patch_size * 3
    per_window = (n * pdim * dim  # patch embedding of the window's patches
                  + depth * block_macs(n + 1, dim, mlp_hidden, rpe_buckets)
                  + n * dim * pdim)  # encoder_pred on the w*w patch tokens
    return num_window * per_window


def mae_forward_macs(img_size: int = 224, patch_size: int = 16, dim: int = 768, depth: int = 12,
                     mlp_hidden: int | None = None, decoder_dim: int = 512, decoder_depth: int = 8,
                     decoder_mlp_hidden: int | None = None, mask_ratio: float = 0.75) -> int:
    """Forward MACs per image of MAE: patch-embed all G*G patches, encoder on 1 + G*G*(1-r) tokens,
    decoder on 1 + G*G tokens (its prediction head runs on all of them, as the model does)."""
    grid = img_size // patch_size
    patches = grid * grid
    keep = int(patches * (1 - mask_ratio))
    pdim = patch_size * patch_size * 3
    embed = patches * pdim * dim
    encoder = depth * block_macs(keep + 1, dim, mlp_hidden)
    decoder_embed = (keep + 1) * dim * decoder_dim
    decoder = decoder_depth * block_macs(patches + 1, decoder_dim, decoder_mlp_hidden)
    pred = (patches + 1) * decoder_dim * pdim
    return embed + encoder + decoder_embed + decoder + pred


def training_flops(forward_macs: int) -> int:
    """FLOPs of one training image (forward + backward) from its forward MACs."""
    return 2 * TRAIN_MULTIPLIER * forward_macs


def _mlp_hidden(blocks: Any) -> int:
    return int(blocks[0].mlp.fc1.out_features)


def model_forward_macs(model: Any) -> int:
    """Forward MACs per image of a LoMaR or MAE instance (read off its attributes)."""
    if hasattr(model, "num_window") and hasattr(model, "window_size"):  # LoMaR
        table = model.blocks[0].attn.rpe_k
        buckets = int(table.lookup_table_weight.shape[-1]) if table is not None else 0
        return lomar_forward_macs(model.patch_size, model.embed_dim, model.depth, _mlp_hidden(model.blocks),
                                  model.window_size, model.num_window, buckets)
    if hasattr(model, "decoder_blocks"):  # MAE
        return mae_forward_macs(model.img_size, model.patch_size, model.embed_dim, model.depth,
                                _mlp_hidden(model.blocks), model.decoder_embed_dim, len(model.decoder_blocks),
                                _mlp_hidden(model.decoder_blocks), model.mask_ratio)
    raise TypeError(f"no FLOP formula for {type(model).__name__}; expected a LoMaR or MAE model")


def training_flops_per_image(model: Any) -> int:
    """Training FLOPs (forward + backward) per image of a LoMaR or MAE instance."""
    return training_flops(model_forward_macs(model))

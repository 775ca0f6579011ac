"""k-NN representation monitor: weighted k-nearest-neighbour top-1 on frozen encoder features.

``python -m lomar_fast.knn --checkpoint model.pth --train train.beton --val val.beton [--input_size 224]``

Features: the encoder from the checkpoint runs on the whole (center-cropped) image with iRPE over its
G x G grid; the patch tokens, passed through the checkpoint's final encoder norm, are averaged and
L2-normalized (a fine-tuned classifier checkpoint uses its own pooled ``fc_norm`` features instead).
Each val image votes with its k = 20 most cosine-similar train images, each vote weighted by
exp(similarity / T), T = 0.07; the class with the largest total wins.

The encoder's shape comes from the checkpoint: width from ``cls_token``, depth from the block count,
heads from width / head_dim with head_dim = ``lookup_table_weight.shape[1]``.

Under ``torchrun``/``deepspeed`` every rank reads a disjoint contiguous slice of each file (every
image exactly once; every rank runs the same number of forwards, see lomar_fast.data.shard), train
features are all-gathered and the correct counts summed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

if __package__ in (None, ""):  # run as a script by a launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from lomar_fast.checkpoint import (CheckpointMismatch, checkpoint_args, extract_state_dict, load_weights,
                                   module_state_dict, named)
from lomar_fast.errors import ConfigError
from lomar_fast.data.shard import Shard, build_shard
from lomar_fast.distributed import all_gather_rows, all_reduce, rank_world
from lomar_fast.images import DEFAULT_INTERPOLATION, INTERPOLATIONS, normalize_images
from lomar_fast.models.classifier import VisionTransformerRPE

DEFAULT_K = 20
DEFAULT_T = 0.07


# --------------------------------------------------------------------------------------- the encoder
def encoder_shape(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{embed_dim, depth, num_heads, patch_size} read off a pretraining or classifier state dict."""
    try:
        dim = int(sd["cls_token"].shape[-1])
        patch = int(sd["patch_embed.proj.weight"].shape[-1])
        head_dim = int(sd["blocks.0.attn.rpe_k.lookup_table_weight"].shape[1])
    except KeyError as e:
        raise CheckpointMismatch(f"checkpoint lacks {e.args[0]}: not a LoMaR/iRPE ViT checkpoint") from e
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if dim % head_dim:
        raise CheckpointMismatch(f"checkpoint width {dim} is not a multiple of its iRPE head_dim {head_dim}")
    return dict(embed_dim=dim, depth=depth, num_heads=dim // head_dim, patch_size=patch)


class FeatureEncoder(torch.nn.Module):
    """Frozen encoder: images (B, 3, S, S) normalized -> L2-normalized features (B, D) in float32."""

    def __init__(self, vit: VisionTransformerRPE, token_norm: torch.nn.LayerNorm | None):
        super().__init__()
        self.vit = vit
        self.token_norm = token_norm

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(images)
        if self.token_norm is None:  # classifier checkpoint: its own pooling + fc_norm
            feats = self.vit.forward_head(tokens, pre_logits=True)
        else:
            feats = self.token_norm(tokens)[:, 1:].mean(dim=1)
        return F.normalize(feats.float(), dim=-1)


def build_encoder(state_dict_or_path: str | os.PathLike | Mapping[str, Any], input_size: int = 224,
                  device: torch.device | str = "cpu", flag: str | None = None) -> FeatureEncoder:
    """The frozen feature encoder of a lomar_fast export, a published LoMaR checkpoint, a live
    LoMaR model's state dict or a fine-tuned classifier checkpoint (eval mode, on ``device``). ``flag``: the
    option a path came from, named in the errors."""
    if isinstance(state_dict_or_path, Mapping):
        obj, sd, source = state_dict_or_path, extract_state_dict(state_dict_or_path), None
    else:
        (obj, sd), source = load_weights(state_dict_or_path, flag), named(state_dict_or_path, flag)
    shape = encoder_shape(sd)
    classifier = "fc_norm.weight" in sd
    # a classifier fine-tuned on the cls token (--no_global_pool) is read the way it was trained
    global_pool = bool(checkpoint_args(obj).get("global_pool", True)) if classifier else True
    if input_size < 16 or input_size % 16:
        raise ConfigError(f"--input_size {input_size} must be a positive multiple of the patch size 16")
    vit = VisionTransformerRPE(img_size=input_size, num_classes=0, drop_path=0.0, global_pool=global_pool, **shape)
    report = vit.load_pretrained(sd, source)
    token_norm = None
    if classifier:
        vit.fc_norm.load_state_dict({"weight": sd["fc_norm.weight"], "bias": sd["fc_norm.bias"]})
    else:
        token_norm = torch.nn.LayerNorm(shape["embed_dim"], eps=1e-6)
        if "norm.weight" in sd:
            token_norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
    enc = FeatureEncoder(vit, token_norm).eval().requires_grad_(False).to(device)
    enc.load_report = report  # type: ignore[attr-defined]
    return enc


@torch.no_grad()
def extract_features(encoder: FeatureEncoder, shard: Shard, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of this rank's :class:`~lomar_fast.data.shard.Shard`: (float32 (n, D), int64 labels (n,)).
    Every rank runs the same number of forwards (padding batches are dropped from the result)."""
    feats, labels = [], []
    autocast = torch.autocast(shard.device.type, dtype=dtype, enabled=dtype != torch.float32)
    for images, y in shard.batches():
        with autocast:
            f = encoder(normalize_images(images)).float()
        keep = y >= 0
        feats.append(f[keep])
        labels.append(y[keep].clone())
    f = torch.cat(feats) if feats else torch.zeros(0, encoder.vit.embed_dim, device=shard.device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=shard.device)
    if f.shape[0] != shard.n:
        raise RuntimeError(f"read {f.shape[0]} images of this rank's slice of {shard.n}")
    return f, y


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_T,
                chunk: int = 256) -> torch.Tensor:
    """Class scores (n_val, num_classes): the k most similar train features (cosine, inputs already
    L2-normalized) vote with weight exp(sim / temperature)."""
    k = min(k, train_feats.shape[0])
    out = []
    for i in range(0, val_feats.shape[0], chunk):
        sim = val_feats[i:i + chunk] @ train_feats.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train_feats.device)


_SHARDS: dict[tuple, Shard] = {}


def _shard(path: str | os.PathLike, batch_size: int, input_size: int, device: torch.device,
           num_workers: int | None, interpolation: str) -> Shard:
    """This rank's shard of ``path``, built once per process and setting: a new loader compiles its decode loop
    (seconds), and the pretraining monitor reads the same two files every time it runs, so the loaders are kept
    for the rest of the process. A rewritten file (another size or modification time) gets a new loader."""
    try:
        st = os.stat(path)
    except OSError:  # build_shard says what is wrong with the path
        return build_shard(path, batch_size, input_size, device, num_workers, interpolation=interpolation)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, batch_size, input_size, str(device), num_workers,
           interpolation, *rank_world())
    if key not in _SHARDS:
        _SHARDS[key] = build_shard(path, batch_size, input_size, device, num_workers, interpolation=interpolation)
    return _SHARDS[key]


def knn_eval(encoder: FeatureEncoder, train: str | os.PathLike, val: str | os.PathLike, input_size: int = 224,
             batch_size: int = 64, device: torch.device | str = "cpu", k: int = DEFAULT_K,
             temperature: float = DEFAULT_T, num_workers: int | None = None,
             dtype: torch.dtype = torch.float32, interpolation: str = DEFAULT_INTERPOLATION) -> dict[str, float]:
    """k-NN top-1 (and top-5) in percent over the whole val set, the same on every rank. Both files are read with
    the evaluation center crop, resized with ``interpolation`` ('area' or 'bicubic').

    Returns {"top1", "top5", "n_train", "n_val", "weights_l1", "seconds"}. Call it on every rank (or with no
    process group), all with the same arguments.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    shards = [_shard(p, batch_size, input_size, device, num_workers, interpolation) for p in (train, val)]
    n_train, n_val = shards[0].total, shards[1].total
    tf, tl = extract_features(encoder, shards[0], dtype)
    vf, vl = extract_features(encoder, shards[1], dtype)
    tf, tl = all_gather_rows(tf), all_gather_rows(tl)
    if tf.shape[0] != n_train:
        raise RuntimeError(f"gathered {tf.shape[0]} train features, expected {n_train}")
    num_classes = int(max(int(tl.max()) if tl.numel() else 0, int(vl.max()) if vl.numel() else 0)) + 1
    num_classes = int(all_reduce(torch.tensor([num_classes], device=device, dtype=torch.float64), "max")[0])
    scores = knn_predict(tf, tl, vf, num_classes, k, temperature)
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    if vl.numel():
        top = scores.topk(min(5, num_classes), dim=1).indices
        hit = top == vl[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(vl.numel(), device=device)]).double()
    counts = all_reduce(counts)
    if int(counts[2]) != n_val:
        raise RuntimeError(f"k-NN counted {int(counts[2])} val images, the file holds {n_val}")
    return {"top1": 100.0 * float(counts[0]) / n_val, "top5": 100.0 * float(counts[1]) / n_val,
            "n_train": n_train, "n_val": n_val, "weights_l1": weights_l1(encoder), "seconds": time.perf_counter() - t0}


def weights_l1(module: torch.nn.Module) -> float:
    """Sum of |w| over the module's parameters in float64: a fingerprint that tells which weights a k-NN result
    came from (the pretraining monitor logs it next to its top-1)."""
    return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def monitor(module: torch.nn.Module, train: str, val: str, input_size: int, batch_size: int,
            device: torch.device, num_workers: int | None = None, dtype: torch.dtype = torch.float32,
            interpolation: str = DEFAULT_INTERPOLATION) -> dict:
    """k-NN of a live pretraining model (the pretraining ``--knn_every`` hook); all ranks call it."""
    sd = module_state_dict(module)
    # the throwaway encoder's init must not move the training run's RNG streams (exact resume)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        encoder = build_encoder(sd, input_size, device)
    return knn_eval(encoder, train, val, input_size, batch_size, device, num_workers=num_workers, dtype=dtype,
                    interpolation=interpolation)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lomar_fast.knn", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pth: lomar_fast export, published LoMaR checkpoint "
                                                       "or fine-tuned classifier")
    p.add_argument("--train", required=True, help="labelled train .beton (the neighbours)")
    p.add_argument("--val", required=True, help="labelled val .beton (the queries)")
    p.add_argument("--input_size", type=int, default=224, help="image side (multiple of the patch size)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours per query")
    p.add_argument("--temperature", type=float, default=DEFAULT_T, help="vote weight exp(sim / T)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=0, help="FFCV decode threads (0: the usable cores)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=DEFAULT_INTERPOLATION,
                   help="resize of the center crops: area (OpenCV INTER_AREA) or bicubic (PIL's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from lomar_fast.distributed import init_distributed, pick_device

    for flag, path in (("--checkpoint", a.checkpoint), ("--train", a.train), ("--val", a.val)):
        if Path(path).is_dir():
            hint = (f"; a pretraining run folder becomes a .pth with python -m lomar_fast.export --checkpoint {path} "
                    f"--out model.pth" if flag == "--checkpoint" else "")
            raise ConfigError(f"{flag} {path} is a folder, not a file{hint}")
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path} does not exist")
    if a.k < 1 or a.temperature <= 0 or a.batch_size < 1:
        raise ConfigError("--k and --batch_size must be at least 1 and --temperature positive")
    device = pick_device(a.device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        os.environ.setdefault("DS_ACCELERATOR", device.type)
        init_distributed(device)
    rank = rank_world()[0]
    encoder = build_encoder(a.checkpoint, a.input_size, device, flag="--checkpoint")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = knn_eval(encoder, a.train, a.val, a.input_size, a.batch_size, device, a.k, a.temperature,
                   a.num_workers, dtype, a.interpolation)
    if rank == 0:
        vit = encoder.vit  # the shape build_encoder read off the checkpoint (no second load of the file)
        print(f"k-NN top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  (k={a.k}, T={a.temperature}, "
              f"{res['n_train']} train / {res['n_val']} val images at {a.input_size} px ({a.interpolation}), encoder "
              f"D={vit.embed_dim} depth={vit.depth} heads={vit.num_heads}, {res['seconds']:.1f} s)")
    return res


if __name__ == "__main__":
    from lomar_fast.cli import run_cli

    run_cli(main)

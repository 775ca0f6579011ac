"""Draw what a LoMaR checkpoint reconstructs: ``python -m lomar_fast.visualize --checkpoint model.pth
--image some.jpg --out recon.png``.

One PNG: the image with its K windows outlined, then per window the masked input and the
reconstruction (masked patches predicted, visible ones as given). With norm-pix targets the predicted
patches are mapped back to pixels with the statistics of the true patch, as MAE's demo does.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lomar_fast import run_dir
from lomar_fast.checkpoint import (PRETRAINING_FILES, CheckpointMismatch, checkpoint_args, load_checkpoint,
                                   load_weights, write_atomically)
from lomar_fast.cli import run_cli
from lomar_fast.errors import ConfigError
from lomar_fast.models.lomar import LoMaR
from lomar_fast.images import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from lomar_fast.ops.window_gather_ref import NORM_PIX_EPS, patchify

COLOURS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def model_from_state_dict(sd: dict, args: dict | None = None) -> LoMaR:
    """Rebuild the architecture from the weights (widths, depth, heads, patch) plus saved args."""
    args = args or {}
    missing = [k for k in ("pos_embed", "mask_token", "encoder_pred.weight") if k not in sd]
    if missing:
        raise CheckpointMismatch(f"the checkpoint has no {', '.join(missing)}: it is not a LoMaR pretraining model (a "
                                 f"fine-tuned classifier keeps the encoder only); pass a lomar_fast.export model.pth")
    d = sd["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = sd["blocks.0.attn.rpe_k.lookup_table_weight"].shape[1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    model = LoMaR(img_size=args.get("input_size", grid * patch), patch_size=patch, embed_dim=d, depth=depth,
                  num_heads=d // head_dim, window_size=args.get("window_size", 7),
                  num_window=args.get("num_window", 4), mask_ratio=args.get("mask_ratio", 0.8),
                  norm_pix_loss=args.get("norm_pix_loss", True))
    load_checkpoint(model, sd)
    return model.eval()


def load_image(path: str, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` and center-crop: uint8 (1, size, size, 3)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--image {p} does not exist")
    img = Image.open(p).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy())[None]


def _to_pixels(patches: torch.Tensor, p: int, w: int) -> np.ndarray:
    """(w*w, p*p*3) normalized patches -> uint8 (w*p, w*p, 3)."""
    x = patches.reshape(w, w, p, p, 3).permute(0, 2, 1, 3, 4).reshape(w * p, w * p, 3)
    x = x * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    return (x.clamp(0, 1) * 255).round().byte().numpy()


@torch.no_grad()
def render(model: LoMaR, image: torch.Tensor, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    windows, masks = model.sample(1, generator=gen, device=torch.device("cpu"))
    _, pred, flat = model(image, windows, masks)
    p, w, k = model.patch_size, model.window_size, model.num_window
    grid = model.grid
    norm = normalize_images(image)
    patches = patchify(norm, p).reshape(grid, grid, -1)
    scale = 2
    cell = w * p * scale
    pad = 8
    canvas = Image.new("RGB", (image.shape[2] * scale + pad + 2 * (cell + pad), max(image.shape[1] * scale, k * (cell + pad))),
                       (255, 255, 255))
    base = Image.fromarray(image[0].numpy()).resize((image.shape[2] * scale, image.shape[1] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(base)
    for j in range(k):
        top, left = (int(v) for v in windows[0, j])
        c = COLOURS[j % len(COLOURS)]
        draw.rectangle([left * p * scale, top * p * scale, (left + w) * p * scale - 1, (top + w) * p * scale - 1],
                       outline=c, width=3)
    canvas.paste(base, (0, 0))
    x0 = image.shape[2] * scale + pad
    for j in range(k):
        top, left = (int(v) for v in windows[0, j])
        true = patches[top:top + w, left:left + w].reshape(w * w, -1)
        m = flat[j]
        rec = pred[j].float()
        if model.norm_pix_loss:
            mean, var = true.mean(-1, keepdim=True), true.var(-1, keepdim=True)
            rec = rec * (var + NORM_PIX_EPS) ** 0.5 + mean
        masked_in = torch.where(m[:, None], torch.full_like(true, -3.0), true)  # masked patches shown dark
        recon = torch.where(m[:, None], rec, true)
        for col, arr in enumerate((masked_in, recon)):
            tile = Image.fromarray(_to_pixels(arr, p, w)).resize((cell, cell), Image.NEAREST)
            ImageDraw.Draw(tile).rectangle([0, 0, cell - 1, cell - 1], outline=COLOURS[j % len(COLOURS)], width=3)
            canvas.paste(tile, (x0 + col * (cell + pad), j * (cell + pad)))
    return canvas


def picture_format(out: str) -> str:
    """The PIL format ``--out``'s extension names, checked to write an RGB picture (ConfigError otherwise)."""
    p = run_dir.prepare_output_file(out, "--out", "recon.png")
    Image.init()
    ext = p.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is not None:
        try:
            Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)  # some formats take no RGB picture (.xbm)
        except (OSError, ValueError, KeyError):
            fmt = None
    if fmt is None:
        said = f"its extension {ext} names no picture format PIL writes in RGB" if ext else "it has no extension"
        raise ConfigError(f"--out {p}: {said}; pass a file name such as {p.with_suffix('.png').name}")
    return fmt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="model.pth from lomar_fast.export (or a published one)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True, help="output picture: recon.png (or another format PIL writes)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the windows and masks")
    a = ap.parse_args(argv)
    for flag, path in (("--checkpoint", a.checkpoint), ("--image", a.image)):
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path} does not exist")
        if Path(a.out).exists() and Path(a.out).samefile(path):
            raise ConfigError(f"--out {a.out} is the {flag} file; pass another file name")
    fmt = picture_format(a.out)  # before the model is loaded
    obj, sd = load_weights(a.checkpoint, "--checkpoint", PRETRAINING_FILES)  # weights_only: a file cannot run code
    model = model_from_state_dict(sd, checkpoint_args(obj))
    try:
        image = load_image(a.image, model.img_size)
    except OSError as e:
        raise ConfigError(f"--image {a.image} cannot be read as an image ({e})") from None
    img = render(model, image, a.seed)
    with run_dir.writing(a.out, "--out"):
        write_atomically(a.out, lambda f: img.save(f, format=fmt))  # a failed write leaves an earlier file whole
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run_cli(main)

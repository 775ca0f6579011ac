"""A labelled ImageFolder of procedural photo-like JPEGs, made offline with numpy and Pillow only.

Usage::

    python -m data_prep.make_synthetic --out data/synthetic --n 20000 [--val 1000] [--classes 10] [--workers N]
    python -m data_prep.write_beton --src data/synthetic --out data/synthetic --splits train val

For loader and end-to-end benchmarks where no real photos are at hand. Each image is a "dead leaves"
scene: up to 200 shapes with power-law sizes occluding one another (the model whose edge and size
statistics match natural images), each filled with its own colour, a shading ramp and a crop of a shared
1/f noise texture (the spectrum of natural images), over a gradient background, then defocused, given
sensor noise and written as JPEG (q90, 4:2:0) at ImageNet sizes: longest side 400-500 px (mostly 500),
aspect 4:3, 3:4, 3:2, 2:3, 1:1 or 16:9. At q90 they come to about 50 KB at a mean 458x393, like the
views of real photos that benchmarks/loader.py measures (47 KB at 468x406), so decoding costs about what it
costs on photos; their power spectra fall as 1/f^2.4 to 1/f^3.3 (scikit-image's photos: 1/f^2.0 to 1/f^3.0).

Classes differ in their palette (hue band), shape kind (ellipses, boxes, triangles), size distribution and
texture strength, so fine-tuning and k-NN have something to find. Image i of a split belongs to class
i mod C; every image is a function of (seed, split, i) alone, whatever the number of workers.
Output: ``<out>/{train,val}/<class>/<class>_<i>.jpg`` and ``<out>/synthetic.json`` (settings, counts,
timing, mean size and bytes).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ASPECTS = ((4, 3, 0.45), (3, 4, 0.15), (3, 2, 0.15), (2, 3, 0.05), (1, 1, 0.12), (16, 9, 0.08))
SHAPES = ("ellipse", "box", "triangle")
BANK_SIZE = 8
BANK_SIDE = 768

# (1/f fields (BANK_SIZE, BANK_SIDE, BANK_SIDE), white noise (2, BANK_SIDE, BANK_SIDE, 3)), float32, unit std;
# made once by the parent and inherited by the workers through fork
_BANKS: tuple[np.ndarray, np.ndarray] | None = None


def noise_bank(seed: int, count: int = BANK_SIZE, side: int = BANK_SIDE, exponent: float = 1.0) -> np.ndarray:
    """``count`` fields of Gaussian noise whose amplitude spectrum falls as 1/f**exponent (power 1/f^2 at 1):
    the second-order statistics of natural images. Float32, zero mean, unit std, periodic."""
    rng = np.random.default_rng([seed, 0xBA4C])
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** -exponent
    amp[0, 0] = 0.0
    out = np.empty((count, side, side), np.float32)
    for k in range(count):
        spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
        field = np.fft.irfft2(spec, s=(side, side))
        out[k] = (field - field.mean()) / field.std()
    return out


def white_bank(seed: int, count: int = 2, side: int = BANK_SIDE) -> np.ndarray:
    """``count`` fields of white Gaussian noise, (count, side, side, 3) float32, unit std."""
    return np.random.default_rng([seed, 0x5E45]).standard_normal((count, side, side, 3), dtype=np.float32)


def class_style(c: int, classes: int) -> dict:
    """The fixed look of class ``c``: hue band, shape kind, size exponent and texture strength."""
    return {"hue": (c + 0.5) / classes, "hue_spread": 0.35 / max(classes, 1) + 0.04,
            "shape": SHAPES[c % len(SHAPES)], "size_exponent": 2.2 + 0.6 * ((c // len(SHAPES)) % 3),
            "texture": 10.0 + 22.0 * ((c * 7) % 5) / 4.0}


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB in [0, 255], shape (..., 3)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(x, -1) for x in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return 255.0 * np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): ImageNet-like aspect, longest side 500 (70%) or 400-499."""
    weights = np.array([a[2] for a in ASPECTS])
    a, b, _ = ASPECTS[int(rng.choice(len(ASPECTS), p=weights / weights.sum()))]
    long_side = 500 if rng.random() < 0.7 else int(rng.integers(400, 500))
    if a >= b:
        return long_side, max(1, round(long_side * b / a))
    return max(1, round(long_side * a / b)), long_side


def render(rng: np.random.Generator, style: dict, bank: np.ndarray, noise: np.ndarray) -> Image.Image:
    """One photo-like scene in the class ``style`` (see the module docstring)."""
    W, H = image_size(rng)
    n_shapes = int(rng.integers(60, 200))
    # power-law radii (p(r) ~ r^-exponent) between 6 px and the image size, largest first (dead leaves)
    r_min, r_max, e = 6.0, 0.6 * max(W, H), style["size_exponent"]
    u = rng.random(n_shapes)
    radii = (r_min ** (1 - e) + u * (r_max ** (1 - e) - r_min ** (1 - e))) ** (1 / (1 - e))
    radii[::-1].sort()
    labels = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(labels)
    cx, cy = rng.uniform(-0.1, 1.1, n_shapes) * W, rng.uniform(-0.1, 1.1, n_shapes) * H
    aspect = np.exp(rng.normal(0, 0.45, n_shapes))
    for k in range(n_shapes):
        rx, ry = radii[k] * aspect[k] ** 0.5, radii[k] / aspect[k] ** 0.5
        box = (cx[k] - rx, cy[k] - ry, cx[k] + rx, cy[k] + ry)
        kind = style["shape"] if rng.random() < 0.7 else SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == "ellipse":
            draw.ellipse(box, fill=k + 1)
        elif kind == "box":
            draw.rectangle(box, fill=k + 1)
        else:
            ang = rng.uniform(0, 2 * math.pi) + np.array([0, 2.1, 4.2]) + rng.normal(0, 0.25, 3)
            draw.polygon([(cx[k] + rx * math.cos(t), cy[k] + ry * math.sin(t)) for t in ang], fill=k + 1)
    lab = np.asarray(labels)

    # per-shape colour: hue in the class band (some off-band "clutter"), varied saturation and value
    m = n_shapes + 1
    hue = (style["hue"] + rng.normal(0, style["hue_spread"], m)) % 1.0
    clutter = rng.random(m) < 0.2
    hue[clutter] = rng.random(int(clutter.sum()))
    sat = np.clip(rng.beta(2.0, 2.5, m), 0.05, 1.0)
    val = np.clip(rng.beta(3.0, 2.0, m), 0.08, 1.0)
    colors = hsv_to_rgb(hue, sat, val).astype(np.float32)  # (m, 3); label 0 is the background
    # shading: each shape gets a linear ramp in a random direction, like light falling on a surface;
    # the background's is mostly vertical, like a sky or a wall
    gx, gy = rng.normal(0, 0.25, m).astype(np.float32), rng.normal(0, 0.25, m).astype(np.float32)
    gy[0] = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.8)
    x = np.linspace(-0.5, 0.5, W, dtype=np.float32)[None, :]
    y = np.linspace(-0.5, 0.5, H, dtype=np.float32)[:, None]
    shade = 1.0 + gx[lab] * x + gy[lab] * y
    # texture: a random crop of a 1/f field, strength per shape, mostly luminance with a little chroma
    field = bank[int(rng.integers(len(bank)))]
    oy, ox = int(rng.integers(0, field.shape[0] - H + 1)), int(rng.integers(0, field.shape[1] - W + 1))
    tex = field[oy:oy + H, ox:ox + W]
    if rng.random() < 0.5:
        tex = tex[:, ::-1]
    gain = (style["texture"] * rng.uniform(0.3, 1.6, m)).astype(np.float32)
    t = tex * gain[lab]
    img = colors[lab] * shade[..., None]
    img += t[..., None] * (1.0 + rng.normal(0, 0.15, 3).astype(np.float32))
    # sensor noise (before the blur, which leaves about a third of it): a crop of the bank's white noise
    white = noise[int(rng.integers(len(noise)))]
    oy, ox = int(rng.integers(0, white.shape[0] - H + 1)), int(rng.integers(0, white.shape[1] - W + 1))
    img += white[oy:oy + H, ox:ox + W] * np.float32(rng.uniform(2.0, 8.0))
    out = Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8), "RGB")
    return out.filter(ImageFilter.BoxBlur(radius=float(rng.uniform(0.2, 0.6))))  # optics: a little defocus


def class_names(classes: int) -> list[str]:
    return [f"class_{c:03d}" for c in range(classes)]


def _make_chunk(job) -> tuple[int, int, int, int]:
    """Write images [start, stop) of one split; returns (count, bytes, sum of widths, sum of heights)."""
    root, split_index, split, start, stop, classes, seed, quality = job
    assert _BANKS is not None
    names = class_names(classes)
    styles = [class_style(c, classes) for c in range(classes)]
    total_bytes = sum_w = sum_h = 0
    for i in range(start, stop):
        c = i % classes
        rng = np.random.default_rng([seed, split_index, i])
        im = render(rng, styles[c], *_BANKS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
        data = buf.getvalue()
        path = root / split / names[c] / f"{names[c]}_{i:06d}.jpg"
        path.write_bytes(data)
        total_bytes += len(data)
        sum_w += im.width
        sum_h += im.height
    return stop - start, total_bytes, sum_w, sum_h


def make_synthetic(out: str | Path, n_train: int, n_val: int = 0, classes: int = 10, seed: int = 0,
                   workers: int = 0, quality: int = 90, chunk: int = 50, quiet: bool = False) -> dict:
    """Writes the ImageFolder under ``out`` (see the module docstring) and returns its report."""
    global _BANKS
    if classes < 1 or n_train < classes:
        raise ValueError(f"--n {n_train} must be at least --classes {classes} (>= 1) so every class has an image")
    if n_val and n_val < classes:
        raise ValueError(f"--val {n_val} must be 0 or at least --classes {classes}")
    out = Path(out)
    t0 = time.perf_counter()
    _BANKS = (noise_bank(seed), white_bank(seed))
    splits = [("train", n_train)] + ([("val", n_val)] if n_val else [])
    names = class_names(classes)
    for split, _ in splits:
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
    jobs = [(out, si, split, s, min(s + chunk, n), classes, seed, quality)
            for si, (split, n) in enumerate(splits) for s in range(0, n, chunk)]
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(jobs)))
    t1 = time.perf_counter()
    if workers == 1:
        results = list(map(_make_chunk, jobs))
    else:
        # the bank is inherited, not pickled; the workers take SIGTERM's default action, so the pool's
        # terminate() ends them even where the parent had installed a Python handler they would inherit
        with mp.get_context("fork").Pool(workers, signal.signal, (signal.SIGTERM, signal.SIG_DFL)) as pool:
            results = pool.map(_make_chunk, jobs, chunksize=1)
    secs = time.perf_counter() - t1
    count = sum(r[0] for r in results)
    report = {
        "generator": "data_prep.make_synthetic", "splits": dict(splits), "classes": classes, "seed": seed,
        "jpeg_quality": quality, "workers": workers, "images": count,
        "seconds": round(time.perf_counter() - t0, 2), "render_seconds": round(secs, 2),
        "images_per_sec": round(count / secs, 1) if secs > 0 else None,
        "mean_kb": round(sum(r[1] for r in results) / max(count, 1) / 1024, 1),
        "mean_width": round(sum(r[2] for r in results) / max(count, 1), 1),
        "mean_height": round(sum(r[3] for r in results) / max(count, 1), 1),
    }
    (out / "synthetic.json").write_text(json.dumps(report, indent=1) + "\n")
    if not quiet:
        print(f"{out}: {count} images in {report['seconds']} s ({report['images_per_sec']} img/s on {workers} "
              f"workers), mean {report['mean_width']:.0f}x{report['mean_height']:.0f}, {report['mean_kb']} KB",
              file=sys.stderr)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.make_synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="ImageFolder root to write (train/ and val/ under it)")
    p.add_argument("--n", type=int, required=True, help="train images")
    p.add_argument("--val", type=int, default=0, help="val images (default 0: no val split)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes (default: all usable cores)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        make_synthetic(a.out, a.n, a.val, a.classes, a.seed, a.workers, a.quality, quiet=a.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in demo dataset, made offline from the photographs that ship with scikit-image.

Usage::

    python -m data_prep.make_demo --out data/demo [--train-per-class 64] [--val-per-class 16] [--force]

Each photo is one class; its train and val images are random crops (area 25-100% of the
photo, aspect 3/4..4/3) rescaled so the longest side is 300-500 px, like ImageNet images.
Output::

    <out>/imagefolder/{train,val}/<class>/<class>_<i>.jpg   (JPEG q95)
    <out>/train.beton, <out>/val.beton, <out>/classes.json   (written by data_prep.write_beton)

Deterministic for a given --seed. If the outputs already exist it says so and exits 0
(--force rebuilds them).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data_prep.write_beton import (CLASSES_FILE, DataPrepError, WriteOptions, usable_cores,
                                   write_dataset)

# skimage.data file -> class name. Colour photographs of reasonable size, all on disk.
PHOTOS = {
    "astronaut.png": "astronaut",
    "chelsea.png": "cat",
    "coffee.png": "coffee",
    "hubble_deep_field.jpg": "hubble",
    "ihc.png": "immunohistochemistry",
    "motorcycle_left.png": "motorcycle",
    "retina.jpg": "retina",
    "rocket.jpg": "rocket",
}


def skimage_data_dir() -> Path:
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover
        raise DataPrepError("the demo dataset needs scikit-image (pip install scikit-image)") from e
    return Path(skimage.data.__file__).parent


def available_photos(data_dir: Path | None = None) -> dict[str, Path]:
    """{class name: photo path} for the PHOTOS present on disk."""
    data_dir = data_dir or skimage_data_dir()
    found = {cls: data_dir / f for f, cls in PHOTOS.items() if (data_dir / f).is_file()}
    if len(found) < 2:
        raise DataPrepError(f"{data_dir}: fewer than 2 of the demo photos are present "
                            f"({', '.join(PHOTOS)}); reinstall scikit-image")
    return found


def random_view(photo: Image.Image, rng: np.random.Generator, side_range=(300, 500),
                scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """A random crop of ``photo`` rescaled so its longest side is in ``side_range``."""
    W, H = photo.size
    for _ in range(20):
        area = W * H * rng.uniform(*scale)
        ar = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w, h = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        if 0 < w <= W and 0 < h <= H:
            break
    else:
        w, h = W, H
    x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    crop = photo.crop((x, y, x + w, y + h))
    long_side = int(rng.integers(side_range[0], side_range[1] + 1))
    s = long_side / max(w, h)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return crop.resize(size, Image.BICUBIC if s > 1 else Image.LANCZOS, reducing_gap=3.0)


def _make_class(job) -> int:
    root, ci, cls, path, per_split, seed, side_range, quality = job
    with Image.open(path) as im:
        photo = im.convert("RGB")
    count = 0
    for si, (split, n) in enumerate(sorted(per_split.items())):
        rng = np.random.default_rng([seed, ci, si])
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            random_view(photo, rng, side_range).save(d / f"{cls}_{i:04d}.jpg", quality=quality)
            count += 1
    return count


def make_imagefolder(root: Path, per_split: dict[str, int], seed: int = 0,
                     side_range=(300, 500), quality: int = 95, workers: int = 0) -> int:
    """Writes root/<split>/<class>/*.jpg; returns the number of images written."""
    photos = available_photos()
    jobs = [(root, ci, cls, path, per_split, seed, side_range, quality)
            for ci, (cls, path) in enumerate(sorted(photos.items()))]
    workers = min(len(jobs), workers if workers > 0 else usable_cores())
    if workers <= 1:
        return sum(map(_make_class, jobs))
    with mp.get_context("fork").Pool(workers) as pool:
        return sum(pool.map(_make_class, jobs, chunksize=1))


def outputs(out: Path) -> list[Path]:
    return [out / "train.beton", out / "val.beton", out / CLASSES_FILE]


def make_demo(out: str | Path, train_per_class: int = 64, val_per_class: int = 16,
              seed: int = 0, force: bool = False, workers: int = 0, quiet: bool = False) -> bool:
    """Builds the demo dataset under ``out``; returns False if it already existed."""
    out = Path(out)
    if not force and all(p.exists() for p in outputs(out)):
        print(f"demo dataset already present in {out} (train.beton, val.beton); "
              "pass --force to rebuild", file=sys.stderr)
        return False
    t0 = time.perf_counter()
    folder = out / "imagefolder"
    staging = out / ".imagefolder.partial"
    shutil.rmtree(staging, ignore_errors=True)
    n = make_imagefolder(staging, {"train": train_per_class, "val": val_per_class}, seed=seed,
                         workers=workers)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    write_dataset(folder, out, ("train", "val"),
                  WriteOptions(max_side=512, write_mode="jpg", jpeg_quality=90, workers=workers,
                               force=True, progress=not quiet))
    if not quiet:
        print(f"demo dataset: {n} images in {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.make_demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    p.add_argument("--train-per-class", type=int, default=64, help="train images per class (default 64)")
    p.add_argument("--val-per-class", type=int, default=16, help="val images per class (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="writer processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    try:
        make_demo(a.out, a.train_per_class, a.val_per_class, a.seed, a.force, a.workers, a.quiet)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

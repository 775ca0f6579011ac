"""The bicubic crop resize (``lomar_fast.data.resample``) against PIL and against earlier revisions of itself.

Usage::

    python -m benchmarks.resample                          # this tree's resize against PIL's
    python -m benchmarks.resample --against 2afe556 c2cf308 --out benchmarks/results/resample_cpu.json

Random RandomResizedCrop boxes (scale 0.2..1, ratio 3/4..4/3) of noise images of 500x375 and 375x500, each
resized to ``--size`` on one thread by ``resize_crop_bicubic`` and by PIL's ``crop(box).resize(size, BICUBIC)``
(the same pixels, asserted), and by the ``resample.py`` of each ``--against`` git revision (loaded from
``git show``, compiled beside this tree's; asserted equal too). Every implementation runs once per round, in an
order that alternates between rounds, so a change in the machine's load hits all of them; the result is the
median over ``--rounds`` of the microseconds per crop, and each one's ratio to this tree's (median of the
per-round ratios). ``--flip`` mirrors every crop left to right, as the training crops' flip does: this tree's
resize mirrors as it resizes (``flip=True``); the revisions, and a row of this tree's resize without it, resize
then run the decoders' separate flip pass (``_flip_rows``, what the decoders did before 2026-11-28); PIL
transposes after resizing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODULE = "lomar_fast/data/resample.py"


def load_revision(rev: str, where: Path):
    """``resample.py`` as it was at git revision ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = where / f"resample_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"resample_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_crops(count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), rng.integers(0, 256, (500, 375, 3), dtype=np.uint8)]
    crops = []
    while len(crops) < count:
        img = images[len(crops) % 2]
        h, w = img.shape[:2]
        area = h * w * rng.uniform(0.2, 1.0)
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        if cw <= w and ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crops.append((img, top, top + ch, left, left + cw))
    return crops


def main(argv: Sequence[str] | None = None) -> int:
    from PIL import Image

    from benchmarks.loader import cpu_model
    from lomar_fast.data import resample
    from lomar_fast.data.seeded_crop import _flip_rows

    p = argparse.ArgumentParser(prog="python -m benchmarks.resample", description=__doc__.split("\n")[0])
    p.add_argument("--against", nargs="*", default=[], metavar="REV", help="git revisions to time beside this tree")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--crops", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--flip", action="store_true", help="mirror every crop left to right (see above)")
    p.add_argument("--out", default=None, help="result JSON (default: print only)")
    a = p.parse_args(argv)
    crops = random_crops(a.crops)
    dst = np.empty((a.size, a.size, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        def then_flip(resize):
            def resize_then_flip(*crop):
                resize(*crop)
                _flip_rows(crop[-1])

            return resize_then_flip

        def mirrored(img, top, bottom, left, right, out):
            resample.resize_crop_bicubic(img, top, bottom, left, right, out, resample.ORDER_PIL13, True)

        ours = mirrored if a.flip else resample.resize_crop_bicubic
        impls = {"this tree": ours}
        if a.flip:
            impls["this tree, then a flip pass"] = then_flip(resample.resize_crop_bicubic)
        for rev in a.against:
            theirs = load_revision(rev, Path(tmp)).resize_crop_bicubic
            impls[rev] = then_flip(theirs) if a.flip else theirs
        pil_images = {id(img): Image.fromarray(img) for img, *_ in crops}

        def pil(img, top, bottom, left, right, out):
            im = pil_images[id(img)].crop((left, top, right, bottom)).resize((a.size, a.size), Image.BICUBIC)
            out[...] = np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if a.flip else im)

        impls["PIL"] = pil
        expected = np.empty_like(dst)
        for crop in crops:  # compiles each outside the timing, and checks they agree
            ours(*crop, expected)
            for name, fn in impls.items():
                fn(*crop, dst)
                if not np.array_equal(dst, expected):
                    raise SystemExit(f"{name} gives other pixels than this tree for the crop {crop[1:]}")
        times = {name: [] for name in impls}
        order = list(impls)
        for r in range(a.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                fn = impls[name]
                t0 = time.perf_counter()
                for crop in crops:
                    fn(*crop, dst)
                times[name].append((time.perf_counter() - t0) / len(crops) * 1e6)
    ours = np.array(times["this tree"])
    rows = [{"implementation": name, "us_per_crop": round(statistics.median(t), 1),
             "time_over_this_tree": round(float(np.median(np.array(t) / ours)), 3),
             "rounds_us": [round(x, 1) for x in t]} for name, t in times.items()]
    res = {"benchmark": "resample", "size": a.size, "crops": a.crops, "rounds": a.rounds, "flip": a.flip,
           "cpu": cpu_model(), "python": platform.python_version(),
           "numba": __import__("numba").__version__, "pillow": Image.__version__,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": rows}
    table = ["| implementation | us per crop (median) | time / this tree's |", "|---|---|---|"]
    table += [f"| {r['implementation']} | {r['us_per_crop']:.1f} | {r['time_over_this_tree']:.2f}x |" for r in rows]
    res["table"] = "\n".join(table)
    print(res["table"], file=sys.stderr)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

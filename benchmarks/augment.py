"""RandAugment cost per batch on the device: lomar_fast.data.randaugment at fine-tuning shapes.

Usage::

    python -m benchmarks.augment                       # CUDA if available, else CPU; B = 64, 256 at 224
    python -m benchmarks.augment --device cpu --batch-sizes 64 --repeats 3 --out /tmp/augment.json

Each batch is uint8 (B, S, S, 3) on the device, made of crops of the scikit-image demo photos.
Every timed call augments the batch with ``--aa`` for a new epoch (a new random plan), so the
median covers the mix of ops a training run sees. Two baselines are timed in the same run on
the same batch: a plain copy of the batch, and the uint8 -> normalised float32 NCHW conversion
the training step does anyway. RandAugment is timed with the sample indices on the CPU ("sparse":
each op runs only on the images that drew it; the trainer's path) and, on an accelerator, with
the indices on the device ("dense": every op on every image, identity for the others).
``--families`` (default on) also times each op family (lookup tables, Color, Sharpness, affine
bicubic/bilinear) applied to every image of the smallest batch, to show where the time goes.
Results: ``benchmarks/results/augment_<device>.json`` and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

# idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads stall every op
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def versions() -> dict:
    import PIL
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from benchmarks.loader import cpu_model

    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def photo_batch(batch_size: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (B, size, size, 3): random square crops of the demo photos, resized to ``size``."""
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB")
              for n in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(seed)
    distinct = []
    for i in range(min(batch_size, 16)):
        p = photos[i % len(photos)]
        side = int(rng.integers(min(p.size) // 2, min(p.size) + 1))
        x, y = int(rng.integers(0, p.size[0] - side + 1)), int(rng.integers(0, p.size[1] - side + 1))
        distinct.append(np.asarray(p.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack([distinct[i % len(distinct)] for i in range(batch_size)]))


def time_calls(fn: Callable[[int], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``fn(i)`` for i in range(repeats), after ``warmup`` untimed calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup):
        fn(-1 - i)
    sync()
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run(batch_size: int, size: int, device: torch.device, aa: str, repeats: int, warmup: int,
        dense: bool) -> dict:
    from lomar_fast.data.randaugment import build_rand_augment

    aug = build_rand_augment(aa, size)
    x = photo_batch(batch_size, size).to(device)
    idx_cpu = torch.arange(batch_size, dtype=torch.int64) * 3 + 17
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    timings = {
        "copy": time_calls(lambda i: x.clone(), device, repeats, warmup),
        "to_float_normalized": time_calls(
            lambda i: (x.permute(0, 3, 1, 2).float() - mean) / std, device, repeats, warmup),
        "randaugment_sparse": time_calls(lambda i: aug(x, 0, i, idx_cpu), device, repeats, warmup),
    }
    if dense:
        idx_dev = idx_cpu.to(device)
        timings["randaugment_dense"] = time_calls(lambda i: aug(x, 0, i, idx_dev, dense=True), device,
                                                  repeats, warmup)
    medians = {k: round(statistics.median(v), 3) for k, v in timings.items()}
    base = medians["to_float_normalized"]
    return {"batch_size": batch_size, "size": size,
            "raw_ms": {k: [round(t, 3) for t in v] for k, v in timings.items()},
            "median_ms": medians,
            "images_per_sec": {k: round(batch_size / (v / 1e3), 1) for k, v in medians.items()},
            "ratio_to_float_normalized": {k: round(v / base, 2) for k, v in medians.items()}}


def run_families(batch_size: int, size: int, device: torch.device, repeats: int, warmup: int) -> dict:
    """Milliseconds of each op family applied to every image of the batch (where the time goes)."""
    from lomar_fast.data.randaugment import apply_op

    x = photo_batch(batch_size, size).to(device)
    arg = torch.linspace(0.2, 1.8, batch_size, dtype=torch.float64)
    cases = {"lut (Equalize)": ("Equalize", arg, "bicubic"), "lut (Solarize)": ("Solarize", arg * 100, "bicubic"),
             "color": ("Color", arg, "bicubic"), "sharpness": ("Sharpness", arg, "bicubic"),
             "affine bicubic (Rotate)": ("Rotate", arg * 15 - 15, "bicubic"),
             "affine bilinear (Rotate)": ("Rotate", arg * 15 - 15, "bilinear"),
             "affine one-axis bicubic (ShearX)": ("ShearX", arg * 0.3 - 0.3, "bicubic")}
    out = {}
    for label, (name, a, interp) in cases.items():
        a = a.to(device)
        t = time_calls(lambda i: apply_op(x, name, a, interpolation=interp), device, repeats, warmup)
        out[label] = {"raw_ms": [round(v, 3) for v in t], "median_ms": round(statistics.median(t), 3)}
    return {"batch_size": batch_size, "size": size, "ops": out}


def render(res: dict) -> str:
    kinds = [k for k in ("copy", "to_float_normalized", "randaugment_sparse", "randaugment_dense")
             if k in res["results"][0]["median_ms"]]
    head = "| B | size | " + " | ".join(f"{k} ms" for k in kinds) + " | RandAugment img/s (sparse) |"
    lines = [f"RandAugment `{res['config']['aa']}` on {res['device']['name']} ({res['device']['type']}), "
             f"median of {res['config']['repeats']} calls per cell, torch {res['versions']['torch']}",
             "", head, "|" + "---|" * (len(kinds) + 3)]
    for r in res["results"]:
        cells = " | ".join(f"{r['median_ms'][k]:.1f}" for k in kinds)
        lines.append(f"| {r['batch_size']} | {r['size']} | {cells} | "
                     f"{r['images_per_sec']['randaugment_sparse']:.0f} |")
    if res.get("load_average"):
        lines.append(f"\nhost load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in res['load_average'])}")
    lines.append("")
    lines.append("sparse: sample indices on the CPU, each op runs on the images that drew it; dense: indices "
                 "on the device, every op on every image. Baselines: a copy of the uint8 batch, and the "
                 "uint8 NHWC -> normalised float32 NCHW conversion.")
    fam = res.get("families")
    if fam:
        lines += ["", f"One op family on all {fam['batch_size']} images at {fam['size']} px (median ms):", "",
                  "| op family | ms | ms per image |", "|---|---|---|"]
        for label, r in fam["ops"].items():
            lines.append(f"| {label} | {r['median_ms']:.1f} | {r['median_ms'] / fam['batch_size']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.augment", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment string")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the device-indices path (default: on an accelerator only)")
    p.add_argument("--families", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each op family on the whole batch, at the smallest batch size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/augment_<device>.json)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    accel = device.type != "cpu"
    repeats = a.repeats or (20 if accel else 3)
    warmup = a.warmup if a.warmup is not None else (3 if accel else 1)
    dense = accel if a.dense is None else a.dense
    results = []
    for b in a.batch_sizes:
        r = run(b, a.size, device, a.aa, repeats, warmup, dense)
        results.append(r)
        print(f"B={b}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["median_ms"].items()), file=sys.stderr)
    res = {
        "benchmark": "augment",
        "device": {"type": device.type, "name": device_name(device)},
        "versions": versions(),
        "config": {"aa": a.aa, "batch_sizes": a.batch_sizes, "size": a.size, "repeats": repeats,
                   "warmup": warmup, "dense": dense, "threads": torch.get_num_threads(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                   "batch": "crops of the scikit-image demo photos, uint8 NHWC on the device",
                   "epochs": "timed call i uses epoch i (a fresh plan per call)"},
        "results": results,
        "families": run_families(min(a.batch_sizes), a.size, device, repeats, warmup) if a.families else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        res["load_average"] = os.getloadavg()
    except OSError:
        pass
    res["table"] = render(res)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
    out = Path(a.out) if a.out else RESULTS_DIR / f"augment_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(res["table"] + "\n")
    print(res["table"], file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loader throughput: images/sec of the pretraining pipeline (decode + RandomResizedCrop + flip).

Usage::

    python -m benchmarks.loader                    # 1..N workers (N = cores), sizes 224 and 384
    python -m benchmarks.loader --quick --out /tmp/loader.json
    python -m benchmarks.loader --pipeline finetune --sizes 224 --workers 1 --interpolations area bicubic

The dataset is built once into ``--cache-dir``: random views of the scikit-image demo photos at ImageNet-like sizes
(500x375, a quarter of them 375x500 portrait), written as JPEG q90 with max side 512 by data_prep.write_beton. For
each (size, workers) the loader runs one warm-up epoch (it includes Numba compilation), then ``--epochs`` timed
epochs; the reported rate is the median epoch. ``decode_only`` times libjpeg-turbo full-image decodes (FFCV's own
decoder, one thread) and ``resize_only`` the crop+resize of decoded images, to show where the time goes.
``--pipeline finetune`` times the fine-tuning loader (scale 0.08..1, with labels) instead, ``--pipeline val`` the
evaluation loader (center crop, with labels), and ``--interpolations`` the crop resizes to compare (``bicubic``:
PIL's, lomar_fast.data.resample, the loaders' default and this benchmark's; ``area``: FFCV's INTER_AREA); every
(size, workers) runs each interpolation in turn, ``--rounds`` times, so a change in the machine's load hits both.
The dataset's JPEGs carry the writer's restart markers (``--restart-mcus``, 0 for none), and ``--region-decode on
off`` runs the loader decoding only each crop's region (lomar_fast.data.jpeg_region) and decoding whole images, in
turn; ``decode_only.region`` times the region decodes of the same random crops as ``resize_only``, one thread.
``--schedule balanced static`` runs the decode threads taking a batch's images from a queue, largest estimated cost
first (the loader's default), and FFCV's equal, contiguous shares, in turn. ``--device`` is where the batches go
(``cuda`` on a GPU host: FFCV's pinned buffers and the copy to the GPU, as in training); on the CPU the batch is the
decoder's own buffer, and ``--cpu-copy on off`` also times it with FFCV's ``ToDevice`` copy to the CPU at the end,
the pipeline before 2026-11-28, in turn.
Results: ``benchmarks/results/loader_<host>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence
from unittest import mock

import numpy as np

TARGET_PER_CORE_224 = 1500
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    import cv2
    import ffcv
    import numba
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "ffcv": getattr(ffcv, "__version__", "1.0.2"), "numba": numba.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__}


def build_dataset(cache_dir: Path, num_images: int, seed: int = 0, restart_mcus: int | None = None) -> Path:
    """ImageNet-like JPEG q90 .beton (max side 512) from the demo photos, cached; restart markers as the writer
    puts them (``restart_mcus`` None: its default)."""
    from PIL import Image

    from data_prep.make_demo import available_photos, random_view
    from data_prep.write_beton import RESTART_MCUS, WriteOptions, write_dataset

    restart_mcus = RESTART_MCUS if restart_mcus is None else restart_mcus
    out = cache_dir / (f"bench_{num_images}_500x375" + (f"_rst{restart_mcus}" if restart_mcus else ""))
    beton = out / "train.beton"
    if beton.exists():
        return beton
    src = out / "imagefolder"
    photos = sorted(available_photos().items())
    rng = np.random.default_rng(seed)
    per_class = -(-num_images // len(photos))
    written = 0
    for cls, path in photos:
        with Image.open(path) as im:
            photo = im.convert("RGB")
        d = src / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_class, num_images - written)):
            ar = 4 / 3 if rng.random() < 0.75 else 3 / 4  # 500x375 landscape or 375x500 portrait
            random_view(photo, rng, side_range=(500, 500), ratio=(ar, ar)).save(
                d / f"{i:05d}.jpg", quality=95)
            written += 1
    write_dataset(src, out, ("train",), WriteOptions(max_side=512, write_mode="jpg", jpeg_quality=90, force=True,
                                                     progress=False, restart_mcus=restart_mcus))
    return beton


def read_images(beton: Path, limit: int) -> tuple[list, list]:
    """The first ``limit`` images of ``beton``: their stored bytes and (height, width)."""
    from ffcv.reader import Reader

    r = Reader(str(beton))
    meta = r.metadata[r.metadata.dtype.names[r.field_names.index("image")]][:limit]
    table = r.alloc_table
    sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    mm = np.memmap(beton, dtype=np.uint8, mode="r")
    blobs = [np.array(mm[int(m["data_ptr"]):int(m["data_ptr"]) + sizes[int(m["data_ptr"])]]) for m in meta]
    return blobs, [(int(m["height"]), int(m["width"])) for m in meta]


def time_decode_and_resize(beton: Path, size: int, limit: int = 400,
                           interpolation: str = "area") -> tuple[dict, dict]:
    """Single-thread libjpeg-turbo decode of whole images, of the random crops' regions alone, then crop+resize
    to ``size``."""
    from ffcv.libffcv import imdecode, resize_crop

    from lomar_fast.data.jpeg_region import jpeg_region

    if interpolation == "bicubic":
        from lomar_fast.data.resample import resize_crop_bicubic as resize_crop

    blobs, hw = read_images(beton, limit)
    outs = [np.empty((h, w, 3), np.uint8) for h, w in hw]
    for _ in range(2):  # second pass is the timed one
        t0 = time.perf_counter()
        for b, (h, w), o in zip(blobs, hw, outs):
            imdecode(b, o, h, w, h, w, 0, 0, 1, 1, False, False)
        dec = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    boxes = []
    for h, w in hw:
        area = h * w * rng.uniform(0.2, 1.0)
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(round(np.sqrt(area * ar)))), min(h, int(round(np.sqrt(area / ar))))
        i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        boxes.append((i, i + ch, j, j + cw))
    # the crops' regions: the region JPEG is made and decoded inside the timing, as the loader does, into one
    # buffer (the whole images in `outs` stay for the resize timing)
    stream = np.empty(max(b.size for b in blobs) + 2, np.uint8)
    pixels = np.empty(max(o.size for o in outs), np.uint8)
    jpeg_region(blobs[0], 0, 1, 0, 1, stream)  # compiles outside the timing
    regions, region_px = 0, 0
    for _ in range(2):  # second pass is the timed one
        regions, region_px = 0, 0
        t0 = time.perf_counter()
        for b, (h, w), (top, bottom, left, right) in zip(blobs, hw, boxes):
            made, _, _, rh, rw = jpeg_region(b, top, bottom, left, right, stream)
            if made:
                imdecode(stream[:made], pixels, rh, rw, rh, rw, 0, 0, 1, 1, False, False)
                regions, region_px = regions + 1, region_px + rh * rw
            else:
                imdecode(b, pixels, h, w, h, w, 0, 0, 1, 1, False, False)
        reg = time.perf_counter() - t0
    dst = np.empty((size, size, 3), np.uint8)
    resize_crop(outs[0], 0, 8, 0, 8, dst)  # compiles the bicubic resize outside the timing
    pil = None
    if interpolation == "bicubic":  # PIL's crop-then-resize of the same crops gives the same pixels: the baseline
        from PIL import Image

        images = [Image.fromarray(o) for o in outs]
    runs, pil_runs = [], []
    for _ in range(3):  # in turn, median of three
        t0 = time.perf_counter()
        for o, (top, bottom, left, right) in zip(outs, boxes):
            resize_crop(o, top, bottom, left, right, dst)
        runs.append(time.perf_counter() - t0)
        if interpolation == "bicubic":
            t0 = time.perf_counter()
            for im, (top, bottom, left, right) in zip(images, boxes):
                im.crop((left, top, right, bottom)).resize((size, size), Image.BICUBIC)
            pil_runs.append(time.perf_counter() - t0)
    rs = statistics.median(runs)
    if pil_runs:
        pil = statistics.median(pil_runs)
    n = len(blobs)
    mean_w, mean_h = float(np.mean([w for _, w in hw])), float(np.mean([h for h, _ in hw]))
    decode = {"images": n, "seconds": round(dec, 4), "images_per_sec": round(n / dec, 1),
              "ms_per_image": round(1e3 * dec / n, 3), "mean_width": round(mean_w, 1),
              "mean_height": round(mean_h, 1),
              "mean_jpeg_kb": round(float(np.mean([len(b) for b in blobs])) / 1024, 1),
              "region": {"ms_per_image": round(1e3 * reg / n, 3), "images_per_sec": round(n / reg, 1),
                         "speedup_over_whole": round(dec / reg, 3), "fraction_by_region": round(regions / n, 3),
                         "mean_region_area_fraction": round(region_px / max(regions, 1) / float(
                             np.mean([h * w for h, w in hw])), 3)}}
    resize = {"size": size, "interpolation": interpolation, "images": n, "seconds": round(rs, 4),
              "images_per_sec": round(n / rs, 1), "ms_per_image": round(1e3 * rs / n, 3)}
    if pil is not None:
        resize["pil"] = {"images_per_sec": round(n / pil, 1), "ms_per_image": round(1e3 * pil / n, 3),
                         "speedup_over_pil": round(pil / rs, 3)}
    return decode, resize


def schedule_model(beton: Path, size: int, threads: Sequence[int], batch_size: int, limit: int = 512,
                   interpolation: str = "bicubic", trials: int = 200) -> dict:
    """How evenly each schedule shares a batch among ``threads`` decode threads, from measured per-image times.

    Each image's decode (its crop's region where the JPEG allows it) and crop resize, with the pretraining
    loader's draws for epoch 0, is timed alone on one thread (the best of two). Random batches of those times
    are then replayed through both schedules: ``static``, FFCV's equal, contiguous shares of the batch, and
    ``balanced``, the queue in :func:`lomar_fast.data.seeded_crop.decode_cost` order, each thread taking the
    next image when it is free. A schedule's efficiency is the batch's work over ``threads`` times its slowest
    thread's. A model: what the threads share (memory bandwidth, caches, the serial part of a batch) is left out."""
    import heapq

    from ffcv.libffcv import imdecode, resize_crop

    from lomar_fast.data import PRETRAIN_SCALE, RATIO
    from lomar_fast.data.jpeg_region import jpeg_region
    from lomar_fast.data.seeded_crop import decode_cost, draw_crop

    if interpolation == "bicubic":
        from lomar_fast.data.resample import resize_crop_bicubic as resize_crop

    blobs, hw = read_images(beton, limit)
    scale, ratio = np.array(PRETRAIN_SCALE, np.float64), np.array(RATIO, np.float64)
    stream = np.empty(max(b.size for b in blobs) + 2, np.uint8)
    pixels = np.empty(max(h * w for h, w in hw) * 3, np.uint8)
    dst = np.empty((size, size, 3), np.uint8)

    def one(k):
        (h, w), blob = hw[k], blobs[k]
        i, j, ch, cw, _ = draw_crop(0, 0, k, h, w, scale, ratio, 0.5)
        made, y0, x0, rh, rw = jpeg_region(blob, i, i + ch, j, j + cw, stream)
        if made and imdecode(stream[:made], pixels, rh, rw, rh, rw, 0, 0, 1, 1, False, False) == 0:
            resize_crop(pixels[:rh * rw * 3].reshape(rh, rw, 3), i - y0, i - y0 + ch, j - x0, j - x0 + cw, dst)
        else:
            imdecode(blob, pixels, h, w, h, w, 0, 0, 1, 1, False, False)
            resize_crop(pixels[:h * w * 3].reshape(h, w, 3), i, i + ch, j, j + cw, dst)
        return decode_cost(blob.size, True, True, h, w, ch, cw)

    one(0)  # compiles outside the timing
    times, costs = np.empty(len(blobs)), np.empty(len(blobs))
    for k in range(len(blobs)):
        best = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            costs[k] = one(k)
            best = min(best, time.perf_counter() - t0)
        times[k] = best
    rng = np.random.default_rng(0)
    batch = min(batch_size, len(blobs))
    rows = []
    for n in threads:
        eff = {"static": [], "balanced": []}
        for _ in range(trials):
            pick = rng.choice(len(blobs), batch, replace=False)
            t = times[pick]
            eff["static"].append(t.sum() / n / max(c.sum() for c in np.array_split(t, n)))
            free = [0.0] * n
            for x in t[np.argsort(-costs[pick], kind="stable")]:
                heapq.heappush(free, heapq.heappop(free) + x)
            eff["balanced"].append(t.sum() / n / max(free))
        st, ba = float(np.mean(eff["static"])), float(np.mean(eff["balanced"]))
        rows.append({"threads": n, "batch_size": batch, "efficiency_static": round(st, 3),
                     "efficiency_balanced": round(ba, 3), "speedup": round(ba / st, 3)})
    ms = times * 1e3
    return {"images": len(blobs), "size": size, "interpolation": interpolation, "trials": trials,
            "ms_per_image": {"mean": round(float(ms.mean()), 3), "sd": round(float(ms.std()), 3),
                             "p10": round(float(np.percentile(ms, 10)), 3),
                             "p90": round(float(np.percentile(ms, 90)), 3)},
            "cost_time_correlation": round(float(np.corrcoef(costs, times)[0, 1]), 3), "rows": rows}


def _with_cpu_copy(device):
    """The pipelines' last step as it was before 2026-11-28: FFCV's ToDevice copy, to the CPU too."""
    import torch
    from ffcv.transforms import ToDevice

    return [ToDevice(torch.device(device), non_blocking=False)]


def run_loader(beton: Path, size: int, workers: int, batch_size: int, epochs: int, pipeline: str = "pretrain",
               interpolation: str = "bicubic", region: bool = True, schedule: str = "balanced",
               device: str = "cpu", cpu_copy: bool = False) -> dict:
    from lomar_fast.data import build_finetune_loader, build_pretrain_loader, build_val_loader, loaders
    from lomar_fast.data.seeded_crop import DECODE_SCHEDULE_ENV, REGION_DECODE_ENV

    build = {"pretrain": build_pretrain_loader, "finetune": build_finetune_loader, "val": build_val_loader}[pipeline]
    switches = {REGION_DECODE_ENV: "1" if region else "0", DECODE_SCHEDULE_ENV: schedule}
    copy = mock.patch.object(loaders, "_to_device", _with_cpu_copy) if cpu_copy else contextlib.nullcontext()
    with mock.patch.dict(os.environ, switches), copy:  # read as the decoder and the pipelines are made
        loader = build(beton, batch_size=batch_size, input_size=size, num_workers=workers, order="random", seed=0,
                       interpolation=interpolation, device=device)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    warmup = time.perf_counter() - t0
    times, count = [], 0
    for _ in range(epochs):
        count = 0
        t0 = time.perf_counter()
        for x in loader:
            count += (x if pipeline == "pretrain" else x[0]).shape[0]
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    decoded = count * (epochs + 1)
    return {"size": size, "workers": workers, "pipeline": pipeline, "interpolation": interpolation,
            "region_decode": region, "schedule": schedule, "device": device, "cpu_copy": cpu_copy,
            "decoded_by_region": round(loader.decoders[0].region_decodes / max(decoded, 1), 3),
            "batches_per_epoch": len(loader),
            "images_per_epoch": count, "warmup_seconds": round(warmup, 3),
            "epoch_seconds": [round(t, 4) for t in times],
            "images_per_sec": round(count / med, 1),
            "images_per_sec_per_core": round(count / med / workers, 1)}


def pipeline_description(pipeline: str = "pretrain", device: str = "cpu") -> str:
    from lomar_fast.data import (FINETUNE_SCALE, PRETRAIN_SCALE, RATIO, eval_crop_pct, finetune_pipelines,
                                 pretrain_pipelines, val_pipelines)

    if pipeline == "val":
        ops = " -> ".join(type(op).__name__ for op in val_pipelines(224, device)["image"])
        return f"val: {ops} (center crop of {eval_crop_pct(224):.3f} of the short side, device {device})"
    pipes, scale = (pretrain_pipelines, PRETRAIN_SCALE) if pipeline == "pretrain" else (finetune_pipelines,
                                                                                         FINETUNE_SCALE)
    ops = " -> ".join(type(op).__name__ for op in pipes(224, device)["image"])
    return f"{pipeline}: {ops} (scale {scale}, ratio {RATIO[0]:.3f}-{RATIO[1]:.3f}, device {device})"


def render(res: dict) -> str:
    rows = res["results"]
    interps = len({r.get("interpolation", "area") for r in rows}) > 1
    regions = len({r.get("region_decode", False) for r in rows}) > 1
    schedules = len({r.get("schedule", "static") for r in rows}) > 1
    copies = len({r.get("cpu_copy", True) for r in rows}) > 1
    if interps or regions or schedules or copies:  # the median over the rounds of each configuration
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["size"], r["workers"], r["interpolation"], r.get("region_decode", False),
                               r.get("schedule", "static"), r.get("cpu_copy", True)), []).append(r)
        lines = ["| size | workers | interpolation | region decode | schedule | copy to the CPU | "
                 "img/s (median of rounds) | img/s per core | rounds |", "|---|---|---|---|---|---|---|---|---|"]
        for (size, workers, interp, region, schedule, copy), rs in groups.items():
            ips = statistics.median(r["images_per_sec"] for r in rs)
            each = ", ".join(f"{r['images_per_sec']:.0f}" for r in rs)
            by = f"on ({rs[0]['decoded_by_region']:.0%} of images)" if region else "off"
            lines.append(f"| {size} | {workers} | {interp} | {by} | {schedule} | {'on' if copy else 'off'} | "
                         f"{ips:.0f} | {ips / workers:.0f} | {each} |")
    else:
        lines = ["| size | workers | img/s | img/s per core |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['size']} | {r['workers']} | {r['images_per_sec']:.0f} | "
                         f"{r['images_per_sec_per_core']:.0f} |")
    d = res["decode_only"]
    rs = ", ".join(f"{r['images_per_sec']:.0f} img/s at {r['size']} ({r.get('interpolation', 'area')}"
                   + (f"; PIL's crop and resize of the same crops, same pixels: {r['pil']['images_per_sec']:.0f}"
                      if "pil" in r else "") + ")" for r in res["resize_only"])
    lines.append(f"\nfull JPEG decode only (1 thread, {d['mean_width']:.0f}x{d['mean_height']:.0f} "
                 f"mean): {d['images_per_sec']:.0f} img/s; crop+resize only: {rs}")
    if "region" in d:
        g = d["region"]
        lines.append(f"the random crops' regions alone (1 thread): {g['images_per_sec']:.0f} img/s, "
                     f"{g['speedup_over_whole']:.2f}x the whole-image decode; {g['fraction_by_region']:.0%} of the "
                     f"images by region, the region {g['mean_region_area_fraction']:.0%} of the image on average")
    m = res.get("schedule_model")
    if m:
        lines.append(f"\nschedule model ({m['images']} images timed alone on one thread, {m['interpolation']} at "
                     f"{m['size']}: {m['ms_per_image']['mean']:.2f} ms mean, sd {m['ms_per_image']['sd']:.2f}; "
                     f"estimated cost against time: r = {m['cost_time_correlation']:.2f}), mean of {m['trials']} "
                     "random batches:\n\n| threads | batch | static efficiency | balanced efficiency | speedup |\n"
                     "|---|---|---|---|---|")
        lines += [f"| {r['threads']} | {r['batch_size']} | {r['efficiency_static']:.3f} | "
                  f"{r['efficiency_balanced']:.3f} | {r['speedup']:.3f}x |" for r in m["rows"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from data_prep.write_beton import RESTART_MCUS, usable_cores
    from lomar_fast.images import DEFAULT_INTERPOLATION

    cores = usable_cores()
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="existing .beton to read (default: build one in --cache-dir)")
    p.add_argument("--cache-dir", default=None,
                   help="where the benchmark dataset is built (default $XDG_CACHE_HOME/lomar_fast)")
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    p.add_argument("--workers", type=int, nargs="+", default=list(range(1, cores + 1)))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs after one warm-up epoch")
    p.add_argument("--pipeline", choices=["pretrain", "finetune", "val"], default="pretrain")
    p.add_argument("--interpolations", nargs="+", choices=["area", "bicubic"], default=[DEFAULT_INTERPOLATION],
                   help=f"the crop resizes to time, in turn (default {DEFAULT_INTERPOLATION}, the loaders')")
    p.add_argument("--rounds", type=int, default=1, help="times each (size, workers) runs every interpolation")
    p.add_argument("--region-decode", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="decode only each crop's region (on) and/or whole images (off), in turn (default both)")
    p.add_argument("--schedule", nargs="+", choices=["balanced", "static"], default=["balanced", "static"],
                   help="how the decode threads share a batch (LOMAR_DECODE_SCHEDULE): a queue, largest estimated "
                        "cost first (balanced), and/or FFCV's equal shares (static), in turn (default both)")
    p.add_argument("--schedule-model", type=int, nargs="*", default=None, metavar="THREADS",
                   help="also model how evenly each schedule shares a batch among these thread counts (default 2 8 "
                        "16 32), from per-image times measured on one thread")
    p.add_argument("--device", default="cpu", help="where the batches go: cpu (default) or cuda, as in training")
    p.add_argument("--cpu-copy", nargs="+", choices=["on", "off"], default=["off"],
                   help="on the CPU, also time the pipeline with FFCV's ToDevice copy at its end (on), the "
                        "pipeline before 2026-11-28, in turn with the loaders' (off, the default alone)")
    p.add_argument("--restart-mcus", type=int, default=RESTART_MCUS,
                   help=f"the built dataset's restart markers (default {RESTART_MCUS}, the writer's; 0: none)")
    p.add_argument("--quick", action="store_true", help="tiny run (64 images, 224, 1 worker, 1 epoch)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/loader_<host>.json)")
    a = p.parse_args(argv)
    if "on" in a.cpu_copy and a.device != "cpu":
        p.error(f"--cpu-copy on times a copy to the CPU; it needs --device cpu, not {a.device!r}")
    if a.quick:
        a.num_images, a.sizes, a.workers, a.epochs, a.batch_size = 64, [224], [1], 1, 16
    cache = Path(a.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                             "lomar_fast"))
    cache.mkdir(parents=True, exist_ok=True)
    beton = Path(a.data) if a.data else build_dataset(cache, a.num_images, restart_mcus=a.restart_mcus)
    load_before = os.getloadavg()
    limit = 64 if a.quick else 400
    timed = [time_decode_and_resize(beton, size, limit, interp) for size in a.sizes for interp in a.interpolations]
    decode, resize = timed[0][0], [r for _, r in timed]
    model = None
    if a.schedule_model is not None:
        model = schedule_model(beton, a.sizes[0], a.schedule_model or [2, 8, 16, 32], a.batch_size,
                               limit=a.num_images, interpolation=a.interpolations[-1], trials=20 if a.quick else 200)
    results = []
    for size in a.sizes:
        for w in a.workers:
            for _ in range(a.rounds):
                for interp in a.interpolations:
                    for region in a.region_decode:
                        for schedule in a.schedule:
                            for copy in a.cpu_copy:
                                r = run_loader(beton, size, w, a.batch_size, a.epochs, a.pipeline, interp,
                                               region == "on", schedule, a.device, copy == "on")
                                results.append(r)
                                print(f"size {size} workers {w} {interp} region decode {region} {schedule} "
                                      f"{a.device}{' with the CPU copy' if copy == 'on' else ''}: "
                                      f"{r['images_per_sec']:.0f} img/s ({r['images_per_sec_per_core']:.0f}/core)",
                                      file=sys.stderr)
    from lomar_fast.data import dataset_info

    info = dataset_info(beton)
    host = socket.gethostname() or "cpu"
    res = {
        "benchmark": "loader",
        "host": host,
        "cpu": {"model": cpu_model(), "cores": cores, "load_average_before": load_before,
                "load_average_after": os.getloadavg()},
        "versions": versions(),
        "config": {"quick": a.quick, "pipeline": pipeline_description(a.pipeline, a.device),
                   "interpolations": a.interpolations, "region_decode": a.region_decode, "schedule": a.schedule,
                   "device": a.device, "cpu_copy": a.cpu_copy,
                   "rounds": a.rounds,
                   "batch_size": a.batch_size,
                   "epochs": a.epochs, "warmup_epochs": 1, "sizes": a.sizes, "workers": a.workers,
                   "order": "random", "os_cache": True},
        "dataset": {"path": str(beton), "num_images": info["num_images"], "max_side": info["max_side"],
                    "jpeg_quality": 90, "jpeg_fraction": info["jpeg_fraction"],
                    "restart_mcus": None if a.data else a.restart_mcus},
        "results": results,
        "decode_only": decode,
        "resize_only": resize,
        **({"schedule_model": model} if model else {}),
        "target_images_per_sec_per_core_224": TARGET_PER_CORE_224,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    res["table"] = render(res)
    out = Path(a.out) if a.out else RESULTS_DIR / f"loader_{host if host else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(res["table"], file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

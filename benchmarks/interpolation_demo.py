"""Demo fine-tuning top-1 with the crops resized by INTER_AREA vs PIL's bicubic (``--interpolation``), over seeds.

Usage::

    python -m benchmarks.interpolation_demo --data data/demo --init output/demo/model.pth --work /tmp/interp
    python -m benchmarks.interpolation_demo ... --seeds 0 1 2 --interpolations area bicubic --out results.json

``--data`` holds ``train.beton`` and ``val.beton`` from ``make demo-data``; ``--init`` is ``make pretrain``'s
export. Each (interpolation, seed) runs ``make finetune``'s fine-tuning command (the demo flags: vit_tiny_patch16
at 160 px, batch 32, 5 epochs, 1 of warmup, blr 4e-3, 2 workers) with ``--seed S --interpolation I`` in a fresh
output directory, one run after another; training and the evaluation after each epoch use the same
interpolation. Recorded per run: the best val top-1 (``summary.json``), every epoch's val top-1, seconds and
loader wait, and the wall time. The JSON is rewritten after every run, so an interrupted sweep keeps what it
finished. Results: ``benchmarks/results/interpolation_demo_<device>.json`` and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FT_DEMO_ARGS = ["--model", "vit_tiny_patch16", "--input_size", "160", "--batch_size", "32", "--epochs", "5",
                "--warmup_epochs", "1", "--blr", "4e-3", "--num_workers", "2", "--log_every", "4"]


def versions() -> dict:
    import deepspeed
    import numba
    import numpy as np
    import PIL
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "timm": timm.__version__, "numba": numba.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "ffcv": "1.0.2"}


def finetune_command(args, interpolation: str, seed: int | str, out: Path) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", "1", str(ROOT / "lomar_fast" / "finetune.py"),
            "--deepspeed_config", str(ROOT / "ds_configs" / "cpu.json"), "--finetune", str(args.init),
            "--data_path", str(Path(args.data) / "train.beton"), "--val_path", str(Path(args.data) / "val.beton"),
            "--output_dir", str(out), *FT_DEMO_ARGS, "--seed", str(seed), "--interpolation", interpolation,
            "--overwrite"]


def read_run(out: Path) -> dict:
    from lomar_fast.logging_utils import epoch_records

    summary = json.loads((out / "summary.json").read_text())
    epochs = epoch_records(out)
    return {"best_top1": summary["best_top1"], "best_epoch": summary["best_epoch"],
            "val_top1": [round(r["val_top1"], 4) for r in epochs],
            "epoch_seconds": [round(r["epoch_time"], 2) for r in epochs],
            "data_wait_seconds": [round(r["data_wait_s"], 3) for r in epochs],
            "loss": [round(r["loss"], 4) for r in epochs]}


def summarize(runs: list[dict], interpolations: Sequence[str]) -> dict:
    out = {}
    for interp in interpolations:
        mine = [r for r in runs if r["interpolation"] == interp]
        if not mine:
            continue
        top1 = [r["best_top1"] for r in mine]
        # the first epoch also compiles the loader's pipeline: the later epochs show the steady cost
        steady = [s for r in mine for s in r["epoch_seconds"][1:]]
        wait = [w for r in mine for w in r["data_wait_seconds"][1:]]
        out[interp] = {"runs": len(mine), "best_top1": top1, "mean": statistics.fmean(top1),
                       "std": statistics.stdev(top1) if len(top1) > 1 else 0.0, "min": min(top1), "max": max(top1),
                       "median_epoch_seconds": statistics.median(steady) if steady else None,
                       "median_data_wait_seconds": statistics.median(wait) if wait else None}
    # the same seed with each interpolation: the same initial head, order, augmentation draws and crop boxes
    if len(interpolations) == 2:
        a, b = interpolations
        by = {(r["interpolation"], r["seed"]): r for r in runs}
        pairs = [(by[a, s], by[b, s]) for s in sorted({r["seed"] for r in runs}) if (a, s) in by and (b, s) in by]
        if pairs:
            out["paired"] = {
                "seeds": [x["seed"] for x, _ in pairs],
                f"best_top1_{b}_minus_{a}": [round(y["best_top1"] - x["best_top1"], 4) for x, y in pairs],
                f"epoch_top1_{b}_minus_{a}": [[round(q - p, 4) for p, q in zip(x["val_top1"], y["val_top1"])]
                                              for x, y in pairs]}
    return out


def render(res: dict) -> str:
    v = res["versions"]
    lines = [f"Demo fine-tuning (`make finetune` flags, init: one `make pretrain` export), {res['cpu']['model']}, "
             f"{res['cpu']['cores']} cores, torch {v['torch']}, DeepSpeed {v['deepspeed']}, Pillow {v['pillow']}, "
             f"{res['timestamp'][:10]}.", "",
             "| interpolation | best val top-1 per seed (%) | mean ± std | min-max | s/epoch (median, epochs 2-5) "
             "| loader wait s/epoch |", "|---|---|---|---|---|---|"]
    for interp, s in res["summary"].items():
        if interp == "paired":
            continue
        seeds = ", ".join(f"{v:.2f}" for v in s["best_top1"])
        lines.append(f"| {interp} | {seeds} | {s['mean']:.2f} ± {s['std']:.2f} | {s['min']:.2f}-{s['max']:.2f} | "
                     f"{s['median_epoch_seconds']:.1f} | {s['median_data_wait_seconds']:.2f} |")
    paired = res["summary"].get("paired")
    if paired:
        (kb, best), (ke, per_epoch) = [(k, v) for k, v in paired.items() if k != "seeds"]
        lines.append(f"\nSame seed, {kb.removeprefix('best_top1_').replace('_minus_', ' minus ')}: best top-1 "
                     f"{', '.join(f'{d:+.2f}' for d in best)} points (seeds {paired['seeds']}); per epoch "
                     f"{'; '.join(' '.join(f'{d:+.2f}' for d in e) for e in per_epoch)}.")
    lines.append(f"\n{res['config']['val_images']} val images (one image = {100 / res['config']['val_images']:.2f} "
                 f"points of top-1); seeds {res['config']['seeds']}; std is the sample standard deviation.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.loader import cpu_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.interpolation_demo", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="folder with the demo train.beton and val.beton")
    p.add_argument("--init", help="the pretraining export (make pretrain's model.pth)")
    p.add_argument("--work", help="where the fine-tuning runs go (one folder per run)")
    p.add_argument("--rerender", metavar="JSON", help="only recompute the summary and table of this result file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--interpolations", nargs="+", default=["area", "bicubic"], choices=["area", "bicubic"])
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/interpolation_demo_cpu.json)")
    a = p.parse_args(argv)
    if a.rerender:  # recompute the summary and the table of an existing result JSON
        res = json.loads(Path(a.rerender).read_text())
        res["summary"] = summarize(res["runs"], res["config"]["interpolations"])
        res["table"] = render(res)
        out = Path(a.out) if a.out else Path(a.rerender)
        out.write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(res["table"] + "\n")
        print(res["table"], file=sys.stderr)
        return 0
    if not (a.data and a.init and a.work):
        p.error("--data, --init and --work are required (unless --rerender)")
    from lomar_fast.data import dataset_info

    out = Path(a.out) if a.out else RESULTS_DIR / "interpolation_demo_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = {"benchmark": "interpolation_demo",
           "cpu": {"model": cpu_model(), "cores": len(os.sched_getaffinity(0))},
           "versions": versions(),
           "config": {"finetune_args": FT_DEMO_ARGS, "seeds": a.seeds, "interpolations": a.interpolations,
                      "data": str(a.data), "init": str(a.init),
                      "train_images": dataset_info(Path(a.data) / "train.beton")["num_images"],
                      "val_images": dataset_info(Path(a.data) / "val.beton")["num_images"],
                      "command": " ".join(finetune_command(a, "INTERP", "SEED", Path(a.work) / "INTERP_seedSEED"))},
           "runs": [], "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for seed in a.seeds:  # seeds outer: an interrupted sweep still has both interpolations of the seeds it did
        for interp in a.interpolations:
            run_dir = Path(a.work) / f"{interp}_seed{seed}"
            load = os.getloadavg()
            t0 = time.perf_counter()
            log = run_dir.with_suffix(".log")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                proc = subprocess.run(finetune_command(a, interp, seed, run_dir), cwd=ROOT, env=env, stdout=f,
                                      stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                print(f"{interp} seed {seed}: fine-tuning failed (exit {proc.returncode}); see {log}", file=sys.stderr)
                return 1
            run = {"interpolation": interp, "seed": seed, **read_run(run_dir),
                   "wall_seconds": round(time.perf_counter() - t0, 1), "load_average_before": load,
                   "load_average_after": os.getloadavg()}
            res["runs"].append(run)
            res["summary"] = summarize(res["runs"], a.interpolations)
            out.write_text(json.dumps(res, indent=1) + "\n")
            print(f"{interp} seed {seed}: best top-1 {run['best_top1']:.2f}% (epochs {run['val_top1']}), "
                  f"{run['wall_seconds']:.0f} s", file=sys.stderr)
    res["table"] = render(res)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(res["table"] + "\n")
    print(res["table"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

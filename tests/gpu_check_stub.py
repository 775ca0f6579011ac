"""Stands in for the GPU host's Python under ``benchmarks/gpu_check.sh`` (tests/test_gpu_check.py).

Each benchmark command line goes through that benchmark's own argument parsing and, for the throughput
benchmark, its run plan as on a CUDA device (profile target included), and for the kernel benchmark the cases
it names, then writes a small JSON where the benchmark writes its report. The test command's files and marker
are checked, not run; the ``-c`` probes succeed (``$STUB_NO_DEEPSPEED`` makes ``import deepspeed`` fail);
anything else runs in this interpreter. Every call is appended to ``$STUB_LOG`` as one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _record(argv: list[str], **extra) -> None:
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps({"argv": argv, **extra}) + "\n")


def stub_rate(variant: str, batch: int) -> float:
    """A made-up images/sec for a throughput row, so that benchmarks/combine.py has a choice to make: FlexAttention
    +100, the warp-tiled kernels -100, the whole model compiled +30, micro-batch 512 +50, the aligned iRPE bias -10."""
    rate = 1000.0 + (100 if os.environ.get("LOMAR_ATTN_PATH") == "flex" else 0)
    rate -= 100 if os.environ.get("LOMAR_WA_KERNEL") == "mma" else 0
    rate -= 10 if os.environ.get("LOMAR_IRPE_PATH") == "bmm_aligned" else 0
    return rate + (30 if variant.startswith("compile-model") else 0) + (50 if batch == 512 else 0)


def main(argv: list[str]) -> int:
    if argv[:2] == ["-m", "benchmarks.throughput"]:
        import torch

        from benchmarks import throughput as tp

        args = tp.parse_args(argv[2:])
        device = torch.device("cuda")
        tp.resolve_defaults(args, device)
        _, _, plan, _, target = tp.plan_run(args, device)
        first_fits = not plan or args.time_budget is None or args.time_budget > tp.row_cost(plan[0][2])
        _record(argv, plan=[":".join(map(str, p)) for p in plan], target=target and ":".join(map(str, target)),
                budget=args.time_budget, first_row_fits=first_fits,
                env={name: os.environ.get(name) for name in ("LOMAR_ATTN_PATH", "LOMAR_WA_KERNEL", "LOMAR_IRPE_PATH")})
        Path(args.out).mkdir(parents=True, exist_ok=True)
        rows = [{"kind": p[0], "size": p[1], "variant": p[2], "batch_size": args.lomar_batch or 256, "status": "ok",
                 "images_per_sec": stub_rate(p[2], args.lomar_batch or 256)} for p in plan]
        Path(args.out, f"{args.name}.json").write_text(json.dumps({"stub": True, "plan": len(plan), "results": rows}))
        return 0
    if argv[:2] == ["-m", "benchmarks.kernels"]:
        from benchmarks import kernels

        args = kernels.parse_args(argv[2:])
        _record(argv, cases=args.cases)
        if args.cases:  # the names must be cases of a GPU run (bf16): built from tiny inputs here, not run
            cfg = dict(kernels.SMOKE_CONFIG, dtype=kernels.GPU_CONFIG["dtype"])
            kernels.select_cases(kernels.build_cases(kernels.make_inputs(cfg, "cpu"), cfg, "cpu", True), args.cases)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "kernels.json").write_text(json.dumps({"stub": True}))
        return 0
    if argv[:2] == ["-m", "pytest"]:  # the test files exist and the marker is registered
        _record(argv)
        files = [a.split("::")[0] for a in argv[2:] if a.startswith("tests/")]  # a file, or a test id in one
        marker = argv[argv.index("-m", 2) + 1]
        registered = f'"{marker}:' in Path("pyproject.toml").read_text()
        return 0 if files and all(Path(f).is_file() for f in files) and registered else 4
    _record(argv)
    if argv[:1] == ["-c"]:  # the environment probes: only whether DeepSpeed imports matters to the script
        return 1 if os.environ.get("STUB_NO_DEEPSPEED") and "import deepspeed" in argv[1] else 0
    return subprocess.call([sys.executable, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

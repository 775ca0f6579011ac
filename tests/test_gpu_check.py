"""benchmarks/gpu_check.sh, the one-call GPU check, run here with a stand-in interpreter (tests/gpu_check_stub.py):
every stage's command line must parse, the throughput plans must hold their profile targets, and the output
folder must receive the few files a device call hands back. A mistake here would cost a GPU call."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs the script, a process per stage

REPO = Path(__file__).resolve().parents[1]


def run_check(tmp_path: Path, *script_args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} {REPO / 'tests' / 'gpu_check_stub.py'} \"$@\"\n")
    py.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    full_env = {**os.environ, "PY": str(py), "STUB_LOG": str(log), "OUT": str(tmp_path / "out"),
                "RESULTS": str(tmp_path / "results"), "CHECK_KIT": "0", "DEADLINE": "540",
                "PYTHONPATH": str(REPO), **env}
    full_env.pop("THROUGHPUT_ARGS", None)
    full_env.update(env)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *script_args], env=full_env,
                          capture_output=True, text=True, timeout=300)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def stages(tmp_path: Path) -> dict[str, str]:
    lines = (tmp_path / "results" / "stages.txt").read_text().splitlines()
    return {line.split()[0]: line for line in lines if " rc=" in line or " skipped" in line}


def test_every_stage_parses_and_the_output_is_what_a_device_call_returns(tmp_path):
    proc, calls = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = stages(tmp_path)
    assert list(done) == ["gpu_tests", "throughput", "kernels", "attention_math", "gradient_buffer", "engine_modes",
                          "batch512"], done
    assert all(" rc=0 " in line for line in done.values()), done

    bench = [c for c in calls if c["argv"][:2] == ["-m", "benchmarks.throughput"]]
    main = bench[0]
    # stage 2: ViT-B LoMaR and MAE at every size, each at its best; the profile is the shipped LoMaR 224 step
    assert main["target"] == "lomar:224:compile:torch_autocast"
    for kind, variants in (("lomar", ("eager", "compile", "compile+kernels")), ("mae", ("eager", "compile", "compile-model"))):
        for size in (224, 384, 448):
            for v in variants:
                assert f"{kind}:{size}:{v}:torch_autocast" in main["plan"], (kind, size, v)
    # stage 4 times the explicit-logits path; stage 5 the engine modes and micro-batch 512
    math = next(c for c in bench if "attention_math" in c["argv"])
    assert math["env"]["LOMAR_ATTN_PATH"] == "math" and math["plan"] == ["lomar:224:compile:torch_autocast"]
    buffer = next(c for c in bench if "gradient_buffer" in c["argv"])
    assert buffer["plan"] == ["lomar:224:compile:torch_autocast"] and "--contiguous_gradients" in buffer["argv"]
    modes = next(c for c in bench if "engine_modes" in c["argv"])
    assert modes["plan"] == [f"lomar:224:compile:{m}" for m in ("torch_autocast", "bf16", "no_deepspeed")]
    # with the whole deadline left, each stage's own cap lets its first row start (a compile row needs 60 s)
    assert all(b["first_row_fits"] for b in bench), [(b["argv"][-8:], b["budget"]) for b in bench]
    tests = next(c for c in calls if c["argv"][:2] == ["-m", "pytest"])
    assert "gpu" in tests["argv"]

    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == sorted(["stages.txt", "environment.txt", "throughput.json", "kernels.json", "attention_math.json",
                          "gpu_check.tgz"]), out  # a device call hands back at most 8 files


def test_without_deepspeed_the_gpu_tests_and_kernels_still_run(tmp_path):
    proc, calls = run_check(tmp_path, STUB_NO_DEEPSPEED="1")
    assert proc.returncode == 1  # the check did not do all it should
    done = stages(tmp_path)
    assert " rc=0 " in done["gpu_tests"] and " rc=0 " in done["kernels"], done
    assert all(done[s].endswith("skipped: no deepspeed") for s in ("throughput", "attention_math", "gradient_buffer",
                                                                   "engine_modes", "batch512")), done
    assert not any(c["argv"][:2] == ["-m", "benchmarks.throughput"] for c in calls)


def test_throughput_args_replace_the_plan_for_both_models(tmp_path):
    """With THROUGHPUT_ARGS stage 2 runs the benchmark's defaults plus those flags: --variants then limits MAE too."""
    proc, calls = run_check(tmp_path, THROUGHPUT_ARGS="--variants eager --sizes 224")
    assert proc.returncode == 0, proc.stderr[-3000:]
    main = next(c for c in calls if c["argv"][:2] == ["-m", "benchmarks.throughput"])
    assert main["plan"] == ["lomar:224:eager:torch_autocast", "mae:224:eager:torch_autocast"]
    assert main["target"] == "lomar:224:eager:torch_autocast"  # the benchmark's own choice among its rows

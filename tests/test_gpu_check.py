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


ORDER = ["gpu_tests", "throughput", "attention_flex", "attention_mma", "irpe_aligned", "engine_modes", "attention_math",
         "gradient_buffer", "batch512", "combined", "kernels", "autotune"]


@pytest.fixture(scope="module")
def full_check(tmp_path_factory):
    """The whole check with the defaults, run once for the tests that read it: (its folder, process, calls)."""
    tmp_path = tmp_path_factory.mktemp("full")
    return (tmp_path, *run_check(tmp_path))


def test_every_stage_parses_and_the_output_is_what_a_device_call_returns(full_check):
    tmp_path, proc, calls = full_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = stages(tmp_path)
    assert list(done) == ORDER, done
    assert all(" rc=0 " in line for line in done.values()), done

    bench = [c for c in calls if c["argv"][:2] == ["-m", "benchmarks.throughput"]]
    main = bench[0]
    # the throughput stage: the shipped LoMaR step and both models' best (whole model compiled) at every size,
    # first; LoMaR's whole-model rows at 384 and 448 last; the profile is LoMaR 224 with the whole model compiled
    assert main["target"] == "lomar:224:compile-model:torch_autocast"
    assert main["plan"][:7] == [f"{r}:torch_autocast" for r in (
        "lomar:224:compile", "lomar:224:compile-model", "mae:224:compile-model", "lomar:384:compile",
        "mae:384:compile-model", "lomar:448:compile", "mae:448:compile-model")], main["plan"]
    assert main["plan"][7:] == [f"lomar:{r}:torch_autocast" for r in (
        "224:compile-model-cudagraphs", "384:compile-model", "448:compile-model")], main["plan"]
    modes = next(c for c in bench if "engine_modes" in c["argv"])
    assert modes["plan"] == [f"lomar:224:compile:{m}" for m in ("bf16", "no_deepspeed")]
    math = next(c for c in bench if "attention_math" in c["argv"])
    assert math["env"]["LOMAR_ATTN_PATH"] == "math" and math["plan"] == ["lomar:224:compile:torch_autocast"]
    flex = next(c for c in bench if "attention_flex" in c["argv"])
    assert flex["env"] == {"LOMAR_ATTN_PATH": "flex", "LOMAR_WA_KERNEL": None, "LOMAR_IRPE_PATH": None}
    assert flex["plan"] == [f"lomar:224:{v}:torch_autocast" for v in ("compile", "compile-model")]
    mma = next(c for c in bench if "attention_mma" in c["argv"])
    assert mma["env"] == {"LOMAR_ATTN_PATH": None, "LOMAR_WA_KERNEL": "mma", "LOMAR_IRPE_PATH": None}
    assert mma["plan"] == [f"lomar:224:{v}:torch_autocast" for v in ("compile+kernels", "compile-model+kernels")]
    aligned = next(c for c in bench if "irpe_aligned" in c["argv"])
    assert aligned["env"]["LOMAR_IRPE_PATH"] == "bmm_aligned" and aligned["plan"] == ["lomar:224:compile:torch_autocast"]
    assert all(c["env"]["LOMAR_IRPE_PATH"] is None for c in bench if c is not aligned)
    buffer = next(c for c in bench if "gradient_buffer" in c["argv"])
    assert buffer["plan"] == ["lomar:224:compile:torch_autocast"] and "--contiguous_gradients" in buffer["argv"]
    tuned = next(c for c in bench if "autotune" in c["argv"])
    assert tuned["plan"] == ["lomar:224:compile-autotune:torch_autocast"]
    big = next(c for c in bench if "batch512" in c["argv"])
    assert big["plan"] == ["lomar:224:compile:torch_autocast", "lomar:224:compile-model:torch_autocast"]
    # the stub's rates (gpu_check_stub.stub_rate): FlexAttention, the whole model compiled and micro-batch 512 win
    combined = next(c for c in bench if "combined" in c["argv"])
    assert combined["env"] == {"LOMAR_ATTN_PATH": "flex", "LOMAR_WA_KERNEL": None, "LOMAR_IRPE_PATH": None}
    assert combined["plan"] == ["lomar:224:compile-model:torch_autocast"]
    assert combined["argv"][combined["argv"].index("--lomar_batch") + 1] == "512"
    plan = json.loads((tmp_path / "results" / "throughput" / "combined_plan.json").read_text())
    assert plan["choice"] == {"attention": "flex", "irpe": "bmm", "scope": "model", "batch": 512}
    # with the whole deadline left, each stage's own cap lets its first row start
    assert all(b["first_row_fits"] for b in bench), [(b["argv"][-8:], b["budget"]) for b in bench]
    tests = next(c for c in calls if c["argv"][:2] == ["-m", "pytest"])
    assert "gpu" in tests["argv"]

    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == sorted(["stages.txt", "environment.txt", "throughput.json", "kernels.json", "attention_math.json",
                          "attention_flex.json", "attention_mma.json", "gpu_check.tgz"]), out  # a device call: 8 files at most


def test_kernel_cases_pick_the_kernel_benchmarks_cases_by_exact_name(tmp_path):
    """KERNEL_CASES narrows the kernel stage to the cases named, commas between names that hold spaces and
    brackets; each reaches the benchmark as one --cases argument (its parser rejects a name it does not know)."""
    names = ["window_attention_fwd_bwd", "window_attention_fwd_bwd[mma]", "window_attention_fwd[mma 3 blocks]",
             "irpe_attention[compiled aligned bmm path]", "window_attention_fwd_bwd[flex path 64]"]
    proc, calls = run_check(tmp_path, STAGES="kernels", KERNEL_CASES=",".join(names))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = next(c for c in calls if c["argv"][:2] == ["-m", "benchmarks.kernels"])
    assert kernels["cases"] == names, kernels["argv"]


def test_stages_runs_only_the_stages_named_and_gpu_tests_narrows_the_tests(tmp_path):
    """A second call on the same machine runs what the first left (STAGES); GPU_TESTS picks the tests. A stage
    name that does not exist stops the check before anything runs."""
    ids = ["tests/test_randaugment.py::test_cuda_matches_cpu_without_host_syncs",
           "tests/test_window_attention.py::test_gpu_math_path_at_vit_b_shapes[True]"]
    proc, calls = run_check(tmp_path, STAGES="kernels engine_modes gpu_tests", GPU_TESTS=" ".join(ids))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(stages(tmp_path)) == ["gpu_tests", "engine_modes", "kernels"]
    tests = next(c for c in calls if c["argv"][:2] == ["-m", "pytest"])
    assert tests["argv"][2:4] == ids, tests["argv"]  # each id its own argument
    assert not any(a.endswith("test_kernels.py") for a in tests["argv"])
    (tmp_path / "bad").mkdir()
    proc, calls = run_check(tmp_path / "bad", STAGES="throughput enigne_modes")
    assert proc.returncode == 2 and "unknown stage 'enigne_modes'" in proc.stdout, proc.stdout
    assert not any(c["argv"][:1] == ["-m"] for c in calls)


def test_a_stage_not_run_keeps_no_time_back(tmp_path, full_check):
    """Each stage's limit leaves time for the stages after it; a stage that does not run (left out of STAGES,
    --no-throughput) keeps none: the GPU tests alone get their whole cap, not what the full check leaves them."""
    folders = {"all": full_check[0]}
    for name, args, env in (("only", (), {"STAGES": "gpu_tests"}), ("no_tp", ("--no-throughput",), {})):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        proc, _ = run_check(folders[name], *args, **env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    limits = {name: {k: int(v.rsplit("limit=", 1)[1]) for k, v in stages(folder).items()}
              for name, folder in folders.items()}
    assert limits["only"] == {"gpu_tests": 180} and limits["no_tp"]["gpu_tests"] == 180, limits
    assert limits["all"]["gpu_tests"] <= 540 - 480, limits  # the full check: 480 s kept for the stages after it


def test_stages_may_be_separated_by_any_whitespace_and_must_not_contradict_no_throughput(tmp_path):
    """STAGES from a file or a heredoc holds tabs or newlines: those stages run (they were checked as names,
    then matched on spaces, and ran nothing). A DeepSpeed stage named with --no-throughput is an error, not a
    check that runs nothing and exits 0."""
    (tmp_path / "ws").mkdir()
    proc, _ = run_check(tmp_path / "ws", STAGES="throughput\tkernels\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(stages(tmp_path / "ws")) == ["throughput", "kernels"]
    (tmp_path / "no_tp").mkdir()
    proc, calls = run_check(tmp_path / "no_tp", "--no-throughput", STAGES="gpu_tests engine_modes")
    assert proc.returncode == 2 and "'engine_modes' is one of the stages --no-throughput skips" in proc.stdout, \
        proc.stdout
    assert not any(c["argv"][:1] == ["-m"] for c in calls)


def test_without_deepspeed_the_gpu_tests_and_kernels_still_run(tmp_path):
    proc, calls = run_check(tmp_path, STUB_NO_DEEPSPEED="1")
    assert proc.returncode == 1  # the check did not do all it should
    done = stages(tmp_path)
    assert " rc=0 " in done["gpu_tests"] and " rc=0 " in done["kernels"], done
    assert all(done[s].endswith("skipped: no deepspeed") for s in ("throughput", "engine_modes", "attention_math",
                                                                   "attention_mma", "irpe_aligned", "gradient_buffer",
                                                                   "batch512", "autotune")), done
    assert not any(c["argv"][:2] == ["-m", "benchmarks.throughput"] for c in calls)


def test_throughput_args_replace_the_plan_for_both_models(tmp_path):
    """With THROUGHPUT_ARGS stage 2 runs the benchmark's defaults plus those flags: --variants then limits MAE too."""
    proc, calls = run_check(tmp_path, THROUGHPUT_ARGS="--variants eager --sizes 224", STAGES="throughput")
    assert proc.returncode == 0, proc.stderr[-3000:]
    main = next(c for c in calls if c["argv"][:2] == ["-m", "benchmarks.throughput"])
    assert main["plan"] == ["lomar:224:eager:torch_autocast", "mae:224:eager:torch_autocast"]
    assert main["target"] == "lomar:224:eager:torch_autocast"  # the benchmark's own choice among its rows

"""The main job end to end on one machine: data, pretraining, resume after a kill, fine-tuning, evaluation, k-NN.

    bash benchmarks/gpu_e2e.sh                      # on a GPU host: installs the kit, then runs this
    python -m benchmarks.e2e --out results/e2e      # the same stages in this environment
    python -m benchmarks.e2e --cpu --out /tmp/e2e   # scaled down for a CPU: tiny models, DS_ACCELERATOR=cpu

Stages, in order (each one a set of real commands with its own time limit; a stage whose input is missing
is skipped and says why, the others still run):

====================  ========================================================================================
environment           GPU, driver, CPU, versions, git commit, the kit install report
data                  ``data_prep.make_synthetic`` (labelled photo-like JPEGs) then ``data_prep.write_beton``
                      -> train.beton, val.beton; generator and writer images/sec
pretrain              ``deepspeed --num_gpus 1 lomar_fast/pretrain.py`` for a fixed number of steps; images/sec
                      per epoch and in the steady state (from log.jsonl), then ``lomar_fast.export``
throughput            ``benchmarks.throughput``: the same model and DeepSpeed config on synthetic device batches
loader                ``benchmarks.loader``: the pretraining pipeline alone at the same workers, size, batch and device
resume                the pretraining command again, SIGKILLed (the whole process group) in the middle of
                      epoch 1, then ``--resume auto``: the replayed steps' losses must equal the killed run's,
                      and the per-epoch losses the uninterrupted run's
finetune              ``deepspeed --num_gpus 1 lomar_fast/finetune.py`` with ZeRO-3 (bf16 on a GPU) from the export
eval                  ``lomar_fast.finetune --eval`` of checkpoint-best.pth: must agree with the run's own val top-1
knn                   ``lomar_fast.knn`` of the pretraining export
====================  ========================================================================================

Output under ``--out``: ``e2e.json`` (all stages so far and the analysis; rewritten after every stage, so a
run that is stopped keeps what finished), ``e2e/<stage>.json``, ``e2e/logs/<stage>-<step>.log``
(each command's output), ``e2e/throughput/synthetic.*`` and ``e2e/loader_benchmark.json`` (the benchmarks' own
files). The analysis compares the end-to-end images/sec with the synthetic-batch step (``ratio``; both as means
over steps), reports the time the host blocked on the loader and the time the GPU sat idle before each step over the
same steady windows (the trainer's ``data_wait_s`` and ``gpu_idle_before_step_s``), and the step-time gap end to end
minus on device batches; a stage that failed its checks contributes no figure. Exit status 0 when every stage
passed, 1 otherwise.

``e2e.json`` (schema ``lomar_fast.e2e/1``)::

    schema, mode ("gpu" | "cpu"), started (UTC), elapsed_s, status ("ok" | "failed" | "running")
    plan       the sizes used: images, classes, model, geometry, batch, epochs, steps, DeepSpeed configs,
               deadline_s, timeouts per stage, replay_rtol, epoch_rtol
    stages     {name: {stage, started, status ("ok" | "failed" | "timeout" | "skipped"), reason, limit_s, seconds,
                       commands: [{name, cmd, rc, seconds, timed_out, killed, log}], results, checks: {name: bool}}}
    running    while a stage runs: {stage, commands, results}
    analysis   e2e_images_per_sec, synthetic_images_per_sec, loader_images_per_sec, batch_size, ratio,
               step_ms_e2e, step_ms_synthetic (from its mean step, as the windows are means), step_ms_gap,
               data_wait_fraction_estimated, data_wait_ms_per_step_measured (the host blocked on the loader),
               gpu_idle_before_step_ms_measured (CUDA events), loader_headroom; from passed stages only

``results`` of each stage::

    environment  versions {python, torch, cuda, cuda_available, gpu {name, memory_gib, sm, count}, deepspeed, ffcv,
                 numba, numpy, cv2, timm, cupy, triton, PIL, pydantic, distributions {dist: version}}, nvidia_smi [],
                 git_commit ($E2E_COMMIT without git), git_dirty, host, os, cpu, cores, memory_gib, kit_install {}
    data         train, val, train_images, val_images, writer_images_per_sec, writer_val_images_per_sec,
                 train_beton_mib, generator {images, images_per_sec, mean_kb, mean_width, mean_height, workers, seconds}
    pretrain     compile (the --compile setting), compiled (what it decided), command_seconds,
                 seconds_to_first_log, epochs [{epoch, loss, images_per_sec, epoch_time}], images_per_sec_steady
                 (median step window after epoch 0), step_windows [{epoch, step, images_per_sec, loss}], summary
                 (the run's summary.json), export
    throughput   model, size, variant, batch_size, images_per_sec, step_ms_median, mfu, peak_mem_gib,
                 host_syncs_in_step, model_kwargs
    loader       images_per_sec, images_per_sec_per_core, workers, size, warmup_seconds, decoded_by_region,
                 images_per_sec_whole_decode, images_per_sec_static_schedule, decode_only_images_per_sec,
                 region_decode_only_images_per_sec
    resume       reference, kill_signal, kill_at_step, last_logged_step, checkpoint_at_kill, replayed_steps [{step,
                 killed, resumed, rel_diff}], replay_rtol, epochs {epochs [{epoch, straight, resumed, rel_diff}],
                 max_rel_diff, rtol, equal}
    finetune     init, zero_stage, dtype, loss, val_top1, val_top5, val_loss, val_n, images_per_sec, epoch_time, step
    eval         val_top1, val_top5, val_loss, val_n, finetune_val_top1
    knn          top1, top5, n_train, n_val, seconds, chance
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import pack_results, write_json

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "lomar_fast.e2e/1"
# the loader benchmark (the pipeline alone) last: under the deadline, the acceptance stages run first
STAGES = ("environment", "data", "pretrain", "throughput", "resume", "finetune", "eval", "knn", "loader")
RESERVE_S = 10.0  # a stage does not start with less than this left before the deadline


@dataclass
class Plan:
    """Sizes of one end-to-end run. ``gpu_plan`` fits about 9 minutes on one H100/H200 with 16 cores."""

    mode: str
    n_train: int
    n_val: int
    classes: int
    workers: int
    model: str
    input_size: int
    window_size: int
    num_window: int
    batch_size: int
    epochs: int
    steps: int                 # --max_steps_per_epoch
    log_every: int
    ds_config: str
    arch: str                  # benchmarks.throughput --arch
    ft_model: str
    ft_batch_size: int
    ft_steps: int
    ft_ds_config: str
    ft_zero_stage: int | None
    knn_batch_size: int
    throughput_steps: int
    throughput_warmup: int
    compile: str = "auto"      # --compile of the pretraining runs (auto: compiled blocks on a GPU with ZeRO-2)
    kernels: str = "auto"      # --kernels of the pretraining runs; the synthetic step runs the same kernels
    deadline_s: float | None = None
    timeouts: dict = field(default_factory=dict)
    # relative tolerances: a replayed step against the killed run's same step, and epoch means resumed vs
    # uninterrupted (on a GPU, backward kernels with atomics make runs differ in the last bits, which grow)
    replay_rtol: float = 1e-6
    epoch_rtol: float = 1e-4


def gpu_plan(cores: int) -> Plan:
    return Plan(mode="gpu", n_train=20000, n_val=1000, classes=10, workers=cores, model="lomar_vit_base_patch16",
                input_size=224, window_size=7, num_window=4, batch_size=256, epochs=3, steps=30, log_every=10,
                ds_config="ds_configs/zero2.json", arch="base", ft_model="vit_base_patch16", ft_batch_size=128,
                ft_steps=30, ft_ds_config="ds_configs/zero3.json", ft_zero_stage=None, knn_batch_size=256,
                throughput_steps=20, throughput_warmup=10, deadline_s=520.0,
                timeouts={"environment": 60, "data": 150, "pretrain": 180, "throughput": 120, "loader": 90,
                          "resume": 240, "finetune": 150, "eval": 90, "knn": 120},
                replay_rtol=1e-4, epoch_rtol=5e-3)


def cpu_plan(cores: int) -> Plan:
    return Plan(mode="cpu", n_train=256, n_val=64, classes=4, workers=max(1, min(cores, 2)),
                model="lomar_vit_tiny_patch16", input_size=64, window_size=2, num_window=3, batch_size=16, epochs=3,
                steps=4, log_every=2, ds_config="ds_configs/cpu.json", arch="tiny", ft_model="vit_tiny_patch16",
                ft_batch_size=16, ft_steps=4, ft_ds_config="ds_configs/cpu.json", ft_zero_stage=3,
                knn_batch_size=32, throughput_steps=3, throughput_warmup=1, deadline_s=None,
                timeouts={"environment": 120, "data": 300, "pretrain": 400, "throughput": 300, "loader": 300,
                          "resume": 900, "finetune": 400, "eval": 300, "knn": 300})


# ------------------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (the launcher and everything it started, unless they left it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(d.name))
    return pids


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to the process group of ``proc`` and to every process left in its session."""
    hit = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, sig)
            hit.append(pid)
        except ProcessLookupError:
            pass
    return hit


@dataclass
class Cmd:
    name: str
    argv: list[str]
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    killed: bool = False
    log: str = ""
    tail: str = ""

    def record(self) -> dict:
        return {"name": self.name, "cmd": " ".join(self.argv), "rc": self.rc, "seconds": round(self.seconds, 2),
                "timed_out": self.timed_out, "killed": self.killed, "log": self.log}


class StageFailed(RuntimeError):
    """A stage's check did not hold or one of its commands failed."""


class Stage:
    """One stage: runs commands under the stage's remaining time, collects results and checks."""

    def __init__(self, name: str, run: "Run", limit_s: float):
        self.name, self.run, self.t0 = name, run, time.monotonic()
        self.end = self.t0 + limit_s
        self.commands: list[Cmd] = []
        self.results: dict[str, Any] = {}
        self.checks: dict[str, bool] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def cmd(self, name: str, argv: Sequence[str], env: dict | None = None, check: bool = True,
            watch: Callable[[], bool] | None = None, poll_s: float = 0.05) -> Cmd:
        """Run ``argv`` in its own session with output to a log file; stop it (SIGTERM, then SIGKILL to the
        whole session) when the stage's time is up. ``watch``: called every ``poll_s``; when it returns
        True the command is killed with SIGKILL at once (the resume test's simulated crash)."""
        c = Cmd(name, [str(a) for a in argv])
        log = self.run.logs / f"{self.name}-{name}.log"
        c.log = str(log.relative_to(self.run.out))
        self.commands.append(c)
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(c.argv)}\n")
            f.flush()
            proc = subprocess.Popen(c.argv, cwd=REPO, env=env or self.run.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            while proc.poll() is None:
                if watch is not None and watch():
                    kill_session(proc, signal.SIGKILL)
                    c.killed = True
                    proc.wait()
                    break
                if self.left() <= 0:
                    c.timed_out = True
                    kill_session(proc, signal.SIGTERM)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                    kill_session(proc, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(poll_s if watch is not None else 0.2)
            kill_session(proc, signal.SIGKILL)  # nothing of it may outlive the command (loader workers)
        c.rc, c.seconds = proc.returncode, time.monotonic() - t0
        c.tail = log.read_text(errors="replace")[-4000:]
        self.run.save()
        if c.timed_out:
            raise StageFailed(f"{name}: out of time after {c.seconds:.0f} s (stage limit); see {c.log}")
        if check and not c.killed and c.rc != 0:
            raise StageFailed(f"{name}: exit {c.rc}; see {c.log}:\n{c.tail[-1500:]}")
        return c

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks[name] = bool(ok)
        if not ok:
            raise StageFailed(f"check {name} failed" + (f": {detail}" if detail else ""))


class Run:
    """The whole run: plan, environment, stages, and the JSON written after each of them."""

    def __init__(self, plan: Plan, out: Path, work: Path, python: str, t_start: float, pack_to: Path | None = None):
        self.plan, self.out, self.work, self.python = plan, out, work, python
        self.pack_to = pack_to  # where e2e.json and an archive of ``out`` go after every stage (a device call's $OUT)
        self.logs = out / "e2e" / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t_start = t_start  # wall clock (time.time()) at which the deadline starts counting
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.stages: dict[str, dict] = {}
        self.ctx: dict[str, Any] = {}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(path)
        if plan.mode == "cpu":
            env.update(DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        self.env = env
        self.current: Stage | None = None

    def remaining(self) -> float | None:
        if self.plan.deadline_s is None:
            return None
        return self.plan.deadline_s - (time.time() - self.t_start)

    def save(self) -> None:
        doc = {"schema": SCHEMA, "mode": self.plan.mode, "started": self.started,
               "elapsed_s": round(time.time() - self.t_start, 1), "plan": asdict(self.plan),
               "stages": dict(self.stages), "analysis": analysis(self.stages, self.plan)}
        if self.current is not None and self.current.name not in self.stages:
            doc["running"] = {"stage": self.current.name, "commands": [c.record() for c in self.current.commands],
                              "results": self.current.results}
        doc["status"] = overall(self.stages)
        write_json(self.out / "e2e.json", doc)
        if self.pack_to is not None:
            pack_results(self.out, self.pack_to, "e2e.tgz", ["e2e.json"], skip=[self.work])

    def stage(self, name: str, fn: Callable[[Stage], None], needs: Sequence[str] = ()) -> bool:
        t0 = time.monotonic()
        record: dict[str, Any] = {"stage": name, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        missing = [n for n in needs if self.stages.get(n, {}).get("status") != "ok"]
        left = self.remaining()
        limit = float(self.plan.timeouts.get(name, 300))
        if missing:
            record.update(status="skipped", reason=f"needs {', '.join(missing)}, which did not pass")
        elif left is not None and left < RESERVE_S:
            record.update(status="skipped", reason=f"no time left ({left:.0f} s before the {self.plan.deadline_s:.0f} s "
                                                   f"deadline)")
        else:
            if left is not None:
                limit = min(limit, left - RESERVE_S / 2)
            st = Stage(name, self, limit)
            self.current = st
            record["limit_s"] = round(limit, 1)
            try:
                fn(st)
                record["status"] = "ok"
            except StageFailed as e:
                record.update(status="timeout" if "out of time" in str(e) else "failed", reason=str(e))
            except Exception as e:  # a bug or an unexpected output: recorded, the next stages still run
                record.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            record.update(commands=[c.record() for c in st.commands], results=st.results, checks=st.checks)
            self.current = None
        record["seconds"] = round(time.monotonic() - t0, 2)
        self.stages[name] = record
        write_json(self.out / "e2e" / f"{name}.json", record)
        self.save()
        print(f"[e2e] {name}: {record['status']} ({record['seconds']:.0f} s)"
              + (f" - {record.get('reason', '').splitlines()[0]}" if record["status"] != "ok" else ""), flush=True)
        return record["status"] == "ok"


def overall(stages: dict[str, dict]) -> str:
    if not stages:
        return "running"
    return "ok" if all(s.get("status") == "ok" for s in stages.values()) else "failed"


# ------------------------------------------------------------------------------------------------ log reading
def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by SIGKILL
                pass
    return out


def epoch_losses(records: list[dict]) -> dict[int, float]:
    """{epoch: mean loss}, the latest record of each epoch (a resumed run appends to the same log)."""
    return {int(r["epoch"]): float(r["loss"]) for r in records if r.get("kind") == "epoch"}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare_epochs(resumed: dict[int, float], straight: dict[int, float], rtol: float, from_epoch: int = 0) -> dict:
    """Per-epoch losses of the resumed run against the uninterrupted one, from ``from_epoch`` (the first epoch the
    resumed run trained) on."""
    rows = [{"epoch": e, "straight": straight[e], "resumed": resumed.get(e),
             "rel_diff": None if e not in resumed else rel_diff(straight[e], resumed[e])}
            for e in sorted(straight) if e >= from_epoch]
    diffs = [r["rel_diff"] for r in rows if r["rel_diff"] is not None]
    ok = bool(rows) and all(r["rel_diff"] is not None and r["rel_diff"] <= rtol for r in rows)
    return {"epochs": rows, "max_rel_diff": max(diffs) if diffs else None, "rtol": rtol, "equal": ok}


def replayed_steps(records: list[dict]) -> list[dict]:
    """Steps logged twice in one log.jsonl: once by the killed run, again by the resumed run."""
    seen: dict[int, float] = {}
    pairs = []
    for r in records:
        if r.get("kind") != "steps":
            continue
        s = int(r["step"])
        if s in seen:
            pairs.append({"step": s, "killed": seen[s], "resumed": float(r["loss"]),
                          "rel_diff": rel_diff(seen[s], float(r["loss"]))})
        else:
            seen[s] = float(r["loss"])
    return pairs


def steady_images_per_sec(records: list[dict]) -> float | None:
    """Median images/sec of the steady windows (:func:`steady_windows`)."""
    rates = [r["images_per_sec"] for r in steady_windows(records)]
    return float(statistics.median(rates)) if rates else None


def steady_windows(records: list[dict]) -> list[dict]:
    """The step-log windows after the first epoch (all but the first window when there is only one epoch): the
    windows both the steady rate and the measured waits are read from."""
    steps = [r for r in records if r.get("kind") == "steps"]
    later = [r for r in steps if int(r["epoch"]) > 0]
    return later or steps[1:]


def measured_wait_ms(recs: list[dict], key: str) -> float | None:
    """Median over the steady windows of a per-step wait the trainer logs (``data_wait_s``: the host blocked on
    the loader; ``gpu_idle_before_step_s``: the device idle between one step's work and the next's), in ms."""
    waits = [r[key] for r in steady_windows(recs) if r.get(key) is not None]
    return round(1e3 * float(statistics.median(waits)), 3) if waits else None


def analysis(stages: dict[str, dict], plan: Plan) -> dict:
    """End-to-end vs synthetic-batch step, loader headroom and the data wait per step, from what ran."""
    def ok_results(name: str) -> dict:  # a stage's figures count only when the stage passed its checks
        st = stages.get(name, {})
        return st.get("results", {}) if st.get("status") == "ok" else {}

    pre, thr, ld = ok_results("pretrain"), ok_results("throughput"), ok_results("loader")
    e2e, loader = pre.get("images_per_sec_steady"), ld.get("images_per_sec")
    # like for like: the pretraining figure is images over the time of whole log windows (a mean over steps), so
    # the synthetic one is taken from its mean step, not its median one
    synth_ms = thr.get("step_ms_mean") or thr.get("step_ms_median")
    synth = 1e3 * plan.batch_size / synth_ms if synth_ms else None
    out: dict[str, Any] = {"e2e_images_per_sec": e2e, "synthetic_images_per_sec": synth and round(synth, 2),
                           "loader_images_per_sec": loader, "batch_size": plan.batch_size}
    if e2e and synth:
        step_e2e, step_synth = 1e3 * plan.batch_size / e2e, 1e3 * plan.batch_size / synth
        out.update(ratio=round(e2e / synth, 4), step_ms_e2e=round(step_e2e, 2), step_ms_synthetic=round(step_synth, 2),
                   step_ms_gap=round(step_e2e - step_synth, 2),
                   data_wait_fraction_estimated=round(1 - step_synth / step_e2e, 4))
    for key in ("data_wait_ms_per_step", "gpu_idle_before_step_ms"):
        if pre.get(key) is not None:
            out[key + "_measured"] = pre[key]
    if e2e and loader:
        # the loader alone decodes to host memory; the copy to the GPU the training loop adds is not in it
        out["loader_headroom"] = round(loader / e2e, 3)
    return out


# ------------------------------------------------------------------------------------------------ stages
def python_m(run: Run, module: str, *args: Any) -> list[str]:
    return [run.python, "-m", module, *[str(a) for a in args]]


def deepspeed_launch(run: Run, script: str, *args: Any) -> list[str]:
    """``deepspeed --num_gpus 1 <script> ...`` through the launcher module of the running Python (the kit
    installs deepspeed into a --target folder, whose console script is not on PATH)."""
    return [run.python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            script, *[str(a) for a in args]]


ENV_PROBE = r"""
import importlib, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "deepspeed", "ffcv", "numba", "numpy", "cv2", "timm", "cupy", "triton", "PIL", "pydantic"):
    try:
        m = importlib.import_module(name)
        out[name] = getattr(m, "__version__", "present")
    except Exception as e:
        out[name] = f"missing: {type(e).__name__}: {e}"[:200]
try:
    import torch
    out["cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sm": f"{p.major}.{p.minor}",
                      "count": torch.cuda.device_count()}
except Exception as e:
    out["cuda_error"] = str(e)[:300]
from importlib import metadata
dists = {}
for d in ("torch", "deepspeed", "ffcv", "numba", "numpy", "opencv-python-headless", "opencv-python", "timm",
          "cupy-cuda13x", "cupy-cuda12x", "triton", "pillow", "pydantic"):
    try:
        dists[d] = metadata.version(d)
    except metadata.PackageNotFoundError:
        pass
out["distributions"] = dists
print(json.dumps(out))
"""


def stage_environment(st: Stage) -> None:
    run = st.run
    c = st.cmd("versions", [run.python, "-c", ENV_PROBE])
    st.results["versions"] = json.loads(c.tail.strip().splitlines()[-1])
    if shutil.which("nvidia-smi"):
        c = st.cmd("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], check=False)
        st.results["nvidia_smi"] = [l.strip() for l in c.tail.splitlines()[1:] if l.strip()]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    st.results["git_commit"] = git.stdout.strip() if git.returncode == 0 else os.environ.get("E2E_COMMIT", "unknown")
    st.results["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    st.results.update(host=socket.gethostname(), os=platform.platform(), cpu=cpu,
                      cores=len(os.sched_getaffinity(0)), memory_gib=_mem_gib(), date=run.started)
    kit = os.environ.get("E2E_KIT_REPORT")
    if kit and Path(kit).is_file():
        st.results["kit_install"] = json.loads(Path(kit).read_text())
    if run.plan.mode == "gpu":
        v = st.results["versions"]
        st.check("cuda", bool(v.get("cuda_available")), "torch sees no GPU; run with --cpu for the CPU mode")
        for name in ("deepspeed", "ffcv"):
            st.check(name, not str(v.get(name, "")).startswith("missing"), f"{name} does not import: {v.get(name)}")


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def stage_data(st: Stage) -> None:
    run, p = st.run, st.run.plan
    folder, data = run.work / "imagefolder", run.work / "data"
    stamp = data / "e2e_plan.json"
    want = {"n_train": p.n_train, "n_val": p.n_val, "classes": p.classes, "seed": 0}
    if run.ctx.get("reuse_data") and stamp.is_file() and json.loads(stamp.read_text()) == want \
            and (data / "train.beton").is_file() and (data / "val.beton").is_file():
        st.results["reused"] = str(data)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        st.cmd("generate", python_m(run, "data_prep.make_synthetic", "--out", folder, "--n", p.n_train, "--val",
                                    p.n_val, "--classes", p.classes, "--workers", p.workers, "--quiet"))
        st.cmd("write_beton", python_m(run, "data_prep.write_beton", "--src", folder, "--out", data, "--splits",
                                       "train", "val", "--workers", p.workers, "--force"))
        stamp.write_text(json.dumps(want) + "\n")
        shutil.copy(folder / "synthetic.json", data / "synthetic.json")
        shutil.rmtree(folder, ignore_errors=True)  # the .beton files hold the images now
    gen = data / "synthetic.json"
    reports = {s: json.loads((data / f"{s}.report.json").read_text()) for s in ("train", "val")}
    st.results.update(
        train=str(data / "train.beton"), val=str(data / "val.beton"),
        train_images=reports["train"].get("num_written"), val_images=reports["val"].get("num_written"),
        writer_images_per_sec=reports["train"].get("images_per_sec"),
        writer_val_images_per_sec=reports["val"].get("images_per_sec"),
        train_beton_mib=round((data / "train.beton").stat().st_size / 2**20, 1))
    if gen.is_file():
        g = json.loads(gen.read_text())
        st.results["generator"] = {k: g.get(k) for k in ("images", "images_per_sec", "mean_kb", "mean_width",
                                                        "mean_height", "workers", "seconds")}
    st.check("all images written", reports["train"].get("num_written") == p.n_train
             and reports["val"].get("num_written") == p.n_val, json.dumps({s: r.get("num_written") for s, r in reports.items()}))
    run.ctx["train"], run.ctx["val"] = data / "train.beton", data / "val.beton"


def pretrain_args(run: Run, out: Path, save_every: int, log_every: int, extra: Sequence[str] = ()) -> list[str]:
    p = run.plan
    args = ["--deepspeed_config", p.ds_config, "--data_path", run.ctx["train"], "--model", p.model,
            "--input_size", p.input_size, "--window_size", p.window_size, "--num_window", p.num_window,
            "--batch_size", p.batch_size, "--num_workers", p.workers, "--epochs", p.epochs, "--warmup_epochs", 1,
            "--max_steps_per_epoch", p.steps, "--save_every", save_every, "--log_every", log_every,
            "--output_dir", out, "--seed", 0, "--kernels", p.kernels, *extra]
    args += ["--compile", p.compile]
    return deepspeed_launch(run, "lomar_fast/pretrain.py", *args)


def pretrain_compiles(p: Plan) -> bool:
    """Whether the pretraining runs compile (``--compile`` as lomar_fast.trainer decides it): the synthetic
    step must run the same way."""
    from lomar_fast.compilation import compile_decision
    from lomar_fast.ds_config import load_ds_config, zero_stage_of

    stage = zero_stage_of(load_ds_config(Path(REPO, p.ds_config)))
    return compile_decision(p.compile, "cuda" if p.mode == "gpu" else "cpu", stage)[0]


def stage_pretrain(st: Stage) -> None:
    run, p = st.run, st.run.plan
    out = run.work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    c = st.cmd("train", pretrain_args(run, out, save_every=p.epochs, log_every=p.log_every))
    recs = read_jsonl(out / "log.jsonl")
    steps = [r for r in recs if r.get("kind") == "steps"]
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    st.results.update(
        compile=p.compile, compiled=pretrain_compiles(p), command_seconds=round(c.seconds, 1),
        seconds_to_first_log=round(steps[0]["time"] - t0, 1) if steps else None,
        epochs=[{k: e.get(k) for k in ("epoch", "loss", "images_per_sec", "epoch_time")} for e in epochs],
        images_per_sec_steady=steady_images_per_sec(recs),
        data_wait_ms_per_step=measured_wait_ms(recs, "data_wait_s"),
        gpu_idle_before_step_ms=measured_wait_ms(recs, "gpu_idle_before_step_s"),
        step_windows=[{k: s.get(k) for k in ("epoch", "step", "images_per_sec", "loss")} for s in steps])
    summary = out / "summary.json"
    if summary.is_file():
        st.results["summary"] = {k: v for k, v in json.loads(summary.read_text()).items() if k != "config"}
    st.check("all epochs logged", [e["epoch"] for e in epochs] == list(range(p.epochs)))
    st.check("finite losses", all(isinstance(s.get("loss"), float) and s["loss"] == s["loss"] for s in steps))
    run.ctx["pretrain_dir"] = out
    model = run.work / "model.pth"
    st.cmd("export", python_m(run, "lomar_fast.export", "--checkpoint", out, "--out", model))
    run.ctx["model_pth"] = model
    st.results["export"] = str(model)


def stage_throughput(st: Stage) -> None:
    run, p = st.run, st.run.plan
    out = run.out / "e2e" / "throughput"
    args = ["--models", "lomar", "--arch", p.arch, "--sizes", p.input_size,
            "--variants", ("compile" if pretrain_compiles(p) else "eager") + ("+kernels" if p.kernels == "on" else ""),
            *(["--kernel_mode", p.kernels] if p.kernels != "on" else []),
            "--batch_size", p.batch_size,
            "--steps", p.throughput_steps, "--warmup", p.throughput_warmup, "--ds_config", p.ds_config,
            "--out", out, "--name", "synthetic", "--device", "cuda" if p.mode == "gpu" else "cpu"]
    if p.mode == "cpu":
        args += ["--tiny", "--matmul_size", 256]
    st.cmd("synthetic", python_m(run, "benchmarks.throughput", *args))
    doc = json.loads((out / "synthetic.json").read_text())
    res = [r for r in doc.get("results", []) if r.get("kind") == "lomar"]
    st.check("one result", len(res) == 1 and res[0].get("status") == "ok", json.dumps(res)[:500])
    r = res[0]
    st.results.update({k: r.get(k) for k in ("model", "size", "variant", "batch_size", "images_per_sec",
                                              "step_ms_median", "step_ms_mean", "mfu", "peak_mem_gib",
                                              "host_syncs_in_step", "model_kwargs", "engine_mode", "kernels")})
    kw = r.get("model_kwargs", {})
    geometry = (kw.get("window_size", 7), kw.get("num_window", 4))  # the model's defaults when not passed
    st.check("same step as the pretraining runs", geometry == (p.window_size, p.num_window)
             and r.get("batch_size") == p.batch_size and r.get("size") == p.input_size
             and r.get("model") == p.model,
             f"synthetic {r.get('model')} {r.get('size')} px, batch {r.get('batch_size')}, windows {geometry} vs "
             f"pretraining {p.model} {p.input_size} px, batch {p.batch_size}, windows ({p.window_size}, {p.num_window})")


def stage_loader(st: Stage) -> None:
    run, p = st.run, st.run.plan
    out = run.out / "e2e" / "loader_benchmark.json"
    # to the device the pretraining run feeds (on a GPU: the pinned buffers and the copy), the loaders' defaults
    st.cmd("loader", python_m(run, "benchmarks.loader", "--data", run.ctx["train"], "--sizes", p.input_size,
                              "--workers", p.workers, "--batch-size", p.batch_size, "--epochs", 1,
                              "--device", "cuda" if p.mode == "gpu" else "cpu", "--out", out))
    doc = json.loads(out.read_text())
    # the loader's defaults (each crop's region, the balanced schedule) first, then each changed alone
    r = doc["results"][0]
    whole = next((x for x in doc["results"] if x.get("region_decode") is False and x.get("schedule") == r.get(
        "schedule")), None)
    static = next((x for x in doc["results"] if x.get("region_decode") and x.get("schedule") == "static"), None)
    st.results.update(images_per_sec=r["images_per_sec"], images_per_sec_per_core=r["images_per_sec_per_core"],
                      workers=r["workers"], size=r["size"], warmup_seconds=r["warmup_seconds"],
                      decoded_by_region=r.get("decoded_by_region"),
                      images_per_sec_whole_decode=whole and whole["images_per_sec"],
                      images_per_sec_static_schedule=static and static["images_per_sec"],
                      decode_only_images_per_sec=doc.get("decode_only", {}).get("images_per_sec"),
                      region_decode_only_images_per_sec=doc.get("decode_only", {}).get("region", {}).get(
                          "images_per_sec"))


def stage_resume(st: Stage) -> None:
    run, p = st.run, st.run.plan
    straight = run.ctx.get("pretrain_dir")
    if straight is None or len(epoch_losses(read_jsonl(straight / "log.jsonl"))) != p.epochs:
        straight = run.work / "resume_reference"
        shutil.rmtree(straight, ignore_errors=True)
        st.cmd("reference", pretrain_args(run, straight, save_every=p.epochs, log_every=p.log_every))
        st.results["reference"] = "own uninterrupted run"
    else:
        st.results["reference"] = "the pretrain stage's run"
    out = run.work / "resume"
    shutil.rmtree(out, ignore_errors=True)
    log = out / "log.jsonl"
    kill_at = p.steps + max(1, p.steps // 3)  # a third into epoch 1 (epoch 0's checkpoint is on disk by then)

    def crossed() -> bool:
        return any(r.get("kind") == "steps" and int(r["step"]) >= kill_at for r in read_jsonl(log))

    c = st.cmd("killed", pretrain_args(run, out, save_every=1, log_every=1), watch=crossed, poll_s=0.02)
    st.check("killed", c.killed, f"the run ended (exit {c.rc}) before step {kill_at}")
    recs = read_jsonl(log)
    last_step = max((int(r["step"]) for r in recs if r.get("kind") == "steps"), default=0)
    latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
    st.results.update(kill_signal="SIGKILL to the launcher's whole session", kill_at_step=kill_at,
                      last_logged_step=last_step, checkpoint_at_kill=latest)
    st.check("mid-epoch", latest == "epoch0000" and p.steps < last_step < 2 * p.steps,
             f"latest={latest}, last logged step {last_step}, epoch 1 is steps {p.steps + 1}..{2 * p.steps}")
    c = st.cmd("resumed", pretrain_args(run, out, save_every=1, log_every=1, extra=["--resume", "auto"]))
    resumed_line = re.search(r"resumed from \S+ at epoch (\d+) step (\d+)", Path(run.out / c.log).read_text(errors="replace"))
    st.check("resumed from epoch 1", bool(resumed_line) and resumed_line.group(1) == "1"
             and int(resumed_line.group(2)) == p.steps, resumed_line.group(0) if resumed_line else "no 'resumed from ... at epoch' line")
    recs = read_jsonl(log)
    pairs = replayed_steps(recs)
    st.results["replayed_steps"] = pairs
    st.results["replay_rtol"] = p.replay_rtol
    # the first replayed step depends on the restored weights only; the later ones on the restored optimizer
    # state too (a lost Adam state left step 1 exact and put steps 2-10 up to 2% off), within the run-to-run
    # tolerance of the device's nondeterministic backward kernels
    st.check("replayed steps", [q["step"] for q in pairs] == list(range(p.steps + 1, last_step + 1))
             and pairs[0]["rel_diff"] <= p.replay_rtol and all(q["rel_diff"] <= p.epoch_rtol for q in pairs),
             f"every step the killed run logged after its checkpoint ({p.steps + 1}..{last_step}) must come again with "
             f"its loss (the first within {p.replay_rtol}, the rest within {p.epoch_rtol}): " + json.dumps(pairs[:12]))
    cmp = compare_epochs(epoch_losses(recs), epoch_losses(read_jsonl(straight / "log.jsonl")), p.epoch_rtol,
                         from_epoch=1)  # epoch 0 is the killed run's own, before the checkpoint
    st.results["epochs"] = cmp
    st.check("epoch losses equal the uninterrupted run's", cmp["equal"], json.dumps(cmp["epochs"]))


def stage_finetune(st: Stage) -> None:
    run, p = st.run, st.run.plan
    out = run.work / "finetune"
    shutil.rmtree(out, ignore_errors=True)
    args = ["--deepspeed_config", p.ft_ds_config, "--data_path", run.ctx["train"], "--val_path", run.ctx["val"],
            "--model", p.ft_model, "--input_size", p.input_size, "--batch_size", p.ft_batch_size, "--epochs", 1,
            "--warmup_epochs", 0, "--max_steps_per_epoch", p.ft_steps, "--num_workers", p.workers,
            "--log_every", p.log_every, "--output_dir", out]
    if p.ft_zero_stage is not None:
        args += ["--zero_stage", p.ft_zero_stage]
    model = run.ctx.get("model_pth")
    if model is not None and Path(model).is_file():
        args += ["--finetune", model]
        st.results["init"] = str(model)
    else:
        st.results["init"] = "random (no pretraining export)"
    c = st.cmd("train", deepspeed_launch(run, "lomar_fast/finetune.py", *args))
    text = Path(run.out / c.log).read_text(errors="replace")
    m = re.search(r"ZeRO-(\d)", text)
    dt = re.search(r"on (\w+), (torch\.\w+), ZeRO", text)
    summary = json.loads((out / "summary.json").read_text())
    st.results.update(zero_stage=int(m.group(1)) if m else None, dtype=dt.group(2) if dt else None,
                      **{k: summary.get(k) for k in ("loss", "val_top1", "val_top5", "val_loss", "val_n",
                                                     "epoch_time", "step")},
                      # one short epoch: its rate includes the warm-up (loader compile, first steps)
                      images_per_sec_incl_warmup=summary.get("images_per_sec"))
    st.check("ZeRO-3", st.results["zero_stage"] == 3, f"log says ZeRO-{st.results['zero_stage']}")
    if p.mode == "gpu":
        st.check("bf16", st.results["dtype"] == "torch.bfloat16", f"log says {st.results['dtype']}")
    st.check("checkpoint-best.pth", (out / "checkpoint-best.pth").is_file())
    run.ctx["ft_best"] = out / "checkpoint-best.pth"
    run.ctx["ft_top1"] = summary.get("val_top1")


def stage_eval(st: Stage) -> None:
    run, p = st.run, st.run.plan
    c = st.cmd("eval", python_m(run, "lomar_fast.finetune", "--eval", "--finetune", run.ctx["ft_best"],
                                "--val_path", run.ctx["val"], "--deepspeed_config", p.ft_ds_config,
                                "--num_workers", p.workers, "--batch_size", p.ft_batch_size,
                                *(["--zero_stage", p.ft_zero_stage] if p.ft_zero_stage is not None else [])))
    m = re.search(r"top-1 ([\d.]+)%\s+top-5 ([\d.]+)%\s+loss ([\d.]+)\s+\((\d+) images", c.tail)
    st.check("eval line", bool(m), c.tail[-500:])
    top1, top5, loss, n = float(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4))
    ref = run.ctx.get("ft_top1")
    if ref is None and (run.work / "finetune" / "summary.json").is_file():
        ref = json.loads((run.work / "finetune" / "summary.json").read_text()).get("val_top1")
    st.results.update(val_top1=top1, val_top5=top5, val_loss=loss, val_n=n, finetune_val_top1=ref)
    st.check("every val image", n == p.n_val, f"{n} of {p.n_val}")
    one_image = 100.0 / max(n, 1)
    st.check("agrees with the fine-tuning run", ref is not None and abs(top1 - ref) <= one_image + 1e-6,
             f"--eval top-1 {top1} vs the run's {ref}")


def stage_knn(st: Stage) -> None:
    run, p = st.run, st.run.plan
    c = st.cmd("knn", python_m(run, "lomar_fast.knn", "--checkpoint", run.ctx["model_pth"], "--train",
                               run.ctx["train"], "--val", run.ctx["val"], "--input_size", p.input_size,
                               "--batch_size", p.knn_batch_size, "--num_workers", p.workers))
    m = re.search(r"k-NN top-1 ([\d.]+)%\s+top-5 ([\d.]+)%.*?(\d+) train / (\d+) val images.*?([\d.]+) s\)", c.tail)
    st.check("knn line", bool(m), c.tail[-500:])
    st.results.update(top1=float(m.group(1)), top5=float(m.group(2)), n_train=int(m.group(3)), n_val=int(m.group(4)),
                      seconds=float(m.group(5)), chance=round(100.0 / p.classes, 2))
    st.check("every image", int(m.group(3)) == p.n_train and int(m.group(4)) == p.n_val)


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "benchmarks" / "results" / "e2e")),
                    help="results folder (default $OUT, else benchmarks/results/e2e)")
    ap.add_argument("--work", default=None, help="data and checkpoints (default /tmp/lomar_e2e; --cpu: <out>/work)")
    ap.add_argument("--pack", default=None,
                    help="after every stage, copy e2e.json and an archive of --out (e2e.tgz) into this folder (a "
                         "device call's $OUT, which returns at most 8 files)")
    ap.add_argument("--cpu", action="store_true", help="the scaled-down CPU mode (also E2E_CPU=1)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="run only these stages")
    ap.add_argument("--n", type=int, default=None, help="train images (GPU default 20000)")
    ap.add_argument("--val", type=int, default=None, help="val images (GPU default 1000)")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps per epoch (GPU default 30)")
    ap.add_argument("--ft_steps", type=int, default=None, help="fine-tuning steps (GPU default 30)")
    ap.add_argument("--workers", type=int, default=None, help="loader and writer processes (default: the cores)")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="--compile of the pretraining runs; the synthetic step compiles (or not) alike (auto: "
                         "compiled blocks on a GPU, eager on a CPU)")
    ap.add_argument("--kernels", default="auto", choices=("auto", "off", "on"),
                    help="fused CUDA kernels in the pretraining runs and the synthetic step alike (default auto, "
                         "the entry points' default)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run, counted from $E2E_T0 (default 520 on a GPU, none on a CPU)")
    ap.add_argument("--reuse-data", action="store_true", help="keep <work>/data when it matches the plan")
    a = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    cpu_mode = a.cpu or os.environ.get("E2E_CPU", "") not in ("", "0")
    plan = cpu_plan(cores) if cpu_mode else gpu_plan(cores)
    for name, value in (("n_train", a.n), ("n_val", a.val), ("steps", a.steps), ("ft_steps", a.ft_steps),
                        ("workers", a.workers)):
        if value is not None:
            setattr(plan, name, value)
    plan.compile, plan.kernels = a.compile, a.kernels
    if a.deadline is not None:
        plan.deadline_s = a.deadline if a.deadline > 0 else None
    out = Path(a.out).resolve()
    work = Path(a.work).resolve() if a.work else (out / "work" if cpu_mode else Path("/tmp/lomar_e2e"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = float(os.environ.get("E2E_T0", time.time()))
    run = Run(plan, out, work, sys.executable, t_start, Path(a.pack).resolve() if a.pack else None)
    run.ctx["reuse_data"] = a.reuse_data
    # stages left out with --stages: their outputs from an earlier run in the same --work are used
    earlier = {"train": work / "data" / "train.beton", "val": work / "data" / "val.beton",
               "pretrain_dir": work / "pretrain", "model_pth": work / "model.pth",
               "ft_best": work / "finetune" / "checkpoint-best.pth"}
    for key, path in earlier.items():
        if path.exists():
            run.ctx[key] = path
    print(f"[e2e] {plan.mode} mode: results in {out}, data and checkpoints in {work}"
          + (f", deadline {plan.deadline_s:.0f} s" if plan.deadline_s else ""), flush=True)
    table: dict[str, tuple[Callable[[Stage], None], tuple[str, ...]]] = {
        "environment": (stage_environment, ()),
        "data": (stage_data, ()),
        "pretrain": (stage_pretrain, ("data",)),
        "throughput": (stage_throughput, ()),
        "resume": (stage_resume, ("data",)),
        "finetune": (stage_finetune, ("data",)),
        "eval": (stage_eval, ("finetune",)),
        "knn": (stage_knn, ("data", "pretrain")),
        "loader": (stage_loader, ("data",)),
    }
    for name in STAGES:  # in STAGES' order
        fn, needs = table[name]
        if name in a.stages:
            run.stage(name, fn, needs=[n for n in needs if n in a.stages])
    run.save()
    an = analysis(run.stages, plan)
    print(f"[e2e] {overall(run.stages)}: " + ", ".join(f"{k} {v}" for k, v in an.items() if v is not None)
          + f"; {out / 'e2e.json'}", flush=True)
    return 0 if overall(run.stages) == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

"""The end-to-end harness (benchmarks/e2e.py) and the synthetic photo generator, on small inputs: stage
bookkeeping, time limits that kill whole process groups, the resume comparison, the throughput analysis,
and the generator's sizes, labels, determinism and natural-image spectrum. (The harness itself runs end to
end on a CPU with ``E2E_CPU=1 bash benchmarks/gpu_e2e.sh``.)"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import e2e
from data_prep.make_synthetic import make_synthetic, noise_bank


def plan(**kw) -> e2e.Plan:
    return replace(e2e.cpu_plan(2), **kw)


def new_run(tmp_path: Path, **kw) -> e2e.Run:
    return e2e.Run(plan(**kw), tmp_path / "out", tmp_path / "work", "python3", time.time())


def test_stages_record_failures_skips_and_deadline(tmp_path):
    run = new_run(tmp_path, deadline_s=30.0)

    def ok(st):
        st.results["x"] = 1

    def broken(st):
        raise KeyError("train")

    def failing_check(st):
        st.check("loss fell", False, "1.2 -> 1.3")

    assert run.stage("environment", ok)
    assert not run.stage("data", broken)
    assert not run.stage("pretrain", ok, needs=["data"])
    assert not run.stage("throughput", failing_check)
    run.t_start -= 100  # the deadline has passed
    assert not run.stage("loader", ok)
    doc = json.loads((tmp_path / "out" / "e2e.json").read_text())
    st = doc["stages"]
    assert doc["schema"] == e2e.SCHEMA and doc["status"] == "failed"
    assert st["environment"]["status"] == "ok" and st["environment"]["results"] == {"x": 1}
    assert st["data"]["status"] == "failed" and "KeyError" in st["data"]["reason"]
    assert st["pretrain"]["status"] == "skipped" and "data" in st["pretrain"]["reason"]
    assert st["throughput"]["status"] == "failed" and st["throughput"]["checks"] == {"loss fell": False}
    assert st["loader"]["status"] == "skipped" and "no time left" in st["loader"]["reason"]
    assert json.loads((tmp_path / "out" / "e2e" / "data.json").read_text())["status"] == "failed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # starts fresh interpreters or a benchmark
def test_stage_time_limit_kills_the_whole_process_group(tmp_path):
    run = new_run(tmp_path)
    pidfile = tmp_path / "child.pid"
    st = e2e.Stage("pretrain", run, limit_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(e2e.StageFailed, match="out of time"):
        st.cmd("train", ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"])
    assert time.monotonic() - t0 < 15
    c = st.commands[0]
    assert c.timed_out and c.rc is not None
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not _alive(child), "the launcher's child outlived the time limit"
    assert (tmp_path / "out" / c.log).read_text().startswith("$ bash -c")


def test_watch_kills_at_once(tmp_path):
    run = new_run(tmp_path)
    st = e2e.Stage("resume", run, limit_s=60)
    marker = tmp_path / "progress"
    t0 = time.monotonic()
    c = st.cmd("killed", ["bash", "-c", f"sleep 0.3; touch {marker}; sleep 60"], watch=marker.exists)
    assert c.killed and not c.timed_out and time.monotonic() - t0 < 10
    assert c.rc == -9 or c.rc == 137  # SIGKILL


def test_failed_command_names_its_log(tmp_path):
    st = e2e.Stage("eval", new_run(tmp_path), limit_s=30)
    with pytest.raises(e2e.StageFailed, match=r"exit 3; see e2e/logs/eval-x.log"):
        st.cmd("x", ["bash", "-c", "echo boom; exit 3"])


def test_resume_comparison():
    log = [{"kind": "steps", "epoch": 0, "step": 1, "loss": 1.0}, {"kind": "steps", "epoch": 0, "step": 2, "loss": 0.9},
           {"kind": "epoch", "epoch": 0, "loss": 0.95},
           {"kind": "steps", "epoch": 1, "step": 3, "loss": 0.8},            # the killed run
           {"kind": "steps", "epoch": 1, "step": 3, "loss": 0.8},            # resumed: the same step again
           {"kind": "steps", "epoch": 1, "step": 4, "loss": 0.7}, {"kind": "epoch", "epoch": 1, "loss": 0.75}]
    pairs = e2e.replayed_steps(log)
    assert pairs == [{"step": 3, "killed": 0.8, "resumed": 0.8, "rel_diff": 0.0}]
    assert e2e.epoch_losses(log) == {0: 0.95, 1: 0.75}
    same = e2e.compare_epochs({0: 0.95, 1: 0.75}, {0: 0.95, 1: 0.75 * (1 + 1e-6)}, rtol=1e-4)
    assert same["equal"] and same["max_rel_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert not e2e.compare_epochs({0: 0.95, 1: 0.76}, {0: 0.95, 1: 0.75}, rtol=1e-4)["equal"]
    assert not e2e.compare_epochs({0: 0.95}, {0: 0.95, 1: 0.75}, rtol=1e-4)["equal"]  # an epoch missing


def test_read_jsonl_skips_a_line_cut_by_a_kill(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"kind": "steps", "step": 1, "loss": 1.0}\n{"kind": "ste')
    assert e2e.read_jsonl(p) == [{"kind": "steps", "step": 1, "loss": 1.0}]


def test_analysis():
    recs = [{"kind": "steps", "epoch": 0, "images_per_sec": 100.0}, {"kind": "steps", "epoch": 0, "images_per_sec": 900.0},
            {"kind": "steps", "epoch": 1, "images_per_sec": 1000.0}, {"kind": "steps", "epoch": 2, "images_per_sec": 1200.0},
            {"kind": "steps", "epoch": 2, "images_per_sec": 1100.0}]
    assert e2e.steady_images_per_sec(recs) == 1100.0      # epoch 0 (warm-up) left out
    assert e2e.steady_images_per_sec(recs[:2]) == 900.0   # only epoch 0: all but its first window
    waits = [{**r, "data_wait_s": 0.001 * i, "gpu_idle_before_step_s": 0.002 * i} for i, r in enumerate(recs)]
    assert e2e.measured_wait_ms(waits, "data_wait_s") == 3.0  # the same windows as the rate: epochs >= 1
    assert e2e.measured_wait_ms(waits, "gpu_idle_before_step_s") == 6.0
    ok = {"status": "ok"}
    stages = {"pretrain": {**ok, "results": {"images_per_sec_steady": 1000.0, "data_wait_ms_per_step": 3.0,
                                             "gpu_idle_before_step_ms": 40.0}},
              "throughput": {**ok, "results": {"images_per_sec": 1300.0, "step_ms_median": 190.0,
                                               "step_ms_mean": 200.0}},
              "loader": {**ok, "results": {"images_per_sec": 5000.0}}}
    a = e2e.analysis(stages, plan(batch_size=250))
    # the synthetic side from its mean step (the pretraining windows are means), not its median or its img/s
    assert a["synthetic_images_per_sec"] == 1250.0 and a["ratio"] == 0.8
    assert a["step_ms_e2e"] == 250.0 and a["step_ms_synthetic"] == 200.0 and a["step_ms_gap"] == 50.0
    assert a["data_wait_fraction_estimated"] == 0.2 and a["loader_headroom"] == 5.0
    assert a["data_wait_ms_per_step_measured"] == 3.0 and a["gpu_idle_before_step_ms_measured"] == 40.0
    assert "ratio" not in e2e.analysis({}, plan())
    failed = {**stages, "throughput": {**stages["throughput"], "status": "failed"}}
    assert "ratio" not in e2e.analysis(failed, plan(batch_size=250))  # a failed stage gives no figure


def test_resume_checks_every_replayed_step_from_the_resumed_epoch():
    """The replayed steps after the first check the restored optimizer state; epochs before the resume are the
    killed run's own and are not compared."""
    killed = [{"kind": "steps", "step": s, "loss": 1.0 + s} for s in range(1, 8)]
    resumed = [{"kind": "steps", "step": s, "loss": 1.0 + s + (0.02 * (s - 4) if s > 5 else 0)} for s in range(5, 8)]
    pairs = e2e.replayed_steps(killed + resumed)
    assert [q["step"] for q in pairs] == [5, 6, 7] and pairs[0]["rel_diff"] == 0.0 and pairs[2]["rel_diff"] > 5e-3
    cmp = e2e.compare_epochs({0: 9.0, 1: 2.0}, {0: 1.0, 1: 2.0}, 1e-3, from_epoch=1)
    assert cmp["equal"] and [r["epoch"] for r in cmp["epochs"]] == [1]


def test_gpu_plan_fits_its_deadline():
    p = e2e.gpu_plan(16)
    assert p.batch_size == 256 and p.model == "lomar_vit_base_patch16" and p.ft_ds_config.endswith("zero3.json")
    assert p.n_train >= 20000 and p.steps * p.batch_size <= p.n_train  # every step gets a full, fresh batch
    # with the kit's install, one 10-minute device call; the acceptance stages before the loader benchmark
    assert p.deadline_s <= 520 and set(p.timeouts) == set(e2e.STAGES) and e2e.STAGES[-1] == "loader"
    assert e2e.STAGES.index("knn") > e2e.STAGES.index("resume") > e2e.STAGES.index("throughput")



def test_main_runs_the_stages_in_their_order(tmp_path, monkeypatch):
    ran = []
    for name in e2e.STAGES:
        monkeypatch.setattr(e2e, f"stage_{name}", lambda st, name=name: ran.append(name))
    assert e2e.main(["--cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    assert ran == list(e2e.STAGES)
    doc = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert list(doc["stages"]) == list(e2e.STAGES)


def test_a_packed_run_hands_over_two_files_and_leaves_the_data_out(tmp_path, monkeypatch):
    """A device call returns at most 8 files from its $OUT: with --pack, $OUT gets e2e.json and e2e.tgz (the
    per-stage JSON and logs), rewritten after every stage; the data and checkpoints stay out of the archive."""
    import tarfile

    seen = []

    def data(st):
        (st.run.work / "data").mkdir(parents=True, exist_ok=True)
        (st.run.work / "data" / "train.beton").write_bytes(b"x" * 1000)
        seen.append(sorted(p.name for p in (tmp_path / "handed").iterdir()))

    for name in e2e.STAGES:
        monkeypatch.setattr(e2e, f"stage_{name}", data if name == "data" else (lambda st: None))
    out = tmp_path / "out"
    assert e2e.main(["--cpu", "--out", str(out), "--pack", str(tmp_path / "handed")]) == 0  # --work: <out>/work
    assert seen == [["e2e.json", "e2e.tgz"]]  # already there after the first stage
    assert sorted(p.name for p in (tmp_path / "handed").iterdir()) == ["e2e.json", "e2e.tgz"]
    with tarfile.open(tmp_path / "handed" / "e2e.tgz") as tar:
        names = tar.getnames()
    assert "./e2e.json" in names and "./e2e/pretrain.json" in names and "./e2e/logs" in names
    assert not [n for n in names if n.startswith("./work")]
    assert json.loads((tmp_path / "handed" / "e2e.json").read_text()) == json.loads((out / "e2e.json").read_text())


def test_the_synthetic_step_compiles_exactly_when_the_pretraining_runs_do(tmp_path):
    """The synthetic step (benchmarks.throughput) is the baseline of the end-to-end img/s: it must compile
    when, and only when, pretrain.py's --compile (auto by default) compiles."""
    gpu = e2e.gpu_plan(16)
    assert gpu.compile == "auto" and e2e.pretrain_compiles(gpu)  # ZeRO-2 on a GPU: compiled blocks
    assert not e2e.pretrain_compiles(replace(gpu, compile="off"))
    assert not e2e.pretrain_compiles(replace(gpu, ds_config="ds_configs/zero3.json"))
    assert not e2e.pretrain_compiles(plan()) and e2e.pretrain_compiles(plan(compile="on"))
    run = new_run(tmp_path, compile="on")
    run.ctx["train"] = tmp_path / "train.beton"
    args = [str(a) for a in e2e.pretrain_args(run, tmp_path / "p", save_every=1, log_every=1)]
    assert args[args.index("--compile") + 1] == "on"

# ------------------------------------------------------------------------------------------------ generator
def _spectrum_slope(img: np.ndarray) -> float:
    """Slope of the radially averaged power spectrum in log-log, over the middle frequencies."""
    g = img.astype(np.float64).mean(axis=2)
    g = g[: min(g.shape), : min(g.shape)]
    g = (g - g.mean()) * np.hanning(g.shape[0])[:, None] * np.hanning(g.shape[1])[None, :]
    power = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    c = np.array(power.shape) // 2
    y, x = np.indices(power.shape)
    r = np.hypot(y - c[0], x - c[1]).astype(int)
    radial = np.bincount(r.ravel(), power.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    f = np.arange(4, min(c) // 2)
    return float(np.polyfit(np.log(f), np.log(radial[f]), 1)[0])


def test_synthetic_images_sizes_labels_and_determinism(tmp_path):
    rep = make_synthetic(tmp_path / "a", 8, 4, classes=4, seed=3, workers=1, chunk=3, quiet=True)
    assert rep["images"] == 12 and rep["splits"] == {"train": 8, "val": 4}
    for split, per_class in (("train", 2), ("val", 1)):
        classes = sorted(p.name for p in (tmp_path / "a" / split).iterdir())
        assert classes == ["class_000", "class_001", "class_002", "class_003"]
        for c in classes:
            files = sorted((tmp_path / "a" / split / c).glob("*.jpg"))
            assert len(files) == per_class
            for f in files:
                with Image.open(f) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    assert 400 <= max(im.size) <= 500 and min(im.size) >= 250
    # the same images whatever the number of workers and the chunking
    make_synthetic(tmp_path / "b", 8, 4, classes=4, seed=3, workers=2, chunk=5, quiet=True)
    for f in (tmp_path / "a").rglob("*.jpg"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    files = sorted((tmp_path / "a" / "train").rglob("*.jpg"))
    assert len({f.read_bytes() for f in files}) == len(files)
    assert json.loads((tmp_path / "a" / "synthetic.json").read_text())["mean_kb"] > 20


def test_synthetic_images_have_natural_statistics(tmp_path):
    make_synthetic(tmp_path, 6, 0, classes=3, seed=0, workers=1, quiet=True)
    slopes, stds, means = [], [], []
    for f in sorted(tmp_path.rglob("*.jpg")):
        img = np.asarray(Image.open(f).convert("RGB"))
        slopes.append(_spectrum_slope(img))
        stds.append(img.std())
        means.append(img.reshape(-1, 3).mean(axis=0))
    # natural photos: power falls about as 1/f^2 (slope near -2); white noise would be 0, a flat image undefined
    assert all(-3.5 < s < -1.5 for s in slopes), slopes
    assert all(s > 20 for s in stds), stds
    # the classes differ in colour: mean colours are not all alike
    assert np.ptp(np.array(means), axis=0).max() > 15


def test_noise_bank_is_one_over_f():
    field = noise_bank(0, count=1, side=256)[0]
    assert abs(field.mean()) < 1e-3 and abs(field.std() - 1) < 1e-3
    assert -2.4 < _spectrum_slope(np.repeat(field[..., None], 3, axis=2)) < -1.6

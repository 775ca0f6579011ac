"""Pretraining on CPU: the session run (loss, checkpoints, export), two DeepSpeed ranks (disjoint data,
gradient accumulation, a kill during a save, exact resume), one poisoned rank, the schedule, bad input."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lomar_fast import pretrain
from lomar_fast.checkpoint import CheckpointMismatch
from lomar_fast.cli import run_cli
from lomar_fast.distributed import init_distributed, seed_rank, seed_shared
from lomar_fast.ds_config import resolve_ds_config
from lomar_fast.errors import ConfigError, NonFiniteLoss
from lomar_fast.models import create_model
from lomar_fast.optim import lr_at, param_groups_weight_decay, set_lr

from conftest import PRETRAIN_RANKS, PRETRAIN_SMALL
from launch import REPO, cpu_env, free_port, launch

TESTS = Path(__file__).resolve().parent
TORCH_LINEAR = torch.nn.functional.linear  # at collection, before any test has started DeepSpeed
SMALL = ["--model", "lomar_vit_tiny_patch16", "--input_size", "64", "--window_size", "3", "--num_window", "2",
         "--num_workers", "2", "--log_every", "1"]


def step_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step, the latest record per step (a resumed run logs some again)."""
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return sorted({r["step"]: r["loss"] for r in recs if r["kind"] == "steps"}.items())


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


# ------------------------------------------------------------------------------------ the session run
@pytest.mark.slow
def test_loss_falls_checkpoints_disjoint_shards_and_export(pretrain_run):
    """The session run: 2 ranks x micro-batch 4 x accum 2, 3 epochs of 6 micro-steps."""
    out, proc, demo = pretrain_run["out"], pretrain_run["proc"], pretrain_run["demo"]
    losses = [loss for _, loss in step_losses(out)]
    assert len(losses) == 18 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, f"loss did not fall: {losses}"
    assert (out / "latest").read_text().strip() == "epoch0002"
    # every saved tag is complete; --keep_last 3 kept all three
    assert sorted(p.name for p in out.glob("epoch*")) == ["epoch0000", "epoch0001", "epoch0002"]
    assert all((out / t / "complete.json").is_file() for t in ("epoch0000", "epoch0001", "epoch0002"))
    # gradient accumulation: 18 micro-steps of 2 x 4 images made 9 optimizer steps of 16 images
    states = torch.load(out / "epoch0002" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert (states["global_steps"], states["global_samples"]) == (9, 9 * 16)
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    assert "loss by epoch" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == 2 and summary["step"] == 18 and 0.0 <= summary["knn_top1"] <= 100.0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    waits = [r["data_wait_s"] for r in recs if r["kind"] == "steps"]
    assert len(waits) == 18 and all(w >= 0 for w in waits) and max(waits) > 0  # the loader wait is timed
    # every rank reads its own disjoint shard; together they cover the dataset
    for epoch in (0, 1):
        r0 = json.loads((out / "data_order" / f"rank0_epoch{epoch}.json").read_text())
        r1 = json.loads((out / "data_order" / f"rank1_epoch{epoch}.json").read_text())
        assert set(r0).isdisjoint(r1) and sorted(r0 + r1) == list(range(demo["n_train"]))
    assert json.loads((out / "data_order" / "rank0_epoch0.json").read_text()) != json.loads(
        (out / "data_order" / "rank0_epoch1.json").read_text())

    from lomar_fast.checkpoint import load_checkpoint

    model = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_checkpoint(model, pretrain_run["model"])  # strict: every key present and shaped right
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, fresh[k])]
    assert "blocks.0.attn.qkv.weight" in changed  # trained weights, not the init
    clf = create_model("vit_tiny_patch16", img_size=64, num_classes=8)
    report = clf.load_pretrained(pretrain_run["model"])
    assert "mask_token" in report["dropped"] and "blocks.0.attn.qkv.weight" in report["used"]
    # the export carries the run's settings (visualize and fine-tuning read the geometry from them)
    exported = torch.load(pretrain_run["model"], weights_only=True)
    assert exported["epoch"] == 2 and exported["args"]["window_size"] == 3 and exported["args"]["input_size"] == 64


# --------------------------------------------------------------------------------------- two ranks
# The session run's flags through one wrapper, with three optional probes (environment variables):
# PAUSE_AT_TAG: block (to be SIGKILLed) once that tag's files are written and before it is committed;
# PROBE_OUT: record each rank's initial weights and its first drop-path masks;
# POISON_AT_CALL: rank 1's loss turns NaN at that forward (counted in this process).
RUN_WITH_PROBES = """
import json, os, sys, time
from pathlib import Path
from lomar_fast import run_dir
import lomar_fast.models.lomar as lm
import lomar_fast.models.vit as vit

rank = int(os.environ["RANK"])
record = {"init": None, "drop": [], "calls": 0}
real_commit, real_loss, real_drop = run_dir.commit, lm.LoMaR.forward_loss, vit.DropPath.forward


def commit(root, tag, info, update_latest):
    if tag == os.environ.get("PAUSE_AT_TAG"):  # the tag's files are written, nothing is committed yet
        Path(os.environ["PAUSE_FILE"]).write_text(tag)
        time.sleep(3600)
    real_commit(root, tag, info, update_latest)


def forward_loss(self, pred, targets, masks):
    if record["init"] is None:
        record["init"] = float(sum(p.double().sum() for p in self.parameters()))
    record["calls"] += 1
    if os.environ.get("PROBE_OUT"):  # on disk after every forward: a SIGKILLed run keeps it
        Path(os.environ["PROBE_OUT"] + f".rank{rank}.json").write_text(json.dumps(record))
    loss = real_loss(self, pred, targets, masks)
    poison = int(os.environ.get("POISON_AT_CALL", 0))
    return loss * float("nan") if rank == 1 and record["calls"] == poison else loss


def drop(self, x):
    out = real_drop(self, x)
    if self.training and self.drop_prob > 0 and len(record["drop"]) < 8:
        record["drop"].append((out == 0).reshape(x.shape[0], -1).all(1).tolist())
    return out


run_dir.commit, lm.LoMaR.forward_loss, vit.DropPath.forward = commit, forward_loss, drop
from lomar_fast import cli, pretrain
try:
    cli.run_cli(lambda: pretrain.main(sys.argv[1:]))
finally:
    if os.environ.get("PROBE_OUT"):
        Path(os.environ["PROBE_OUT"] + f".rank{rank}.json").write_text(json.dumps(record))
"""


def _deepspeed_cmd(script: Path, args: list[str], ranks: int = 2) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
            str(free_port()), str(script), *args]


@pytest.mark.slow
def test_two_ranks_kill_during_save_exact_resume_seeds_and_a_nan_on_one_rank(pretrain_run, tmp_path):
    """The session run's flags again on 2 ranks:
    - SIGKILLed while its second checkpoint is being written, it resumes from the first one and reproduces the
      uninterrupted session run's losses, step by step;
    - both ranks start from the same weights, and each draws its own drop-path masks;
    - when rank 1's loss turns NaN in the resumed run, both ranks stop at the same read-back (exit 3) and leave
      the last complete checkpoint alone."""
    demo = pretrain_run["demo"]
    common = ["--data_path", str(demo["train"]), *PRETRAIN_SMALL]
    split = tmp_path / "split"
    script = tmp_path / "run_with_probes.py"
    script.write_text(RUN_WITH_PROBES)
    pause = tmp_path / "paused"
    env = dict(cpu_env(), PAUSE_AT_TAG="epoch0001", PAUSE_FILE=str(pause), PROBE_OUT=str(tmp_path / "probe"),
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_deepspeed_cmd(script, [*common, "--output_dir", str(split)]), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not pause.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert pause.exists(), f"the run never reached the save: exit {proc.poll()}\n{proc.stdout.read()[-4000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # the interrupted save left its files but no commit: latest still names the complete epoch0000
    assert (split / "epoch0001").is_dir() and not (split / "epoch0001" / "complete.json").exists()
    assert (split / "latest").read_text().strip() == "epoch0000"

    # resumed, with rank 1's loss poisoned at its 12th forward of this process: global micro-step 6 + 12 = 18
    env = dict(cpu_env(), POISON_AT_CALL="12", PROBE_OUT=str(tmp_path / "resumed"), PYTHONPATH=str(REPO))
    resumed = subprocess.run(_deepspeed_cmd(script, [*common, "--output_dir", str(split), "--resume", "auto"]),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert "at epoch 1 step 6" in out and "resumed from" in out and "epoch0000" in out
    assert resumed.returncode != 0 and "exits with return code = 3" in out, out[-3000:]
    assert "loss became nan at epoch 2 step 18" in out and "--resume auto" in out
    r0, r1 = (json.loads((tmp_path / f"resumed.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == r1["calls"] == 12  # both ranks stopped after the same step
    # epoch 1 was saved and committed; epoch 2 never was
    assert (split / "latest").read_text().strip() == "epoch0001"
    assert (split / "epoch0001" / "complete.json").is_file() and not (split / "epoch0002").exists()
    for epoch in (0, 1, 2):  # the same shards in the same order
        assert (split / "data_order" / f"rank1_epoch{epoch}.json").read_text() == (
            pretrain_run["out"] / "data_order" / f"rank1_epoch{epoch}.json").read_text()
    a, b = step_losses(pretrain_run["out"]), step_losses(split)
    assert [s for s, _ in b] == list(range(1, 18))  # the NaN read-back at step 18 is not logged
    for (s, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6), f"step {s}: uninterrupted {la} vs resumed {lb}"

    # seeds: the killed run's ranks started from the same weights and drew different drop-path masks
    k0, k1 = (json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1))
    assert k0["init"] == k1["init"] and k0["drop"] and k0["drop"] != k1["drop"]

    # the run moves to one rank (8 x accum 2 = the same 16 images per step): its two-rank ZeRO-2 checkpoint is
    # converted into DeepSpeed's universal checkpoint, loaded, the conversion deleted, and epoch 2 trains
    one = subprocess.run([sys.executable, "-m", "lomar_fast.pretrain", *common, "--output_dir", str(split),
                          "--resume", "auto", "--batch_size", "8"], cwd=REPO, env=cpu_env(), capture_output=True,
                         text=True, timeout=600)
    _ok(one)
    assert "--resume: converted" in one.stdout and "converted into DeepSpeed's universal checkpoint" in one.stdout
    assert "world size 2 x micro-batch 4 x accum_iter 2 as world size 1 x micro-batch 8" in one.stdout
    assert not (split / "universal").exists() and (split / "epoch0002" / "complete.json").is_file()
    epochs = {r["epoch"]: r["loss"] for r in map(json.loads, (split / "log.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"}
    straight = {r["epoch"]: r["loss"] for r in map(json.loads, (pretrain_run["out"] / "log.jsonl").read_text()
                                                   .splitlines()) if r["kind"] == "epoch"}
    # the same images per step from the same state; only the window/mask draws (one stream per rank) differ
    assert epochs[2] == pytest.approx(straight[2], rel=0.1), (epochs, straight)


# ------------------------------------------------------------------------------------------ in-process
def test_lr_schedule_matches_formula():
    lr, min_lr, warm, epochs, spe = 1e-3, 1e-5, 2, 10, 100
    assert lr_at(0, spe, lr, min_lr, warm, epochs) == 0.0
    assert lr_at(50, spe, lr, min_lr, warm, epochs) == pytest.approx(lr * 0.25)
    assert lr_at(200, spe, lr, min_lr, warm, epochs) == pytest.approx(lr)
    # halfway through the cosine: the midpoint of lr and min_lr
    assert lr_at(600, spe, lr, min_lr, warm, epochs) == pytest.approx((lr + min_lr) / 2)
    t = 437 / spe
    expect = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (epochs - warm)))
    assert lr_at(437, spe, lr, min_lr, warm, epochs) == pytest.approx(expect)
    assert lr_at(1000, spe, lr, min_lr, warm, epochs) == pytest.approx(min_lr)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 0.5},
                           {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]


def test_weight_decay_groups():
    model = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=2)
    groups = param_groups_weight_decay(model, 0.05)
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    for name in no_decay["names"]:
        assert name.endswith(".bias") or dict(model.named_parameters())[name].ndim == 1
    assert "blocks.0.norm1.weight" in no_decay["names"] and "blocks.0.attn.qkv.bias" in no_decay["names"]
    assert "blocks.0.attn.qkv.weight" in decay["names"] and "patch_embed.proj.weight" in decay["names"]
    assert "pos_embed" not in no_decay["names"] + decay["names"]  # frozen
    n_train = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(no_decay["names"]) + len(decay["names"]) == n_train


def test_ds_config_batch_agreement():
    cpu = torch.device("cpu")
    ds = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto"}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16.*--batch_size 8"):
        resolve_ds_config(ds, batch_size=8, accum_iter=1, world_size=2, explicit={"batch_size"}, zero_stage=None,
                          device=cpu)
    cfg, micro, accum = resolve_ds_config(ds, batch_size=8, accum_iter=2, world_size=2, explicit=set(),
                                          zero_stage=3, device=cpu)
    assert (micro, accum, cfg["train_batch_size"], cfg["zero_optimization"]["stage"]) == (16, 2, 64, 3)
    with pytest.raises(ConfigError, match="train_batch_size=100"):
        resolve_ds_config({"train_batch_size": 100}, batch_size=8, accum_iter=1, world_size=1, explicit=set(),
                          zero_stage=None, device=cpu)


def test_per_rank_and_shared_seeds():
    seed_shared(7)
    a = torch.rand(4)
    seed_shared(7)
    assert torch.equal(a, torch.rand(4))
    draws = {}
    for rank in (0, 1):
        for epoch in (0, 1):
            seed_rank(7, rank, epoch)
            draws[rank, epoch] = torch.rand(4)
    assert len({tuple(v.tolist()) for v in draws.values()}) == 4  # every (rank, epoch) its own stream
    seed_rank(7, 1, 1)
    assert torch.equal(torch.rand(4), draws[1, 1])  # ... and a function of (seed, rank, epoch): resumable


def test_a_world_of_one_ignores_a_stale_master_port(in_process_world):
    """A plain ``python`` start after a launcher run (MASTER_PORT still exported, the port now taken) still starts."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        os.environ["MASTER_PORT"] = str(held.getsockname()[1])
        assert init_distributed(torch.device("cpu")) == (0, 1, 0)
        assert os.environ["MASTER_PORT"] != str(held.getsockname()[1])


def test_a_cpu_start_leaves_no_deepspeed_shared_memory_behind():
    """DeepSpeed's CPU comm op creates a 66 MiB /dev/shm workspace per rank when every rank is local (its launcher
    sets LOCAL_SIZE) and never unlinks it; the start unlinks the name once every rank has mapped it (the file
    existed: the path formula is DeepSpeed's)."""
    code = """
import os, torch
from lomar_fast import distributed as d
seen = []
release = d.release_cpu_shm_name
d.release_cpu_shm_name = lambda: (seen.append(os.path.exists(d.cpu_shm_path(0))), release())
d.init_distributed(torch.device("cpu"))
torch.distributed.all_reduce(torch.ones(3))  # the workspace still works without its name
print(seen, os.path.exists(d.cpu_shm_path(0)))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(cpu_env(), LOCAL_SIZE="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[True] False", r.stdout[-2000:]


@pytest.fixture
def no_distributed(monkeypatch):
    """Fail the test if the entry point gets as far as starting torch.distributed."""
    import lomar_fast.trainer as trainer

    def refuse(*a, **k):
        raise AssertionError("the entry point reached the distributed start: the bad input was not caught first")

    monkeypatch.setattr(trainer, "init_distributed", refuse)


def test_bad_inputs_stop_before_any_work(mini_demo, tmp_path, no_distributed, capsys):
    out = tmp_path / "out"
    data = ["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL]
    bad_json = tmp_path / "ds.json"
    bad_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32}))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cases = [
        (["--data_path", str(tmp_path / "missing.beton"), "--output_dir", str(out)], "--data_path .*missing.beton"),
        ([*data, "--output_dir", str(out), "--deepspeed_config", str(bad_json), "--batch_size", "8"],
         "train_micro_batch_size_per_gpu=32 but --batch_size 8"),
        ([*data, "--output_dir", str(out), "--num_window", "3"], "num_window 3 must be between 1 and .* = 2"),
        ([*data, "--output_dir", str(blocker / "sub")], "--output_dir .* is not writable"),
        ([*data, "--output_dir", str(out), "--warmup_epochs", "30", "--epochs", "4"], "--warmup_epochs 30"),
        ([*data, "--output_dir", str(out), "--overwrite", "--resume", "auto"], "--overwrite .* --resume"),
        # dynamo traced ZeRO-3's empty parameter partitions and died of an IndexError in the first step
        ([*data, "--output_dir", str(out), "--zero_stage", "3", "--compile", "on"],
         "--compile on does not work under ZeRO-3: .*--compile auto or off"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            pretrain.main(args)
        assert not out.exists(), f"{args}: wrote {list(out.iterdir())}"
    # as a program: exit status 2 and the one line, no traceback
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: pretrain.main(cases[2][0]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --num_window 3") and err.count("\n") == 1


@pytest.mark.slow
def test_overwrite_deletes_the_earlier_run_only_once_every_input_passed(mini_demo, tmp_path, in_process_world):
    """--overwrite deleted the earlier run when the trainer was built, before the loader, the model and the
    engine: a bad .beton or model name then stopped the run with the earlier one already gone. A --log_dir that
    cannot be written stopped it only at the logger, after a log.jsonl was written."""
    from lomar_fast.data import BetonError
    out = tmp_path / "old"
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    (out / "epoch0004").mkdir()
    text = tmp_path / "text.beton"
    text.write_text("not an FFCV file")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = ["--deepspeed_config", "ds_configs/cpu.json", *SMALL, "--output_dir", str(out), "--overwrite",
            "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--max_steps_per_epoch", "1"]
    for extra, message in (
            (["--data_path", str(text)], "text.beton"),
            (["--data_path", str(mini_demo["train"]), "--log_dir", str(blocker / "tb")], "--log_dir .*is a file, not a folder")):
        with pytest.raises((ConfigError, BetonError), match=message):
            pretrain.main([*args, *extra])
        assert sorted(p.name for p in out.iterdir()) == ["epoch0004", "log.jsonl"], extra
        assert (out / "log.jsonl").read_text() == "{}\n"
    pretrain.main([*args, "--data_path", str(mini_demo["train"])])  # all inputs good: now the old run goes
    assert not (out / "epoch0004").exists() and (out / "epoch0000" / "complete.json").exists()
    assert (out / "log.jsonl").read_text() != "{}\n"


def test_output_dir_holding_a_run_refuses_a_fresh_start(mini_demo, tmp_path, no_distributed):
    out = tmp_path / "old"
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    (out / "epoch0004").mkdir()
    args = ["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
            "--output_dir", str(out)]
    with pytest.raises(ConfigError, match=r"already holds a run \(log.jsonl, epoch0004\); continue it with "
                                          r"--resume auto, .* another --output_dir, or pass --overwrite"):
        pretrain.main(args)
    assert (out / "log.jsonl").read_text() == "{}\n" and (out / "epoch0004").is_dir()


def test_resume_of_another_shape_is_refused_before_any_work(mini_demo, tmp_path, no_distributed):
    """The saved run's model settings and global batch are compared with this run's before any process group."""
    from lomar_fast import run_dir

    out = tmp_path / "run"
    (out / "epoch0000").mkdir(parents=True)
    saved = {"world_size": 1, "micro_batch": 16, "accum_iter": 1, "zero_stage": 2,
             "config": {"model": "lomar_vit_tiny_patch16", "input_size": 64, "window_size": 3, "num_window": 2,
                        "mask_ratio": 0.8, "norm_pix_loss": True, "window_sampling": "per_batch", "pairing": "all",
                        "drop_path": 0.0}}
    run_dir.commit(out, "epoch0000", {"epoch": 0, "run": saved}, update_latest=True)
    args = ["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
            "--output_dir", str(out), "--resume", "auto"]
    with pytest.raises(ConfigError, match="world size 1 x micro-batch 16 x accum_iter 1 = 16 images per step, this "
                                          "run has world size 1 x micro-batch 8 x accum_iter 1 = 8"):
        pretrain.main([*args, "--batch_size", "8"])
    with pytest.raises(ConfigError, match="window_size: saved 3, now 2"):
        pretrain.main([*args, "--batch_size", "16", "--window_size", "2"])
    with pytest.raises(ConfigError, match="under ZeRO-2, this run uses ZeRO-3"):
        pretrain.main([*args, "--batch_size", "16", "--zero_stage", "3"])
    # written by 2 ranks under ZeRO-2 at 8 each: the global batch is checked before the universal conversion
    run_dir.commit(out, "epoch0000", {"epoch": 0, "run": {**saved, "world_size": 2, "micro_batch": 8}},
                   update_latest=True)
    with pytest.raises(ConfigError, match="world size 2 x micro-batch 8 x accum_iter 1 = 16 images per step, this "
                                          "run has world size 1 x micro-batch 8"):
        pretrain.main([*args, "--batch_size", "8"])


@pytest.mark.slow
def test_a_resume_on_another_split_keeps_the_lr_schedule(mini_demo, tmp_path, in_process_world):
    """The lr is a function of the epoch and the step in it (MAE's epoch + i/len): a run of micro-batch 4 x
    accum 2 resumed as 8 x 1 (the same 8 images per step, half the micro-steps per epoch) continues the
    schedule. (Keyed on the micro-step counter it jumped a whole epoch ahead; and an epoch of 3 micro-steps
    at accum 2 is 2, so that every epoch, and checkpoint, ends on an optimizer step.) Each optimizer step takes
    the lr of its group's first micro-step, as MAE's loop sets it (it took the last one's)."""
    out = tmp_path / "run"
    common = ["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
              "--output_dir", str(out), "--epochs", "3", "--warmup_epochs", "1", "--blr", "1e-3"]
    pretrain.main([*common, "--batch_size", "4", "--accum_iter", "2", "--exit_after_epochs", "1"])
    pretrain.main([*common, "--batch_size", "8", "--accum_iter", "1", "--resume", "auto"])
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "steps"]
    first, resumed = steps[:4], steps[4:]  # 16 images: 4 micro-steps of 4, then 2 of 8 per epoch
    base = 1e-3 * 8 / 256
    for i, r in enumerate(first):  # as MAE, a group's optimizer step takes the lr of its first micro-step
        assert r["lr"] == pytest.approx(lr_at(i - i % 2, 4, base, 0.0, 1, 3)), (i, r)
    assert first[1]["lr"] == first[0]["lr"] < first[2]["lr"] == first[3]["lr"]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]  # the counter goes on
    for i, r in enumerate(resumed):
        assert r["lr"] == pytest.approx(lr_at(2 + i, 2, base, 0.0, 1, 3)), (i, r)
    with pytest.raises(ConfigError, match="an epoch of 1 micro-batch.* no whole group of --accum_iter 2; lower "
                                          "--accum_iter or raise --max_steps_per_epoch"):
        pretrain.main([*common[:-6], "--output_dir", str(tmp_path / "b"), "--batch_size", "4", "--accum_iter", "2",
                       "--max_steps_per_epoch", "1"])


@pytest.mark.slow
def test_each_epoch_frees_the_last_epochs_loader_buffers_before_allocating_its_own(mini_demo, tmp_path,
                                                                                   in_process_world, monkeypatch):
    """FFCV allocates an epoch's buffers (pinned, on a GPU host: 1.3 GB at ViT-B batches of 256 with FFCV's own
    decode buffers) when the epoch's iterator is made. The trainer held the last epoch's iterator and batch until
    then, so each new epoch pinned a second set instead of reusing the first from torch's cache. No earlier
    epoch's iterator may be alive when one is made. Making it is time the host waits on the loader: the log's
    data_wait_s counts it (an H200 run's second epoch started a second late with a wait of 0.05 s logged)."""
    import gc
    import weakref

    import ffcv.loader.loader as ffcv_loader

    made, alive_at_start = [], []

    class Recording(ffcv_loader.EpochIterator):
        def __init__(self, *a, **kw):
            alive_at_start.append(sum(r() is not None for r in made))
            if len(made) == 1:
                time.sleep(0.5)  # the second epoch's buffers are slow to come
            super().__init__(*a, **kw)
            made.append(weakref.ref(self))

    monkeypatch.setattr(ffcv_loader, "EpochIterator", Recording)
    # numba's dispatcher finalizers raise a KeyError when collected; pytest keeps such exceptions, with their
    # tracebacks, until the test ends, and a traceback through the loader thread holds its iterator. Noted here
    # by name only, so they hold nothing.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.err_msg}"))
    out = tmp_path / "run"
    # Python's cyclic collector off: numba's compile of the first batch leaves a reference cycle through the
    # loader thread's frames that holds the first epoch's iterator until the collector runs, which it did in
    # some runs and not in others
    gc.disable()
    try:
        pretrain.main(["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
                       "--output_dir", str(out), "--epochs", "3", "--warmup_epochs", "1", "--batch_size", "4"])
    finally:
        gc.enable()
    assert alive_at_start == [0, 0, 0]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first_windows = {r["epoch"]: r for r in reversed(recs) if r["kind"] == "steps"}  # each epoch's first window
    assert first_windows[1]["data_wait_s"] * first_windows[1]["n"] >= 0.5
    assert first_windows[2]["data_wait_s"] * first_windows[2]["n"] < 0.5


def test_an_epoch_is_whole_accumulation_groups():
    """Every epoch ends on an optimizer step (where checkpoints are written): its micro-steps, capped by
    --max_steps_per_epoch, are rounded down to a multiple of --accum_iter. (An epoch of 3 micro-steps at accum 2
    left a half group whose gradients no checkpoint held: a resumed run's losses split from step 5 on.)"""
    from types import SimpleNamespace

    from lomar_fast.trainer import Trainer

    def epoch_of(n, accum, cap=None):
        fake = SimpleNamespace(cfg=SimpleNamespace(max_steps_per_epoch=cap, data_path="d"), accum=accum, micro=4,
                               world=1)
        Trainer.set_loader(fake, list(range(n)))
        return fake.steps_per_epoch

    assert [epoch_of(7, 1), epoch_of(7, 2), epoch_of(7, 3), epoch_of(9, 2, cap=3), epoch_of(8, 4)] == [7, 6, 6, 2, 8]
    with pytest.raises(ConfigError, match="lower --batch_size"):
        epoch_of(0, 1)


@pytest.mark.slow
def test_export_consolidates_a_zero3_run_and_names_what_it_cannot_export(mini_demo, tmp_path, in_process_world):
    """A ZeRO-3 run keeps one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank (no mp_rank_00_...): export
    reads it, consolidates the partitioned weights and checks them against the model; an interrupted tag and a
    folder without a complete tag are errors worded for --checkpoint."""
    from lomar_fast import export, run_dir, visualize

    out = tmp_path / "z3"
    pretrain.main(["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
                   "--output_dir", str(out), "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
                   "--max_steps_per_epoch", "2", "--zero_stage", "3"])
    assert [p.name for p in (out / "epoch0000").glob("*model_states.pt")] == ["zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert torch.nn.functional.linear is TORCH_LINEAR  # --zero_stage 3 with cpu.json: memory_efficient_linear off
    path = export.export(str(out), str(tmp_path / "model.pth"))
    sd = torch.load(path, weights_only=True)["model"]
    model = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2)
    assert set(sd) == set(model.state_dict()) and all(v.dtype == torch.float32 for v in sd.values()
                                                         if v.is_floating_point())
    assert all(sd[k].shape == v.shape and sd[k].numel() > 0 for k, v in model.state_dict().items())
    run_dir.uncommit(out, "epoch0000")
    with pytest.raises(ConfigError, match="--checkpoint .* incomplete checkpoint tag .* pass the run folder"):
        export.export(str(out / "epoch0000"), str(tmp_path / "x.pth"))
    with pytest.raises(ConfigError, match="--checkpoint .*: no complete checkpoint there; pass a run's --output_dir$"):
        export.export(str(out), str(tmp_path / "x.pth"))
    # a fine-tuned classifier is not a pretraining model: visualize says so instead of a KeyError
    clf = create_model("vit_tiny_patch16", img_size=64, num_classes=4, depth=2)
    with pytest.raises(CheckpointMismatch, match="not a LoMaR pretraining model"):
        visualize.model_from_state_dict(clf.state_dict())


def test_device_idle_pairs_each_step_start_with_the_previous_step_end(monkeypatch):
    """The GPU idle time before a step is the time between the previous step's end event and this step's start
    event; no pair spans an epoch boundary, unfinished pairs wait for the next read, and a CPU run logs none."""
    from lomar_fast.trainer import DeviceIdle

    clock = iter(range(100))

    class FakeEvent:  # an event's time is when it was recorded (ms); done unless told otherwise
        pending = False

        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = next(clock) * 10.0

        def query(self):
            return not FakeEvent.pending

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    idle = DeviceIdle(torch.device("cuda"))
    idle.new_epoch()
    for _ in range(3):  # records: start 0, end 10, start 20, end 30, start 40, end 50
        idle.step_starts()
        idle.step_ends()
    assert idle.read() == pytest.approx(0.010)  # two pairs: 20 - 10 and 40 - 30 ms
    idle.new_epoch()
    idle.step_starts()  # the first step of an epoch has no pair
    FakeEvent.pending = True
    idle.step_ends()
    idle.step_starts()
    assert idle.read() is None and len(idle.pairs) == 1  # not done yet: kept for the next read
    FakeEvent.pending = False
    assert idle.read() == pytest.approx(0.010)
    cpu = DeviceIdle(torch.device("cpu"))
    cpu.step_starts()
    cpu.step_ends()
    cpu.step_starts()
    assert cpu.read() is None


def test_non_finite_read_back_raises_with_the_resume_hint():
    from lomar_fast.trainer import LossMeter

    meter = LossMeter(torch.device("cpu"), every=2, output_dir="runs/x")
    meter.add(torch.tensor(1.0))
    meter.add(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLoss, match="loss became inf at epoch 3 step 9.*runs/x.*--resume auto"):
        meter.read(3, 9)


@pytest.mark.slow
def test_visualize_draws_windows_masked_inputs_and_reconstructions(pretrain_run, tmp_path):
    import numpy as np
    from PIL import Image

    from lomar_fast import visualize

    image = sorted((pretrain_run["demo"]["root"] / "imagefolder" / "val").rglob("*.jpg"))[0]
    out = tmp_path / "recon.png"
    visualize.main(["--checkpoint", str(pretrain_run["model"]), "--image", str(image), "--out", str(out)])
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # the 64 px image at 2x, then per window (K = 2, w = 3, p = 16) the masked input and the reconstruction
    cell, pad = 3 * 16 * 2, 8
    assert png.shape == (max(128, 2 * (cell + pad)), 128 + pad + 2 * (cell + pad), 3)
    x0 = 128 + pad
    for j in range(2):
        masked_in = png[j * (cell + pad) + 3: j * (cell + pad) + cell - 3, x0 + 3: x0 + cell - 3]
        recon = png[j * (cell + pad) + 3: j * (cell + pad) + cell - 3, x0 + cell + pad + 3: x0 + 2 * cell + pad - 3]
        same = (masked_in == recon).all(-1)
        # visible patches are shown as given in both tiles; the masked 7 of 9 are dark in one, predicted in the other
        assert 0.1 < same.mean() < 0.4, same.mean()
    with pytest.raises(ConfigError, match="--image .*missing.jpg does not exist"):
        visualize.main(["--checkpoint", str(pretrain_run["model"]), "--image", str(tmp_path / "missing.jpg"),
                        "--out", str(out)])


def test_visualize_checks_out_before_loading_and_writes_it_whole(tmp_path, monkeypatch):
    """--out with an extension PIL cannot write, without one, a folder, under a regular file, or the --image
    itself stops with one ConfigError naming --out before the model is loaded; a write that fails is a ConfigError
    and leaves an earlier picture whole; a good one is written."""
    import io

    from PIL import Image

    from lomar_fast import visualize
    from lomar_fast.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=1)
    ckpt = save_checkpoint(model, tmp_path / "model.pth", args={"input_size": 64, "window_size": 3, "num_window": 2})
    image = tmp_path / "in.jpg"
    Image.new("RGB", (80, 70), (20, 180, 40)).save(image)
    (tmp_path / "file").write_text("a file")

    def run(out):
        visualize.main(["--checkpoint", str(ckpt), "--image", str(image), "--out", str(out)])

    real_load = visualize.load_weights
    monkeypatch.setattr(visualize, "load_weights", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    for out, message in ((tmp_path / "x.xyz", ": its extension .xyz names no picture format PIL writes in RGB; pass a "
                                               "file name such as x.png$"),
                         (tmp_path / "recon", ": it has no extension; pass a file name such as recon.png$"),
                         (tmp_path, " is a folder; pass a file name such as .*recon.png$"),
                         (tmp_path / "file" / "v.png", f": {tmp_path}/file is a file, not a folder; pass a path in "),
                         (image, " is the --image file; pass another file name$")):
        with pytest.raises(ConfigError, match=f"^--out {out}{message}"):
            run(out)
    monkeypatch.setattr(visualize, "load_weights", real_load)

    out = tmp_path / "recon.png"
    out.write_bytes(b"earlier")
    real_save = Image.Image.save

    def disk_full(self, fp, *a, **k):
        if isinstance(fp, io.BytesIO):  # the check of the format
            return real_save(self, fp, *a, **k)
        fp.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(ConfigError, match=f"^--out {out} cannot be written \\(No space left on device\\)"):
        run(out)
    assert out.read_bytes() == b"earlier"
    monkeypatch.undo()
    run(out)
    assert Image.open(out).format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.jpg", "model.pth", "recon.png"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_a_compiled_model_inside_the_deepspeed_engine_traces_without_graph_breaks(mini_demo, tmp_path,
                                                                                 in_process_world, scope):
    """The real pretraining loop with a DeepSpeed engine: dynamo traces the compiled blocks or model without a
    graph break. (nn.Module.compile() of the whole model traced the hooks the engine hangs on it and gave the
    whole frame up: the model ran eager between partial graphs.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pretrain.main(["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
                   "--output_dir", str(tmp_path / scope), "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
                   "--max_steps_per_epoch", "2", "--compile", "on", "--compile_scope", scope,
                   "--compile_backend", "eager"])
    assert counters["stats"]["unique_graphs"] >= 1 and counters["frames"]["total"] == counters["frames"]["ok"]
    assert not counters["graph_break"] and not counters["unimplemented"], {k: dict(v) for k, v in counters.items()}
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_compiler_failure_names_the_way_to_train_without_it(mini_demo, tmp_path, in_process_world):
    """torch.compile fails lazily, in the first step: the run stops with the compiler's error as the cause and
    a last line that says --compile off trains without it."""
    from torch._dynamo.backends.registry import register_backend
    from torch._dynamo.exc import TorchDynamoException

    from lomar_fast.errors import CompileFailed

    name = "lomar_test_failing_backend"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        @register_backend(name=name)
        def failing(gm, example_inputs):
            raise RuntimeError("this backend compiles nothing")

    torch._dynamo.reset()
    with pytest.raises(CompileFailed, match=r"torch.compile failed at step 0 \(compiled \(blocks, "
                                            rf"{name}; --compile on\)\): .*--compile off trains without it") as e:
        pretrain.main(["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
                       "--output_dir", str(tmp_path / "o"), "--batch_size", "8", "--epochs", "1",
                       "--warmup_epochs", "0", "--max_steps_per_epoch", "2", "--compile", "on",
                       "--compile_backend", name])
    assert isinstance(e.value.__cause__, TorchDynamoException)
    torch._dynamo.reset()


@pytest.mark.parametrize("scope, compiled", [("blocks", 2), ("model", 1)])
def test_compile_scope_and_mode_reach_torch_compile(mini_demo, tmp_path, monkeypatch, scope, compiled):
    import deepspeed

    from lomar_fast import trainer as trainer_mod
    from lomar_fast.config import PretrainConfig, parse_config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    monkeypatch.setattr(trainer_mod, "init_distributed", lambda device: (0, 1, 0))
    monkeypatch.setattr(deepspeed, "initialize", lambda model, optimizer, config: (model, optimizer, None, None))
    cfg = parse_config(["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
                        "--output_dir", str(tmp_path), "--compile", "--compile_scope", scope, "--compile_mode",
                        "max-autotune-no-cudagraphs"], PretrainConfig)
    t = trainer_mod.Trainer(cfg, "epoch")
    model = t.build(lambda: create_model(cfg.model, img_size=64, window_size=3, num_window=2, depth=2),
                    lambda m: param_groups_weight_decay(m, 0.05), betas=(0.9, 0.95))
    assert calls == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}] * compiled
    assert f"compiled ({scope}, inductor, max-autotune-no-cudagraphs; --compile on)" in t.describe(model, "")


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compile_flag_compiles_the_model_the_trainer_builds(mini_demo, tmp_path, monkeypatch, scope):
    """--compile --compile_scope S --compile_backend B: the trainer hands DeepSpeed a model whose blocks (or
    whole module) are compiled with B, and whose loss and gradients equal the eager model's (aot_eager: traced
    by dynamo and AOTAutograd, no code generation). --compile auto leaves it eager on a CPU."""
    import deepspeed

    from lomar_fast import trainer as trainer_mod
    from lomar_fast.config import PretrainConfig, parse_config

    monkeypatch.setattr(trainer_mod, "init_distributed", lambda device: (0, 1, 0))
    monkeypatch.setattr(deepspeed, "initialize", lambda model, optimizer, config: (model, optimizer, None, None))
    make = lambda: create_model(cfg.model, img_size=64, window_size=3, num_window=2, depth=2)  # noqa: E731
    base = ["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL]
    cfg = parse_config([*base, "--output_dir", str(tmp_path / "auto")], PretrainConfig)
    t = trainer_mod.Trainer(cfg, "epoch")
    plain = t.build(make, lambda m: param_groups_weight_decay(m, 0.05), betas=(0.9, 0.95))
    assert plain._compiled_call_impl is None and all(b._compiled_call_impl is None for b in plain.blocks)
    assert "eager (--compile auto: eager on cpu)" in t.describe(plain, "")
    cfg = parse_config([*base, "--output_dir", str(tmp_path / "o"), "--compile", "--compile_scope", scope,
                        "--compile_backend", "aot_eager"], PretrainConfig)
    t = trainer_mod.Trainer(cfg, "epoch")
    model = t.build(make, lambda m: param_groups_weight_decay(m, 0.05), betas=(0.9, 0.95))
    if scope == "model":  # the forward, so that hooks on the module (DeepSpeed's engine hangs some) stay outside
        assert "forward" in vars(model) and model._compiled_call_impl is None
    else:  # nn.Module.compile() of each block
        assert [m for m in [model, *model.blocks] if m._compiled_call_impl is not None] == list(model.blocks)
    assert f"compiled ({scope}, aot_eager; --compile on)" in t.describe(model, "")
    seed_shared(cfg.seed)
    eager = make()  # the same shared seed: the same initial weights
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=g)
    windows, masks = eager.sample(4, generator=g)
    losses = []
    for m in (model, eager):
        loss = m(images, windows, masks, validate=False)[0]
        loss.backward()
        losses.append((loss.detach(), m.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_zero0_on_one_rank_resumes_exactly_without_the_lone_all_reduce(mini_demo, tmp_path, in_process_world,
                                                                       capsys, monkeypatch):
    """--zero_stage 0 on one process: the trainer skips DeepSpeed's backward all-reduce (nothing to share), and a
    run stopped after its first epoch and resumed logs the straight run's losses."""
    from lomar_fast import ds_config, trainer

    skipped = []
    monkeypatch.setattr(trainer, "one_rank_engine",
                        lambda engine, world: skipped.append(ds_config.one_rank_engine(engine, world)) or skipped[-1])
    common = ["--data_path", str(mini_demo["train"]), "--deepspeed_config", "ds_configs/cpu.json", *SMALL,
              "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0", "--max_steps_per_epoch", "2",
              "--zero_stage", "0"]
    pretrain.main([*common, "--output_dir", str(tmp_path / "straight")])
    pretrain.main([*common, "--output_dir", str(tmp_path / "split"), "--exit_after_epochs", "1"])
    pretrain.main([*common, "--output_dir", str(tmp_path / "split"), "--resume", "auto"])

    def losses(run):
        recs = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "steps"]

    straight, split = losses("straight"), losses("split")
    assert len(straight) == 4 and split == straight, (straight, split)
    assert ", ZeRO-0, " in capsys.readouterr().out  # the run's opening line
    assert skipped == [True, True, True]

"""Training system on CPU: one-process run, two DeepSpeed ranks with resume, schedule, bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lomar_fast.engine import ConfigError, lr_at, param_groups_weight_decay, resolve_ds_config, set_lr
from lomar_fast.models import create_model

from launch import REPO, cpu_env, launch

SMALL = ["--model", "lomar_vit_tiny_patch16", "--input_size", "64", "--window_size", "3", "--num_window", "2",
         "--num_workers", "2", "--log_every", "1"]


@pytest.fixture(scope="module")
def demo(small_demo) -> Path:
    return small_demo["root"]


def run_pretrain(args: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    return launch("pretrain", args, ranks, timeout)


def step_losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "steps"]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def test_one_process_loss_falls_checkpoint_export(demo, tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(["--data_path", str(demo / "train.beton"), "--deepspeed_config", "ds_configs/cpu.json",
                         "--batch_size", "16", "--epochs", "3", "--warmup_epochs", "0", "--blr", "4e-3",
                         "--max_steps_per_epoch", "4", "--output_dir", str(out), *SMALL])
    _ok(proc)
    losses = [l for _, l in step_losses(out)]
    assert len(losses) == 12
    assert all(math.isfinite(l) for l in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, f"loss did not fall: {losses}"
    assert (out / "latest").read_text().strip() == "epoch0002"
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    assert "loss by epoch" in proc.stdout

    model_path = tmp_path / "model.pth"
    exp = subprocess.run([sys.executable, "-m", "lomar_fast.export", "--checkpoint", str(out), "--out", str(model_path)],
                         cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    _ok(exp)
    from lomar_fast.checkpoint import load_checkpoint

    model = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_checkpoint(model, model_path)  # strict: every key present and shaped right
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, fresh[k])]
    assert "blocks.0.attn.qkv.weight" in changed  # trained weights, not the init
    clf = create_model("vit_tiny_patch16", img_size=64, num_classes=8)
    report = clf.load_pretrained(model_path)
    assert "mask_token" in report["dropped"] and "blocks.0.attn.qkv.weight" in report["used"]


@pytest.mark.slow
def test_two_ranks_zero2_disjoint_data_and_exact_resume(demo, tmp_path):
    common = ["--data_path", str(demo / "train.beton"), "--deepspeed_config", "ds_configs/cpu.json",
              "--zero_stage", "2", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1", "--blr", "2e-3",
              "--max_steps_per_epoch", "3", "--save_every", "1", "--record_data_order", *SMALL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _ok(run_pretrain([*common, "--output_dir", str(straight)], ranks=2))
    _ok(run_pretrain([*common, "--output_dir", str(split), "--exit_after_epochs", "1"], ranks=2))
    assert (split / "latest").read_text().strip() == "epoch0000"
    resumed = run_pretrain([*common, "--output_dir", str(split), "--resume", "auto"], ranks=2)
    _ok(resumed)
    assert "resumed at epoch 1 step 3" in resumed.stdout

    # every rank reads its own disjoint shard; together they cover the dataset
    n_images = 128
    for epoch in (0, 1):
        r0 = json.loads((straight / "data_order" / f"rank0_epoch{epoch}.json").read_text())
        r1 = json.loads((straight / "data_order" / f"rank1_epoch{epoch}.json").read_text())
        assert set(r0).isdisjoint(r1)
        assert sorted(r0 + r1) == list(range(n_images))
        assert r0 == json.loads((split / "data_order" / f"rank0_epoch{epoch}.json").read_text())
    assert json.loads((straight / "data_order" / "rank0_epoch0.json").read_text()) != json.loads(
        (straight / "data_order" / "rank0_epoch1.json").read_text())

    a, b = step_losses(straight), step_losses(split)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (s, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-5), f"step {s}: straight {la} vs resumed {lb}"


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


def _bad(args: list[str], tmp_path: Path) -> str:
    proc = run_pretrain(["--deepspeed_config", "ds_configs/cpu.json", *args], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "latest").exists()
    return proc.stderr


def test_bad_inputs_stop_before_training(demo, tmp_path):
    data = ["--data_path", str(demo / "train.beton")]
    out = ["--output_dir", str(tmp_path / "out")]
    assert "--data_path" in _bad(["--data_path", str(tmp_path / "missing.beton"), *out], tmp_path)
    bad_json = tmp_path / "ds.json"
    bad_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32}))
    err = _bad([*data, *out, "--deepspeed_config", str(bad_json), "--batch_size", "8"], tmp_path)
    assert "train_micro_batch_size_per_gpu=32" in err and "--batch_size 8" in err
    err = _bad([*data, *out, "--input_size", "64", "--window_size", "3", "--num_window", "3"], tmp_path)
    assert "num_window 3" in err and "2" in err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "--output_dir" in _bad([*data, "--output_dir", str(blocker / "sub")], tmp_path)
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text("batch_sise: 8\n")
    assert "batch_sise" in _bad([*data, *out, "--config", str(yaml_cfg)], tmp_path)


NAN_AFTER = """
import sys, torch
import lomar_fast.models.lomar as lm
import lomar_fast.pretrain as pt
calls = {"n": 0}
real = lm.LoMaR.forward_loss
def forward_loss(self, *a):
    calls["n"] += 1
    loss = real(self, *a)
    return loss * float("nan") if calls["n"] > 2 else loss
lm.LoMaR.forward_loss = forward_loss
sys.argv = ["pretrain"] + sys.argv[1:]
try:
    pt.main(sys.argv[1:])
except FloatingPointError as e:
    print("STOPPED:", e)
    sys.exit(3)
"""


def test_non_finite_loss_stops_and_keeps_last_checkpoint(demo, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_AFTER)
    proc = subprocess.run([sys.executable, str(script), "--data_path", str(demo / "train.beton"),
                           "--deepspeed_config", "ds_configs/cpu.json", "--batch_size", "16", "--epochs", "3",
                           "--warmup_epochs", "0", "--max_steps_per_epoch", "2", "--save_every", "1",
                           "--output_dir", str(out), *SMALL], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "STOPPED: loss became nan at epoch 1 step 3" in proc.stdout
    assert "--resume auto" in proc.stdout
    # epoch 0 finished and was saved; nothing after the bad step was written
    assert (out / "latest").read_text().strip() == "epoch0000"
    assert not (out / "epoch0001").exists()

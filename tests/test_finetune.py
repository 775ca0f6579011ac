"""Fine-tuning on CPU: layer-decay groups, checkpoint loading, learning on the demo classes, evaluation
that counts every val image exactly once on one and two ranks, --eval, resume."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lomar_fast.checkpoint import CheckpointMismatch, save_checkpoint
from lomar_fast.layer_decay import param_groups_layer_decay
from lomar_fast.models import create_model
from lomar_fast.models.classifier import describe_load, load_finetune_weights
from lomar_fast.optim import build_adamw, set_lr

from launch import launch

TORCH_LINEAR = torch.nn.functional.linear  # at collection, before any test has started DeepSpeed
PUBLISHED_ONLY = {"mask_token", "pos_embed", "norm.weight", "norm.bias", "encoder_pred.weight", "encoder_pred.bias"}


def run_finetune(args: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    return launch("finetune", args, ranks, timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def demo(small_demo) -> dict:
    """Demo train set (8 classes x 16) and a val set of 29 images (see conftest.small_demo)."""
    return small_demo


# ------------------------------------------------------------------------------------- layer decay
def test_layer_decay_groups_match_formula_12_blocks():
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=10)
    assert len(model.blocks) == 12
    decay, wd = 0.75, 0.05
    groups = param_groups_layer_decay(model, wd, decay)
    params = dict(model.named_parameters())
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(params) and len(seen) == len(set(seen))  # every parameter exactly once

    def expected_layer(name: str) -> int:
        if name.startswith(("patch_embed.", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        assert name.startswith(("fc_norm.", "head.")), name
        return 13

    for g in groups:
        for n in g["names"]:
            assert g["layer_id"] == expected_layer(n), n
            assert g["lr_scale"] == pytest.approx(decay ** (13 - expected_layer(n))), n
            no_wd = params[n].ndim <= 1 or n.endswith(".bias") or n == "cls_token"
            assert g["weight_decay"] == (0.0 if no_wd else wd), n
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["fc_norm.weight"]["weight_decay"] == 0.0
    assert by_name["blocks.11.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75)
    assert by_name["blocks.0.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75 ** 12)
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** 13)
    assert by_name["cls_token"]["weight_decay"] == 0.0 and by_name["blocks.3.attn.rpe_k.lookup_table_weight"]["weight_decay"] == 0.05

    # the per-step lr update applies every group's scale
    opt = build_adamw(groups, 1e-3, betas=(0.9, 0.999))
    set_lr(opt, 2e-3)
    for g, src in zip(opt.param_groups, groups):
        assert g["lr"] == pytest.approx(2e-3 * src["lr_scale"])
        assert "names" not in g


# ------------------------------------------------------------------------------------ weight loading
def test_published_checkpoint_loads_every_encoder_key(tmp_path):
    torch.manual_seed(0)
    lomar = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=3)
    published = {k: v.clone() for k, v in lomar.state_dict().items()}  # the published layout, by design
    assert PUBLISHED_ONLY <= set(published)
    path = tmp_path / "published.pth"
    torch.save({"model": published, "epoch": 1599}, path)

    # fine-tuning at a larger size than pretraining: iRPE tables carry over without interpolation
    clf = create_model("vit_tiny_patch16", img_size=96, num_classes=8, depth=3)
    head_before = clf.head.weight.clone()
    report = load_finetune_weights(clf, str(path))
    encoder_keys = {k for k in clf.state_dict() if not k.startswith(("fc_norm.", "head."))}
    assert set(report["used"]) == encoder_keys
    assert set(report["dropped"]) == PUBLISHED_ONLY
    assert set(report["initialized"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    sd = clf.state_dict()
    for k in encoder_keys:
        assert torch.equal(sd[k], published[k]), k
    assert torch.equal(clf.head.weight, head_before) and clf.head.weight.abs().max() < 1e-3  # small fresh head
    msg = describe_load(report, str(path))
    assert "mask_token" in msg and "encoder_pred.weight" in msg and "head.weight" in msg
    assert clf(torch.randn(2, 3, 96, 96)).shape == (2, 8)

    # a fine-tuned classifier checkpoint brings its fc_norm and head along
    torch.nn.init.normal_(clf.head.weight)
    save_checkpoint(clf, tmp_path / "best.pth")
    again = create_model("vit_tiny_patch16", img_size=64, num_classes=8, depth=3)
    report = load_finetune_weights(again, str(tmp_path / "best.pth"))
    assert report["initialized"] == [] and report["dropped"] == []
    assert torch.equal(again.head.weight, clf.head.weight)

    # another class count: the trained fc_norm comes along, only the head that does not fit starts fresh
    other = create_model("vit_tiny_patch16", img_size=64, num_classes=5, depth=3)
    torch.nn.init.normal_(clf.fc_norm.weight)
    save_checkpoint(clf, tmp_path / "best.pth")
    report = load_finetune_weights(other, str(tmp_path / "best.pth"))
    assert report["initialized"] == ["head.bias", "head.weight"]
    assert set(report["dropped"]) == {"head.bias", "head.weight"}
    assert torch.equal(other.fc_norm.weight, clf.fc_norm.weight)

    # cls-token mode (--no_global_pool): the pretrained final norm is the cls token's LayerNorm, as in MAE
    cls_mode = create_model("vit_tiny_patch16", img_size=64, num_classes=8, depth=3, global_pool=False)
    with torch.no_grad():
        published["norm.weight"] = torch.rand_like(published["norm.weight"])
    torch.save({"model": published}, path)
    report = load_finetune_weights(cls_mode, str(path))
    assert report["initialized"] == ["head.bias", "head.weight"]
    assert {"norm.weight", "norm.bias"} <= set(report["used"]) and "norm.weight" not in report["dropped"]
    assert torch.equal(cls_mode.fc_norm.weight, published["norm.weight"])
    x = torch.randn(2, 3, 64, 64)
    feats = cls_mode.forward_features(x)
    want = torch.nn.functional.layer_norm(feats, (feats.shape[-1],), published["norm.weight"], published["norm.bias"],
                                          1e-6)[:, 0]
    torch.testing.assert_close(cls_mode.forward_head(feats, pre_logits=True), want)

    # a depth mismatch names the fix
    deeper = create_model("vit_tiny_patch16", img_size=64, num_classes=8, depth=4)
    with pytest.raises(CheckpointMismatch, match="--depth 3"):
        load_finetune_weights(deeper, str(path))
    with pytest.raises(CheckpointMismatch, match=f"^--finetune {path}: pretrained weights do not fit"):
        load_finetune_weights(deeper, torch.load(path, weights_only=True), f"--finetune {path}")


# ------------------------------------------------------------------------------------------ training
SMALL = ["--model", "vit_tiny_patch16", "--depth", "4", "--input_size", "64", "--num_workers", "1",
         "--deepspeed_config", "ds_configs/cpu.json"]


def _eval_line(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if l.startswith("eval "))
    return {"top1": float(line.split("top-1 ")[1].split("%")[0]), "loss": float(line.split("loss ")[1].split()[0]),
            "line": line}


@pytest.mark.slow
def test_evaluation_runs_a_compiled_model_eagerly():
    """evaluate() adds no graph to a compiled model (its no-grad and 1-image padding batches would), and
    counts the same as the eager model; outside it the model runs compiled."""
    from lomar_fast.compilation import apply_compile
    from lomar_fast.data.shard import Shard
    from lomar_fast.evaluate import evaluate

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2)
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g), torch.tensor([0, 1, 2, 1]))
               for _ in range(2)]
    shard = Shard(loader=batches, n=8, total=8, num_batches=3, batch_size=4, input_size=32, device=torch.device("cpu"))
    want = evaluate(model, shard, torch.float32, 3)
    assert apply_compile(model, "blocks", backend=counting_backend) == 2
    assert evaluate(model, shard, torch.float32, 3) == want and graphs == []
    model(batches[0][0].permute(0, 3, 1, 2).float())
    assert graphs  # the same model outside evaluate() runs its compiled blocks


@pytest.mark.slow
def test_one_rank_learns_demo_classes_eval_and_resume(demo, tmp_path, in_process_world, capsys):
    """Training, --eval and --resume auto, each run in this process as a world of one (the launcher's start is
    the 2-rank test's)."""
    from lomar_fast import finetune

    torch.manual_seed(0)
    init = tmp_path / "pretrained.pth"  # a (random) pretraining export: exercises --finetune's loading
    save_checkpoint(create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=4), init)
    out = tmp_path / "ft"
    common = ["--data_path", str(demo["train"]), "--val_path", str(demo["val"]), "--finetune", str(init),
              "--batch_size", "16", "--blr", "2e-3", "--warmup_epochs", "1", "--mixup", "0", "--cutmix", "0",
              "--reprob", "0", "--aa", "none", "--drop_path", "0", "--layer_decay", "0.9", "--log_every", "8",
              "--save_every", "3",
              "--keep_last", "2", "--output_dir", str(out), *SMALL]
    finetune.main([*common, "--epochs", "10"])
    stdout = capsys.readouterr().out
    assert "dropped 6: encoder_pred.bias, encoder_pred.weight, mask_token, norm.bias, norm.weight, pos_embed" in stdout
    epochs = _records(out, "epoch")
    assert len(epochs) == 10 and epochs[-1]["step"] == 10 * 8  # 128 images / 16
    assert all(e["val_n"] == demo["n_val"] for e in epochs)  # every val image exactly once, each epoch
    best = max(e["val_top1"] for e in epochs)
    best_epoch = [e["val_top1"] for e in epochs].index(best)
    assert best >= 45.0, f"8 classes (chance 12.5%): best val top-1 only {best}"
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_top1"] == best and summary["best_epoch"] == best_epoch
    # saved at epochs 2, 5, 8 and 9 (the end), the newest two kept; best tags keep the newest two bests
    assert sorted(p.name for p in out.glob("last_epoch*")) == ["last_epoch0008", "last_epoch0009"]
    assert (out / "latest").read_text().strip() == "last_epoch0009"
    assert f"best_epoch{best_epoch:04d}" in [p.name for p in out.glob("best_epoch*")]
    assert len(list(out.glob("best_epoch*"))) <= 2 and (out / "checkpoint-best.pth").is_file()

    # --eval of the DeepSpeed best tag reproduces the best epoch's numbers (checkpoint-best.pth: the 2-rank test),
    # with the model settings saved with the run
    res = finetune.main(["--eval", "--resume", str(out / "best"), "--val_path", str(demo["val"]), "--batch_size", "5",
                         "--num_workers", "1", "--deepspeed_config", "ds_configs/cpu.json"])
    stdout = capsys.readouterr().out
    assert "model=vit_tiny_patch16, depth=4, input_size=64" in stdout
    tag = _eval_line(stdout)
    assert f"best_epoch{best_epoch:04d}" in tag["line"] and tag["top1"] == pytest.approx(best, abs=0.01)
    assert res["val_loss"] == pytest.approx(epochs[best_epoch]["val_loss"], rel=1e-6)
    assert res["val_n"] == demo["n_val"] and f"({demo['n_val']} images" in tag["line"]

    # --resume auto continues after the last epoch with the best result carried over
    finetune.main([*common, "--epochs", "11", "--resume", "auto"])
    stdout = capsys.readouterr().out
    assert "at epoch 10 step 80" in stdout and "last_epoch0009" in stdout
    last = _records(out, "epoch")[-1]
    assert last["epoch"] == 10 and last["step"] == 88 and last["best_top1"] >= best


@pytest.mark.slow
def test_a_two_rank_zero2_fine_tune_continues_on_one_rank_with_its_layer_decay(demo, tmp_path):
    """The shipped ZeRO-2 config on 2 ranks for one epoch, then --resume auto on one rank with the same 16 images
    per step: the tag goes through DeepSpeed's universal checkpoint, and every parameter group keeps its
    layer-decay lr_scale (the lowest group's lr stays 0.65 ** (depth + 1) of the head's)."""
    out = tmp_path / "ft"
    args = ["--data_path", str(demo["train"]), "--val_path", str(demo["val"]), "--model", "vit_tiny_patch16",
            "--depth", "2", "--input_size", "64", "--num_workers", "1", "--deepspeed_config", "ds_configs/zero2.json",
            "--epochs", "2", "--warmup_epochs", "0", "--max_steps_per_epoch", "2", "--log_every", "1",
            "--output_dir", str(out)]
    _ok(run_finetune([*args, "--batch_size", "8", "--exit_after_epochs", "1"], ranks=2))
    one = run_finetune([*args, "--batch_size", "16", "--resume", "auto"])
    _ok(one)
    assert "--resume: converted" in one.stdout and "world size 2 x micro-batch 8" in one.stdout
    assert not (out / "universal").exists() and (out / "latest").read_text().strip() == "last_epoch0001"
    steps = _records(out, "steps")
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1]
    assert all(r["lr_low"] / r["lr"] == pytest.approx(0.65 ** 3) for r in steps)
    assert [e["val_n"] for e in _records(out, "epoch")] == [demo["n_val"]] * 2


@pytest.mark.slow
def test_two_ranks_zero3_autocast_evaluates_each_val_image_once_keeps_lr_scale(demo, tmp_path, in_process_world,
                                                                                capsys):
    """The shipped ZeRO-3 config (torch_autocast, bf16 matmuls) on 2 ranks with RandAugment, Mixup/CutMix and
    erasing on: 29 val images (14 + 15) evaluated with the same number of forwards on both ranks (padded),
    each image once: the counts, top-1 and loss equal a one-rank evaluation of the saved weights."""
    out = tmp_path / "ft2"
    common = ["--model", "vit_tiny_patch16", "--depth", "4", "--input_size", "64", "--num_workers", "1",
              "--deepspeed_config", "ds_configs/zero3.json"]
    proc = run_finetune(["--data_path", str(demo["train"]), "--val_path", str(demo["val"]), "--batch_size", "8",
                         "--epochs", "2", "--warmup_epochs", "1", "--max_steps_per_epoch", "2", "--log_every", "1",
                         "--output_dir", str(out), *common], ranks=2)
    _ok(proc)
    assert "torch.bfloat16, ZeRO-3" in proc.stdout  # the engine mode's compute dtype
    epochs = _records(out, "epoch")
    assert [e["val_n"] for e in epochs] == [demo["n_val"]] * 2
    assert all(0 < e["loss"] < 10 for e in epochs)
    # the lr of the lowest layer group (patch_embed) read back from DeepSpeed's ZeRO-3 optimizer
    steps = [r for r in _records(out, "steps") if r["lr"] > 0]
    assert steps and all(r["lr_low"] / r["lr"] == pytest.approx(0.65 ** 5) for r in steps)  # depth 4: 0.65 ** (4 + 1)
    assert (out / "latest").read_text().strip() == "last_epoch0001"
    best_pth = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best_pth["model"]["head.weight"].dtype == torch.float32 and best_pth["model"]["head.weight"].shape[0] == 8
    best = max(epochs, key=lambda e: e["val_top1"])
    # --eval of checkpoint-best.pth on one rank (model settings read from the checkpoint), in this process
    from lomar_fast import finetune

    finetune.main(["--eval", "--finetune", str(out / "checkpoint-best.pth"), "--val_path", str(demo["val"]),
                   "--batch_size", "7", "--num_workers", "1", "--deepspeed_config", "ds_configs/zero3.json"])
    stdout = capsys.readouterr().out
    one = _eval_line(stdout)
    assert f"({demo['n_val']} images" in one["line"] and "depth=4" in stdout
    # ZeRO-3 left torch.nn.functional.linear alone ("memory_efficient_linear": false): DeepSpeed's replacement
    # persists for the rest of the process, and under torch 2.11 a torch.compile'd model built after it
    # got weight gradients unlike the eager model's
    assert torch.nn.functional.linear is TORCH_LINEAR
    assert one["top1"] == pytest.approx(best["val_top1"], abs=0.01)
    assert one["loss"] == pytest.approx(best["val_loss"], rel=2e-3)
    # --eval --resume of the run's best tag on one rank: the two ranks' ZeRO-3 partitions consolidated. DeepSpeed's
    # own module-only load failed on another rank count, and read the tag `latest` names whatever tag it was given
    (out / "latest").write_text("a_tag_that_is_not_there")
    finetune.main(["--eval", "--resume", str(out / "best"), "--val_path", str(demo["val"]), "--batch_size", "7",
                   "--num_workers", "1", "--deepspeed_config", "ds_configs/zero3.json"])
    tag = _eval_line(capsys.readouterr().out)
    assert "best_epoch" in tag["line"], tag["line"]
    assert tag["top1"] == pytest.approx(best["val_top1"], abs=0.01)
    assert tag["loss"] == pytest.approx(best["val_loss"], rel=2e-3)


def test_bad_inputs_stop_before_any_work(mini_demo, tmp_path, monkeypatch):
    from lomar_fast import trainer
    from lomar_fast.errors import ConfigError
    from lomar_fast.finetune import main

    monkeypatch.setattr(trainer, "init_distributed", lambda *a: (_ for _ in ()).throw(AssertionError("started")))
    out = ["--output_dir", str(tmp_path / "o")]
    data = ["--data_path", str(mini_demo["train"]), "--val_path", str(mini_demo["val"])]
    for args, message in ((["--val_path", str(tmp_path / "nope.beton")], "--val_path .*nope.beton"),
                          (["--finetune", str(tmp_path / "missing.pth")], "--finetune"),
                          (["--batch_size", "7"], "even"),  # mixup mixes pairs
                          (["--nb_classes", "4"], "--nb_classes 4"),  # classes.json lists 8
                          (["--layer_decay", "1.5"], "--layer_decay"),
                          (["--remode", "noise"], "remode = 'noise' must be one of pixel, rand, const"),
                          (["--aa", "rand-m9-foo"], "--aa: .*rand-m9-foo"),
                          (["--model", "lomar_vit_tiny_patch16"], "not a fine-tuning model")):
        with pytest.raises(ConfigError, match=message):
            main([*SMALL, *out, *data, *args])
    with pytest.raises(ConfigError, match="--eval needs"):
        main([*SMALL, "--eval", "--val_path", str(mini_demo["val"])])
    # without a classes.json to count them, the labels themselves must fit the head (they failed in the loss, or
    # on a GPU as a device-side assert)
    bare = tmp_path / "bare"
    bare.mkdir()
    for split in ("train", "val"):
        shutil.copy(mini_demo[split], bare / f"{split}.beton")
    unlisted = ["--data_path", str(bare / "train.beton"), "--val_path", str(bare / "val.beton")]
    with pytest.raises(ConfigError, match=f"--data_path {bare}/train.beton holds labels 0 to 7, outside the 4 classes "
                                          f"of the head \\(0 to 3\\); pass --nb_classes 8 or more"):
        main([*SMALL, *out, *unlisted, "--nb_classes", "4"])
    _fine_tuned(tmp_path / "best4.pth", classes=4)
    with pytest.raises(ConfigError, match=f"--val_path {bare}/val.beton holds labels 0 to 7, outside the 4 classes "
                                          f"of the head .*; evaluate it on data of the classes"):
        main(["--eval", "--finetune", str(tmp_path / "best4.pth"), *unlisted, "--deepspeed_config", "ds_configs/cpu.json"])
    # a file that is not a weights file: one line naming --finetune, before the run starts
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for mode in ([], ["--eval"]):
        with pytest.raises(CheckpointMismatch, match=f"^--finetune {tmp_path}/notes.txt is not a weights file; pass "):
            main([*SMALL, *out, *data, *mode, "--finetune", str(tmp_path / "notes.txt")])
    assert not (tmp_path / "o").exists()


def _classes(folder: Path, n: int) -> Path:
    """A placeholder val.beton (bad-input checks stop before any read) with a classes.json of ``n`` classes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps([f"c{i}" for i in range(n)]))
    (folder / "val.beton").write_bytes(b"x")
    return folder / "val.beton"


def _fine_tuned(path: Path, classes: int = 8, **args) -> dict:
    """Write a tiny fine-tuned classifier to ``path`` in checkpoint-best.pth's layout (its settings under ``args``);
    returns its state dict."""
    settings = {"model": "vit_tiny_patch16", "depth": 2, "input_size": 64, "global_pool": True,
                "interpolation": "bicubic", **args}
    model = create_model(settings["model"], img_size=settings["input_size"], num_classes=classes,
                         depth=settings["depth"], global_pool=settings["global_pool"])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(sd, path, epoch=0, args=settings, nb_classes=classes)
    return sd


def _run_tag(out: Path, tag: str, config: dict, module: dict, zero_stage: int = 2) -> Path:
    """A committed DeepSpeed tag as far as the checks before any work read it: ``complete.json`` with the run's
    settings, and the module weights in ``mp_rank_00_model_states.pt``."""
    from lomar_fast import run_dir

    (out / tag).mkdir(parents=True)
    torch.save({"module": module, "param_shapes": None}, out / tag / "mp_rank_00_model_states.pt")
    run_dir.commit(out, tag, {"epoch": 0, "run": {"world_size": 1, "micro_batch": 8, "accum_iter": 1,
                                                    "zero_stage": zero_stage, "config": config}}, update_latest=True)
    return out


def test_eval_refuses_weights_without_the_classifier_and_another_class_count_before_any_work(tmp_path, monkeypatch):
    """--eval of a pretraining export evaluated a randomly initialized head (top-1 0%, exit 0), and an explicit
    --nb_classes other than the head's dropped the trained head for a random one; a val set with more classes
    than the head failed inside the evaluation (IndexError)."""
    from lomar_fast import trainer
    from lomar_fast.errors import ConfigError
    from lomar_fast.finetune import main

    monkeypatch.setattr(trainer, "init_distributed", lambda *a: (_ for _ in ()).throw(AssertionError("started")))
    export = tmp_path / "model.pth"
    save_checkpoint(create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=2), export)
    best = tmp_path / "checkpoint-best.pth"
    _fine_tuned(best)
    val8, val10 = _classes(tmp_path / "v8", 8), _classes(tmp_path / "v10", 10)
    base = ["--eval", "--deepspeed_config", "ds_configs/cpu.json", "--output_dir", str(tmp_path / "o")]
    for args, message in (
            (["--finetune", str(export), "--val_path", str(val8), "--model", "vit_tiny_patch16", "--depth", "2"],
             "--eval --finetune .*model.pth holds no classifier head \\(head.weight, head.bias; .*pass a fine-tuned "
             "checkpoint-best.pth, or --resume a fine-tuning run's --output_dir"),
            (["--finetune", str(best), "--val_path", str(val8), "--nb_classes", "9"],
             "--nb_classes 9 differs from the 8 classes of the head in --finetune .*checkpoint-best.pth"),
            (["--finetune", str(best), "--val_path", str(val10)],
             "--val_path .*v10/val.beton has 10 classes \\(its classes.json\\), the head in --finetune "
             ".*checkpoint-best.pth only 8")):
        with pytest.raises(ConfigError, match=message):
            main([*base, *args])
    assert not (tmp_path / "o").exists()


def test_eval_of_a_checkpoint_without_fc_norm_stops_before_evaluating(mini_demo, tmp_path, in_process_world,
                                                                      monkeypatch):
    """Weights with a head but not every other classifier tensor (here fc_norm) left them randomly initialized
    in the evaluated model: --eval refuses them, naming the tensors, before the evaluation."""
    from lomar_fast import finetune
    from lomar_fast.errors import ConfigError

    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))
    best = tmp_path / "checkpoint-best.pth"
    sd = _fine_tuned(best)
    save_checkpoint({k: v for k, v in sd.items() if not k.startswith("fc_norm.")}, best,
                    args={"model": "vit_tiny_patch16", "depth": 2, "input_size": 64})
    with pytest.raises(ConfigError, match="--eval --finetune .*checkpoint-best.pth does not hold fc_norm.bias, "
                                          "fc_norm.weight of this classifier \\(a model that pools by its cls token "
                                          "has no fc_norm: add --no_global_pool\\).*pass a fine-tuned checkpoint-best"):
        finetune.main(["--eval", "--finetune", str(best), "--val_path", str(mini_demo["val"]), "--num_workers", "1",
                       "--deepspeed_config", "ds_configs/cpu.json"])


def test_eval_resume_takes_the_runs_model_settings_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    """--eval --resume RUN without the training flags failed loading the tag with a 179-line size-mismatch
    traceback, a pretraining run with DeepSpeed's missing keys, and an explicit --input_size silently evaluated at
    another size: the run's saved settings are taken (a flag the user gave is kept and said so), a pretraining run
    and flags that cannot load the weights are one error before any work."""
    from lomar_fast import trainer
    from lomar_fast.config import FinetuneConfig, parse_config
    from lomar_fast.errors import ConfigError
    from lomar_fast.finetune import eval_weights, main

    monkeypatch.setattr(trainer, "init_distributed", lambda *a: (_ for _ in ()).throw(AssertionError("started")))
    sd = _fine_tuned(tmp_path / "best.pth")
    config = {"model": "vit_tiny_patch16", "depth": 2, "input_size": 64, "global_pool": True, "nb_classes": None,
              "interpolation": "area", "data_path": "data/train.beton"}
    run = _run_tag(tmp_path / "ft", "last_epoch0000", config, sd)
    pre = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=2)
    pretrain = _run_tag(tmp_path / "pre", "epoch0000", {"model": "lomar_vit_tiny_patch16", "input_size": 64},
                        pre.state_dict())
    val8, val10 = _classes(tmp_path / "v8", 8), _classes(tmp_path / "v10", 10)
    base = ["--eval", "--deepspeed_config", "ds_configs/cpu.json", "--val_path", str(val8)]

    cfg = parse_config([*base, "--resume", str(run)], FinetuneConfig)
    rows, weights, notes = eval_weights(cfg, None)
    assert (cfg.model, cfg.depth, cfg.input_size, cfg.interpolation, rows) == ("vit_tiny_patch16", 2, 64, "area", 8)
    assert weights == f"--resume {run}/last_epoch0000"
    assert notes == [f"from the training settings of {weights}: model=vit_tiny_patch16, depth=2, input_size=64, "
                     f"interpolation=area"]
    cfg = parse_config([*base, "--resume", str(run), "--input_size", "96"], FinetuneConfig)
    assert eval_weights(cfg, None)[2][1] == f"--input_size 96 given: {weights} was trained with input_size 64"
    assert cfg.input_size == 96 and cfg.depth == 2
    # a ZeRO-3 run's weights load only into a ZeRO-3 engine (cpu.json is ZeRO-2: DeepSpeed's bare AssertionError)
    run3 = _run_tag(tmp_path / "ft3", "last_epoch0000", config, sd, zero_stage=3)
    cfg = parse_config([*base, "--resume", str(run3)], FinetuneConfig)
    assert "zero_stage=3" in eval_weights(cfg, None)[2][0] and cfg.zero_stage == 3
    with pytest.raises(ConfigError, match="--zero_stage 2 cannot load --resume .*ft3/last_epoch0000, saved under "
                                          "ZeRO-3; leave --zero_stage out"):
        eval_weights(parse_config([*base, "--resume", str(run3), "--zero_stage", "2"], FinetuneConfig), None)
    cfg = parse_config([*base, "--resume", str(run), "--deepspeed_config", "ds_configs/zero3.json"], FinetuneConfig)
    eval_weights(cfg, None)
    assert cfg.zero_stage == 2  # and the other way round

    for args, message in (
            (["--resume", str(pretrain)], "--eval --resume .*pre/epoch0000 is a pretraining checkpoint "
                                          "\\(lomar_vit_tiny_patch16\\), which has no classifier to evaluate"),
            (["--resume", str(run), "--model", "vit_small_patch16"],
             "--model vit_small_patch16 differs from the model vit_tiny_patch16 of --resume .*last_epoch0000; leave "
             "--model out"),
            (["--resume", str(run), "--depth", "3"], "--depth 3 differs from the 2 blocks of --resume"),
            (["--resume", str(run), "--nb_classes", "10"], "--nb_classes 10 differs from the 8 classes of the head "
                                                           "in --resume .*last_epoch0000"),
            (["--resume", str(run), "--val_path", str(val10)], "--val_path .*v10/val.beton has 10 classes"),
            (["--resume", "auto", "--output_dir", str(tmp_path / "empty")],
             "--eval --resume auto: no complete checkpoint in --output_dir .*empty")):
        with pytest.raises(ConfigError, match=message):
            main([*base, *args])

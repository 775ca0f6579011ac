"""k-NN monitor (CLI, pretraining hook, the vote itself) and the timm registration."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import lomar_fast.timm_models  # noqa: F401  (registers the timm models)
from lomar_fast.checkpoint import save_checkpoint
from lomar_fast.errors import ConfigError
from lomar_fast.knn import build_encoder, encoder_shape, knn_eval, knn_predict, main as knn_main
from lomar_fast.models import create_model

from launch import REPO, VENV_BIN, cpu_env, free_port





# ------------------------------------------------------------------------------------------- k-NN
def test_knn_vote_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    val = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=1)
    k, t = 5, 0.07
    scores = knn_predict(train, labels, val, 4, k=k, temperature=t, chunk=3)
    for i in range(7):
        sims = [(float(val[i] @ train[j]), int(labels[j])) for j in range(50)]
        sims.sort(reverse=True)
        expect = [0.0] * 4
        for s, c in sims[:k]:
            expect[c] += math.exp(s / t)
        assert scores[i].tolist() == pytest.approx(expect, rel=1e-4)


def test_encoder_shape_from_checkpoint_and_self_retrieval(mini_demo, tmp_path):
    torch.manual_seed(0)
    lomar = create_model("lomar_vit_small_patch16", img_size=64, window_size=3, num_window=2, depth=2)
    save_checkpoint(lomar, tmp_path / "small.pth")
    sd = torch.load(tmp_path / "small.pth", weights_only=True)["model"]
    assert encoder_shape(sd) == dict(embed_dim=384, depth=2, num_heads=6, patch_size=16)
    enc = build_encoder(tmp_path / "small.pth", input_size=64)
    assert "mask_token" in enc.load_report["dropped"]
    # val = train and k = 1: every image's nearest neighbour is itself, so features and labels line up
    res = knn_eval(enc, mini_demo["train"], mini_demo["train"], input_size=64, batch_size=5, k=1, num_workers=2)
    assert res["top1"] == 100.0 and res["n_val"] == res["n_train"] == mini_demo["n_train"]


def test_a_cls_token_classifier_is_read_with_its_own_pooling(tmp_path):
    """A classifier fine-tuned with --no_global_pool is scored on its cls token through its fc_norm, as it was
    trained (the args in its checkpoint say so); a pooled one on the mean of its patch tokens."""
    torch.manual_seed(0)
    clf = create_model("vit_tiny_patch16", img_size=64, num_classes=4, depth=2, global_pool=False).eval()
    with torch.no_grad():
        clf.fc_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 64, 64)
    want = torch.nn.functional.normalize(clf.forward_head(clf.forward_features(x), pre_logits=True), dim=-1)
    enc = build_encoder({"model": clf.state_dict(), "args": {"global_pool": False}}, input_size=64)
    assert enc.vit.global_pool is False
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)
    pooled = build_encoder({"model": clf.state_dict(), "args": {"global_pool": True}}, input_size=64)
    assert pooled.vit.global_pool is True and (pooled(x) - want).abs().max() > 1e-3
    for size in (150, -16, 0):  # -16 passed the check and failed in the iRPE buckets
        with pytest.raises(ConfigError, match=f"--input_size {size} must be a positive multiple of the patch size 16"):
            build_encoder({"model": clf.state_dict()}, input_size=size)


@pytest.mark.slow
def test_knn_pretrained_beats_random_and_matches_the_pretraining_monitor(pretrain_run, tmp_path):
    demo = pretrain_run["demo"]
    epochs = [r for r in map(json.loads, (pretrain_run["out"] / "log.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    assert [("knn_top1" in e) for e in epochs] == [False, False, True]  # --knn_every 3 of 3 epochs
    common = ["--train", str(demo["train"]), "--val", str(demo["val"]), "--input_size", "64", "--num_workers", "1"]
    trained = knn_main(["--checkpoint", str(pretrain_run["model"]), *common])
    torch.manual_seed(1)
    save_checkpoint(create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2),
                    tmp_path / "random.pth")
    # the random encoder through knn.py on two ranks under torchrun (each rank a slice, features all-gathered)
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "-m", "lomar_fast.knn", "--checkpoint", str(tmp_path / "random.pth"), *common],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("k-NN top-1 ")]  # printed by rank 0 alone
    random_init = {"top1": float(line.split()[2].rstrip("%"))}
    assert f"{demo['n_train']} train / {demo['n_val']} val images" in line
    assert trained["n_val"] == demo["n_val"] and trained["n_train"] == demo["n_train"]
    for res in (trained, random_init):
        assert res["top1"] * demo["n_val"] / 100 == pytest.approx(round(res["top1"] * demo["n_val"] / 100), abs=0.01)
    # 12 steps of pretraining already make the features better neighbours than a random encoder's
    assert trained["top1"] > random_init["top1"], (trained, random_init)
    # the monitor inside the 2-rank pretraining (each rank a slice, features all-gathered) saw the same weights as
    # the exported file, evaluated here on one rank: the same answer
    assert epochs[-1]["knn_weights_l1"] == pytest.approx(trained["weights_l1"], rel=1e-9)
    assert epochs[-1]["knn_top1"] == pytest.approx(trained["top1"], abs=100 / demo["n_val"] + 1e-6)


def test_knn_loaders_are_built_once_per_file_and_setting(mini_demo, tmp_path):
    """The monitor's loaders are kept (a new one compiles its decode loop); a rewritten file gets a new one."""
    import os
    import shutil

    from lomar_fast.knn import _shard

    path = tmp_path / "val.beton"
    shutil.copy(mini_demo["val"], path)
    first = _shard(path, 4, 32, torch.device("cpu"), 1, "bicubic")
    assert _shard(path, 4, 32, torch.device("cpu"), 1, "bicubic") is first
    assert _shard(path, 8, 32, torch.device("cpu"), 1, "bicubic") is not first  # another batch size
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = _shard(path, 4, 32, torch.device("cpu"), 1, "bicubic")
    assert again is not first and again.total == first.total == mini_demo["n_val"]


def test_knn_flags_are_checked(mini_demo, tmp_path):
    from lomar_fast.config import parse_config
    from lomar_fast.errors import ConfigError

    def validate(cfg):
        cfg.validate()

    base = ["--data_path", str(mini_demo["train"]), "--output_dir", str(tmp_path / "o"),
            "--model", "lomar_vit_tiny_patch16",
            "--input_size", "64", "--window_size", "3", "--num_window", "2"]
    with pytest.raises(ConfigError, match="--knn_train and --knn_val"):
        validate(parse_config([*base, "--knn_every", "1"]))
    with pytest.raises(ConfigError, match="--knn_every"):
        validate(parse_config([*base, "--knn_train", str(mini_demo["train"]), "--knn_val", str(mini_demo["val"])]))
    with pytest.raises(ConfigError, match="missing.beton"):
        validate(parse_config([*base, "--knn_every", "2", "--knn_train", str(mini_demo["train"]),
                               "--knn_val", str(tmp_path / "missing.beton")]))


# ------------------------------------------------------------------------------------------- timm
def test_timm_create_model_matches_lomar_fast_logits(tmp_path):
    import timm

    assert {"lomar_vit_tiny_patch16_224", "lomar_vit_base_patch16_224", "lomar_vit_huge_patch16_224",
            "lomar_vit_base_patch16_384", "lomar_vit_large_patch16_384"} <= set(timm.list_models("lomar_*"))
    torch.manual_seed(0)
    ours = create_model("vit_tiny_patch16", num_classes=8).eval()  # 12 blocks at 224, as registered
    torch.nn.init.normal_(ours.head.weight, std=0.5)
    for blk in ours.blocks:  # non-zero iRPE tables, so the relative-position path matters
        torch.nn.init.normal_(blk.attn.rpe_k.lookup_table_weight, std=0.1)
    path = save_checkpoint(ours, tmp_path / "checkpoint-best.pth", epoch=3)
    model = timm.create_model("lomar_vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=8).eval()
    assert model.load_report is None  # loaded by timm's strict path
    assert list(model.state_dict()) == list(ours.state_dict())  # the same (timm-style) parameter names
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5, rtol=1e-5)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    # a head of the wrong size is an error, as for any timm checkpoint_path
    with pytest.raises(RuntimeError, match="head.weight"):
        timm.create_model("lomar_vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=5)


def test_timm_checkpoint_path_accepts_pretraining_export(tmp_path):
    import timm

    torch.manual_seed(0)
    lomar = create_model("lomar_vit_tiny_patch16", img_size=64, window_size=3, num_window=2, depth=2)
    path = save_checkpoint(lomar, tmp_path / "model.pth", epoch=7)
    model = timm.create_model("lomar_vit_base_patch16_384", checkpoint_path=str(path), num_classes=5,
                              embed_dim=192, num_heads=3, depth=2, img_size=96, drop_path_rate=0.1)
    report = model.load_report
    assert {"mask_token", "pos_embed", "encoder_pred.weight"} <= set(report["dropped"])
    assert set(report["initialized"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    src = lomar.state_dict()
    for k in report["used"]:
        assert torch.equal(model.state_dict()[k], src[k]), k
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    # timm's local-file pretrained route loads the same way
    again = timm.create_model("lomar_vit_tiny_patch16_224", pretrained=True, depth=2, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(again.blocks[1].attn.qkv.weight, src["blocks.1.attn.qkv.weight"])
    with pytest.raises(RuntimeError, match="checkpoint_path"):
        timm.create_model("lomar_vit_tiny_patch16_224", pretrained=True)


@pytest.mark.slow  # starts fresh interpreters or a benchmark
def test_timm_layer_decay_gives_the_same_lr_scales_as_lomar_fast():
    """timm's param_groups_layer_decay over the registered model (its group_matcher) gives every parameter the
    lr scale of lomar_fast.layer_decay: fc_norm and the head at the full lr, past the last block. (Matching
    fc_norm with (99999,) had merged it into the last block's layer: 0.65x.)"""
    from timm.optim import param_groups_layer_decay as timm_groups

    import lomar_fast.timm_models  # noqa: F401 (registers the models)
    from lomar_fast.layer_decay import param_groups_layer_decay
    import timm

    model = timm.create_model("lomar_vit_tiny_patch16_224", depth=4, num_classes=5)

    def scales(groups):
        by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        return {n: by_id[id(p)] for n, p in model.named_parameters()}

    ours = scales(param_groups_layer_decay(model, 0.05, 0.65))
    theirs = scales(timm_groups(model, 0.05, layer_decay=0.65))
    assert ours == pytest.approx(theirs)
    assert theirs["fc_norm.weight"] == theirs["head.weight"] == 1.0


def test_registration_is_one_explicit_import():
    """``import lomar_fast`` installs no import hook and does not touch timm; ``import lomar_fast.timm_models``
    registers the models (checked in a fresh interpreter, where nothing was imported before)."""
    code = ("import sys, lomar_fast; assert 'timm' not in sys.modules, 'importing lomar_fast imported timm'; "
            "assert not [f for f in sys.meta_path if type(f).__module__.startswith('lomar_fast')]; "
            "import timm; assert not timm.list_models('lomar_*'); import lomar_fast.timm_models; "
            "m = timm.create_model('lomar_vit_tiny_patch16_224', num_classes=3, depth=1); "
            "print(type(m).__name__, m.num_classes)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["LomarVisionTransformer", "3"]


def test_timm_data_config_uses_the_mae_evaluation_crop():
    import timm

    for name, size, crop in (("lomar_vit_tiny_patch16_224", 224, 224 / 256), ("lomar_vit_base_patch16_384", 384, 1.0)):
        model = timm.create_model(name, num_classes=2, depth=1)
        cfg = timm.data.resolve_data_config({}, model=model)
        assert cfg["input_size"] == (3, size, size) and cfg["crop_pct"] == crop, (name, cfg)

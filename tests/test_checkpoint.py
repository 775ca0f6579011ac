"""Checkpoints in the published LoMaR layout, and loading them into the fine-tuning classifier."""
import re
from pathlib import Path

import pytest
import torch

from lomar_fast.checkpoint import CheckpointMismatch, extract_state_dict, load_checkpoint, load_file, save_checkpoint
from lomar_fast.models import LoMaR, VisionTransformerRPE, create_model

DIM, DEPTH, HEADS = 64, 2, 2


def small_lomar(seed: int) -> LoMaR:
    torch.manual_seed(seed)
    return LoMaR(img_size=112, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, window_size=7,
                 num_window=1)


def published_keys(depth: int) -> set[str]:
    """The state-dict names DESIGN.md lists for the reference MaskedAutoencoderViT."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "mask_token", "pos_embed",
            "norm.weight", "norm.bias", "encoder_pred.weight", "encoder_pred.bias"}
    for i in range(depth):
        for sub in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.qkv.bias",
                    "attn.proj.weight", "attn.proj.bias", "attn.rpe_k.lookup_table_weight", "mlp.fc1.weight",
                    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            keys.add(f"blocks.{i}.{sub}")
    return keys


def with_trained_tables(m: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised iRPE tables distinct values so copies can be told apart."""
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.rpe_k.lookup_table_weight.normal_()
    return m


def test_state_dict_uses_published_layout():
    m = small_lomar(0)
    sd = m.state_dict()
    assert set(sd) == published_keys(DEPTH)
    assert sd["patch_embed.proj.weight"].shape == (DIM, 3, 16, 16)
    assert sd["cls_token"].shape == (1, 1, DIM) and sd["mask_token"].shape == (1, 1, DIM)
    assert sd["pos_embed"].shape == (1, 7 * 7 + 1, DIM)
    assert sd["blocks.0.attn.rpe_k.lookup_table_weight"].shape == (1, DIM // HEADS, 50)
    assert sd["blocks.1.attn.qkv.weight"].shape == (3 * DIM, DIM) and sd["blocks.1.attn.qkv.bias"].shape == (3 * DIM,)
    assert sd["encoder_pred.weight"].shape == (16 * 16 * 3, DIM)


def test_round_trip_is_exact(tmp_path):
    src = with_trained_tables(small_lomar(0))
    path = save_checkpoint(src, tmp_path / "sub" / "ckpt.pth", epoch=7)
    assert path.is_file() and not (tmp_path / "sub" / "ckpt.pth.tmp").exists()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 7 and set(raw["model"]) == published_keys(DEPTH)
    dst = small_lomar(1)
    assert not torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    load_checkpoint(dst, path)
    a, b = src.state_dict(), dst.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the loaded model computes the same loss on the same windows and masks
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8, generator=g)
    windows, masks = src.sample(2, generator=g)
    with torch.no_grad():
        assert torch.equal(src(images, windows, masks)[0], dst(images, windows, masks)[0])


def test_save_killed_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    """A save that dies while writing (here: torch.save writes half the bytes, then fails) leaves the previous
    checkpoint at the path intact and loadable, and no partial file under the final name."""
    path = tmp_path / "checkpoint-best.pth"
    old = with_trained_tables(small_lomar(0))
    save_checkpoint(old, path, epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(small_lomar(1), path, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-best.pth"]  # the partial file is removed


def test_round_trip_from_state_dict_and_module_prefix(tmp_path):
    src = with_trained_tables(small_lomar(0))
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    dst = small_lomar(1)
    load_checkpoint(dst, {"model": sd})
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    save_checkpoint(src.state_dict(), tmp_path / "sd.pth")
    assert set(load_file(tmp_path / "sd.pth")) == published_keys(DEPTH)


def test_bf16_model_saves_float32(tmp_path):
    src = small_lomar(0).to(torch.bfloat16)
    save_checkpoint(src, tmp_path / "c.pth")
    sd = load_file(tmp_path / "c.pth")
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert torch.equal(sd["cls_token"], src.cls_token.float())


def test_wrong_shape_names_the_key(tmp_path):
    sd = small_lomar(0).state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(5, DIM)
    save_checkpoint(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match=r"blocks\.1\.mlp\.fc1\.weight") as e:
        load_checkpoint(small_lomar(1), tmp_path / "bad.pth")
    assert "(5, 64)" in str(e.value) and "(256, 64)" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_and_unexpected_keys_are_listed():
    sd = small_lomar(0).state_dict()
    del sd["mask_token"]
    del sd["blocks.0.attn.rpe_k.lookup_table_weight"]
    sd["decoder_pred.weight"] = torch.zeros(3)
    dst = small_lomar(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatch) as e:
        load_checkpoint(dst, {"model": sd})
    msg = str(e.value)
    assert "missing" in msg and "mask_token" in msg and "blocks.0.attn.rpe_k.lookup_table_weight" in msg
    assert "unexpected" in msg and "decoder_pred.weight" in msg
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_file(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="is a folder; pass a .pth file .*lomar_fast.export"):
        load_file(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="junk.pth is not a weights file"):
        load_file(tmp_path / "junk.pth")
    with pytest.raises(CheckpointMismatch):
        extract_state_dict({"epoch": 3})


class LossScaler:
    """Stands for the optimizer objects a DeepSpeed ``*_optim_states.pt`` pickles."""


def test_a_file_that_is_not_a_weights_file_is_one_line_naming_its_flag(tmp_path, capsys):
    """A text file or a DeepSpeed optimizer-state file is refused in one line that names the flag and the file and
    says what to pass (not torch's own weights_only text, which suggests weights_only=False); so are a weights
    file without a state dict and weights that do not fit the classifier."""
    from lomar_fast import knn, visualize
    from lomar_fast.cli import run_cli

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    optim = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler()}, "ds_version": "0.19.8"}, optim)
    fix = "pass a lomar_fast.export model.pth, a published LoMaR checkpoint or a checkpoint-best.pth"
    for path, held in ((text, ""), (optim, f" (it holds a {__name__}.LossScaler)")):
        with pytest.raises(CheckpointMismatch) as e:
            load_file(path, "--finetune")
        assert str(e.value) == f"--finetune {path} is not a weights file{held}; {fix}"
    # each tool suggests what it takes: visualize draws a pretraining model's reconstructions
    pretraining = "pass a lomar_fast.export model.pth or a published LoMaR pretraining checkpoint"
    for module, args, want in ((visualize, ["--image", str(text), "--out", str(tmp_path / "v.png")], pretraining),
                               (knn, ["--train", str(text), "--val", str(text)], fix)):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: module.main(["--checkpoint", str(optim), *args]))
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: --checkpoint {optim} is not a weights file{held}; {want}\n"
    assert not (tmp_path / "v.png").exists()
    # a weights file cut short, or one the file system will not read, is not called "not a weights file"
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(4096)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(CheckpointMismatch, match=f"^--finetune {re.escape(str(cut))} is truncated or damaged "):
        load_file(cut, "--finetune")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", refused)
        with pytest.raises(CheckpointMismatch, match=r"cannot be read \(Permission denied\)$") as e:
            load_file(good, "--finetune")
    assert isinstance(e.value.__cause__, PermissionError)

    torch.save({"epoch": 3}, tmp_path / "epoch.pth")
    with pytest.raises(CheckpointMismatch, match=f"^--checkpoint {re.escape(str(tmp_path))}/epoch.pth holds no "
                                                 f"state dict .*; {fix}$"):
        load_file(tmp_path / "epoch.pth", "--checkpoint")
    wide = save_checkpoint(LoMaR(img_size=112, embed_dim=2 * DIM, depth=DEPTH, num_heads=HEADS, num_window=1),
                           tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatch, match=f"^checkpoint {re.escape(str(wide))}: pretrained weights do not fit "
                                                 f"the classifier: cls_token"):
        classifier(224).load_pretrained(wide)


def test_reference_script_checkpoints_load_safely(tmp_path):
    """MAE's save_model (which the reference LoMaR code uses) stores args as an argparse.Namespace, plus numpy
    scalars: they load with weights_only=True, and their args are read; anything else stays refused."""
    import argparse

    import numpy as np

    from lomar_fast.checkpoint import checkpoint_args, load_object

    sd = small_lomar(0).state_dict()
    path = tmp_path / "ref.pth"
    torch.save({"model": sd, "args": argparse.Namespace(global_pool=False, input_size=64), "epoch": np.int64(3),
                "best": np.float64(0.5)}, path)
    obj = load_object(path)
    assert set(load_file(path)) == set(sd) and int(obj["epoch"]) == 3
    assert checkpoint_args(obj) == {"global_pool": False, "input_size": 64}
    assert checkpoint_args({"model": sd, "args": {"a": 1}}) == {"a": 1} and checkpoint_args(sd) == {}

    # numpy 1 (the reference runs' era) pickled its scalars as numpy.core.multiarray.scalar
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": sd, "epoch": np.int64(7)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    assert b"numpy._core.multiarray" in raw
    legacy.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert int(load_object(legacy)["epoch"]) == 7

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": sd, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointMismatch, match="evil.pth is not a weights file"):
        load_file(tmp_path / "evil.pth")


# --------------------------------------------------------------------------- classifier


def classifier(img_size: int, seed: int = 5) -> VisionTransformerRPE:
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16", img_size=img_size, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                        num_classes=10, drop_path=0.0)


def test_classifier_loads_lomar_weights_and_runs_at_224_and_384(tmp_path):
    src = with_trained_tables(small_lomar(0))
    path = save_checkpoint(src, tmp_path / "pre.pth")
    c224, c384 = classifier(224), classifier(384, seed=6)
    rep = c224.load_pretrained(path)
    rep384 = c384.load_pretrained(path)
    assert rep["used"] == rep384["used"]
    encoder_keys = {k for k in c224.state_dict() if not k.startswith(("fc_norm.", "head."))}
    assert set(rep["used"]) == encoder_keys  # every encoder key comes from the checkpoint
    assert {"mask_token", "encoder_pred.weight", "encoder_pred.bias", "pos_embed"} <= set(rep["dropped"])
    assert set(rep["dropped"]) | set(rep["used"]) == set(src.state_dict())
    assert set(rep["initialized"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    src_sd = src.state_dict()
    for k in encoder_keys:
        assert torch.equal(c224.state_dict()[k], src_sd[k]), k
        assert torch.equal(c384.state_dict()[k], src_sd[k]), k
    for i in range(DEPTH):
        t = src.blocks[i].attn.rpe_k.lookup_table_weight
        assert c224.blocks[i].attn.rpe_k.lookup_table_weight.shape == (1, DIM // HEADS, 50)
        assert torch.equal(c224.blocks[i].attn.rpe_k.lookup_table_weight, t)
        assert torch.equal(c384.blocks[i].attn.rpe_k.lookup_table_weight, t)
    c224.eval(), c384.eval()
    g = torch.Generator().manual_seed(0)
    x224, x384 = torch.randn(2, 3, 224, 224, generator=g), torch.randn(1, 3, 384, 384, generator=g)
    with torch.no_grad():
        y224 = c224(x224)
        y384 = c384(x384)
        assert c224.forward_features(x224).shape == (2, 1 + 14 * 14, DIM)
        assert c384.forward_features(x384).shape == (1, 1 + 24 * 24, DIM)
        # a 224 model given 384 inputs builds the 24x24 buckets itself and matches the 384 model
        c224.load_state_dict(c384.state_dict())
        y_cross = c224(x384)
    assert y224.shape == (2, 10) and y384.shape == (1, 10)
    assert torch.isfinite(y224).all() and torch.isfinite(y384).all()
    torch.testing.assert_close(y_cross, y384, rtol=1e-5, atol=1e-6)


def test_classifier_rejects_misshaped_and_missing_keys():
    sd = small_lomar(0).state_dict()
    bad = dict(sd)
    bad["blocks.0.attn.rpe_k.lookup_table_weight"] = torch.zeros(1, DIM // HEADS, 49)
    c = classifier(224)
    with pytest.raises(CheckpointMismatch, match=r"blocks\.0\.attn\.rpe_k\.lookup_table_weight"):
        c.load_pretrained({"model": bad})
    missing = dict(sd)
    del missing["blocks.1.attn.proj.bias"]
    with pytest.raises(CheckpointMismatch, match=r"blocks\.1\.attn\.proj\.bias"):
        c.load_pretrained(missing)
    wide = LoMaR(img_size=112, embed_dim=2 * DIM, depth=DEPTH, num_heads=HEADS, num_window=1).state_dict()
    with pytest.raises(ValueError, match="cls_token"):
        c.load_pretrained(wide)


def test_classifier_head_and_pooling():
    c = classifier(224).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = c.forward_features(x)
        pooled = c.forward_head(feats, pre_logits=True)
        ref = torch.nn.functional.layer_norm(feats[:, 1:].mean(1), (DIM,), c.fc_norm.weight, c.fc_norm.bias, 1e-6)
        torch.testing.assert_close(pooled, ref)
        torch.testing.assert_close(c(x), ref @ c.head.weight.T + c.head.bias)
    with pytest.raises(ValueError, match="images"):
        c(torch.randn(1, 3, 100, 100))

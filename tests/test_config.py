"""The config module (flags, typed YAML), the run directory's rules (tags, latest, retention, resume,
guarded output dirs), the CLI wrapper, and the package's import graph."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lomar_fast import run_dir
from lomar_fast.cli import run_cli
from lomar_fast.config import FinetuneConfig, PretrainConfig, parse_config
from lomar_fast.errors import ConfigError, NonFiniteLoss

PACKAGE = Path(__file__).resolve().parent.parent / "lomar_fast"


# ------------------------------------------------------------------------------------------- config
def test_yaml_values_are_typed_like_flags_and_flags_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    # PyYAML reads 5e-4 and 1e-6 (MAE's spelling) as strings, "16" quoted as a string, 2.0 as a float
    cfg_file.write_text("blr: 5e-4\nmin_lr: 1e-6\nbatch_size: '16'\nepochs: 2.0\nnorm_pix_loss: 'false'\n"
                        "lr: null\nwindow_sampling: per_image\ndata_path: data/train.beton\nseed: 3\n")
    cfg = parse_config(["--config", str(cfg_file), "--seed", "5", "--no_os_cache"])
    assert (cfg.blr, cfg.min_lr, cfg.batch_size, cfg.epochs) == (5e-4, 1e-6, 16, 2)
    assert type(cfg.blr) is float and type(cfg.batch_size) is int and type(cfg.epochs) is int
    assert cfg.norm_pix_loss is False and cfg.lr is None and cfg.window_sampling == "per_image"
    assert cfg.seed == 5 and cfg.os_cache is False  # flags override the file
    assert {"blr", "min_lr", "batch_size", "seed", "os_cache"} <= cfg.explicit and "accum_iter" not in cfg.explicit
    # the same conversion for flags and for the fine-tuning config
    ft = parse_config(["--layer_decay", "0.7", "--eval", "--nb_classes", "None"], FinetuneConfig)
    assert ft.layer_decay == 0.7 and ft.eval is True and ft.nb_classes is None


@pytest.mark.parametrize("text,message", [
    ("blr: fast\n", r"blr = 'fast' is not a valid float"),
    ("batch_size: 2.5\n", r"batch_size = 2.5 is not a valid int"),
    ("norm_pix_loss: maybe\n", r"norm_pix_loss = 'maybe' is not a valid bool"),
    ("epochs: [1, 2]\n", r"epochs = \[1, 2\] is not a valid int"),
    ("pairing: everything\n", r"pairing = 'everything' must be one of all, published"),
    ("batch_sise: 8\n", r"unknown keys \['batch_sise'\]"),
    ("epochs: null\n", r"epochs cannot be empty; expected int"),
    ("- 1\n- 2\n", r"expected a mapping"),
])
def test_yaml_value_of_the_wrong_type_is_one_error_naming_it(tmp_path, text, message):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=f"--config {cfg_file}: .*{message}" if "mapping" not in message
                       and "unknown" not in message else message):
        parse_config(["--config", str(cfg_file)])


def test_yaml_that_does_not_parse_is_one_line_with_its_place(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("epochs: 4\nblr: [1e-3\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(cfg_file)])
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--config {cfg_file} is not valid YAML: ")
    assert "at line 3, column 1" in str(e.value), str(e.value)


def test_every_field_has_help_and_flags_cover_both_entry_points():
    from lomar_fast.config import HELP, config_fields

    for cls in (PretrainConfig, FinetuneConfig):
        missing = [f.name for f in config_fields(cls) if f.name not in HELP]
        assert not missing, f"{cls.__name__}: no help text for {missing}"
    # the one parser converts flag strings to each field's type
    cfg = parse_config(["--batch_size", "12", "--mask_ratio", "0.75", "--norm_pix_loss", "false"])
    assert (cfg.batch_size, cfg.mask_ratio, cfg.norm_pix_loss) == (12, 0.75, False)
    with pytest.raises(ConfigError, match="--batch_size: batch_size = 'x' is not a valid int"):
        parse_config(["--batch_size", "x"])


def test_stray_arguments_and_abbreviations_are_refused_and_deepspeeds_flag_is_not_taken_for_its_config(capsys):
    """A stray value or a single-dash flag was dropped without a word (a typo like "--batch_size 8 16" trained at 8),
    "--epoch 1" was read as --epochs, and DeepSpeed's own "--deepspeed" as an abbreviated --deepspeed_config."""
    for argv in (["--batch_size", "8", "16"], ["-x", "5"], ["--epoch", "1"], ["--data"]):
        with pytest.raises(SystemExit) as e:
            parse_config(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err, argv
    cfg = parse_config(["--deepspeed", "--deepspeed_config", "ds_configs/cpu.json", "--local_rank=0"])
    assert (cfg.deepspeed_config, cfg.local_rank) == ("ds_configs/cpu.json", 0)


def test_numbers_out_of_range_are_one_error_naming_the_flag(tmp_path):
    """Negative rates trained backwards (--min_lr -5) or failed inside torch or numpy after the engine was built;
    an unknown LoMaR model name was a traceback; a pretraining --drop_path above 1 aborted in the first step."""
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x")  # validate() checks the path; the content is the loader's business
    base = ["--data_path", str(beton)]
    for extra, message in ((["--blr", "-1"], "--blr must be a number of at least 0, got -1"),
                           (["--lr", "-0.001"], "--lr must be"), (["--min_lr", "-5"], "--min_lr must be"),
                           (["--lr", "nan"], "--lr must be"),
                           (["--weight_decay", "-1"], "--weight_decay must be"),
                           (["--seed", "-1"], "--seed must be at least 0, got -1"),
                           (["--batches_ahead", "0"], "--batches_ahead must be at least 1"),
                           (["--drop_path", "2"], "--drop_path 2.0 must be between 0 and 1"),
                           (["--model", "lomar_vit_bogus_patch16"], "--model lomar_vit_bogus_patch16 is not a LoMaR"),
                           (["--input_size", "0"], "--input_size 0 must be a positive multiple of the patch size"),
                           (["--data_path", str(tmp_path)], f"--data_path {tmp_path} is a folder, not a file; the")):
        with pytest.raises(ConfigError, match=message):
            parse_config([*base, *extra]).validate()
    ft = ["--data_path", str(beton), "--val_path", str(beton), "--nb_classes", "8"]
    for extra, message in ((["--clip_grad", "0"], "--clip_grad 0.0 must be above 0 .leave it out"),
                           (["--lr", "-1"], "--lr must be")):
        with pytest.raises(ConfigError, match=message):
            parse_config([*ft, *extra], FinetuneConfig).validate()
    parse_config([*base, "--drop_path", "1", "--min_lr", "0", "--seed", str(2**40)]).validate()  # the edges
    with pytest.raises(ConfigError, match=f"--finetune {tmp_path} is a folder, not a file; .*lomar_fast.export"):
        parse_config([*ft, "--finetune", str(tmp_path)], FinetuneConfig).validate()


@pytest.mark.parametrize("argv,yaml_text,want", [
    ([], "", "auto"),
    (["--compile"], "", "on"),  # the old switch spelling still turns it on
    (["--no_compile"], "compile: true\n", "off"),  # the flag beats the file
    (["--compile", "OFF"], "", "off"),
    ([], "compile: false\n", "off"),
    ([], "compile: yes\n", "on"),
    ([], "compile: auto\n", "auto"),
])
def test_compile_takes_auto_on_off_and_booleans(tmp_path, argv, yaml_text, want):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml_text or "seed: 0\n")
    for cls in (PretrainConfig, FinetuneConfig):
        cfg = parse_config(["--config", str(cfg_file), *argv], cls)
        assert (cfg.compile, cfg.compile_scope, cfg.compile_mode) == (want, "blocks", "default")


def test_compile_settings_refuse_what_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="--compile: compile = 'fast' must be one of auto, on, off"):
        parse_config(["--compile", "fast"])
    with pytest.raises(ConfigError, match="compile_scope = 'layers' must be one of blocks, model"):
        parse_config(["--compile_scope", "layers"])
    with pytest.raises(ConfigError, match="compile_mode = 'reduce-overhead' must be one of default, "
                                          "max-autotune-no-cudagraphs"):
        parse_config(["--compile_mode", "reduce-overhead"])
    data = tmp_path / "train.beton"
    data.write_bytes(b"x")
    cfg = parse_config(["--data_path", str(data), "--compile_mode", "max-autotune-no-cudagraphs",
                        "--compile_backend", "aot_eager"])
    with pytest.raises(ConfigError, match="--compile_mode max-autotune-no-cudagraphs is an inductor mode; drop it "
                                          "or use --compile_backend inductor"):
        cfg.validate()
    cfg = parse_config(["--data_path", str(data), "--compile_backend", "indcutor"])
    with pytest.raises(ConfigError, match="--compile_backend indcutor is not a torch.compile backend; use inductor"):
        cfg.validate()
    cfg.compile = "off"  # the backend is not read then
    cfg.validate()


def test_compile_auto_compiles_on_cuda_below_zero3_only():
    from lomar_fast.compilation import compile_decision

    table = {(s, d, z): compile_decision(s, d, z)[0] for s in ("auto", "on", "off") for d in ("cuda", "cpu")
             for z in (0, 2, 3) if (s, z) != ("on", 3)}
    assert {k for k, v in table.items() if v} == ({("on", d, z) for d in ("cuda", "cpu") for z in (0, 2)}
                                                   | {("auto", "cuda", 0), ("auto", "cuda", 2)})
    assert "ZeRO-3" in compile_decision("auto", "cuda", 3)[1] and "cpu" in compile_decision("auto", "cpu", 2)[1]
    for device in ("cuda", "cpu"):  # dynamo traces ZeRO-3's partitioned parameters: refused, not tried
        with pytest.raises(ConfigError, match="--compile on does not work under ZeRO-3"):
            compile_decision("on", device, 3)
    with pytest.raises(ValueError, match="must be one of auto, on, off"):
        compile_decision("sometimes", "cuda", 2)


# ------------------------------------------------------------------------------------------ run dir
def _tag(root: Path, name: str, complete: bool = True) -> None:
    (root / name).mkdir(parents=True)
    if complete:
        run_dir.commit(root, name, {"epoch": run_dir.parse_tag(name)[1]}, update_latest=False)


def test_tag_names_and_families():
    assert run_dir.tag_name("epoch", 7) == "epoch0007" and run_dir.tag_name("last", 12) == "last_epoch0012"
    assert run_dir.parse_tag("best_epoch0003") == ("best", 3) and run_dir.parse_tag("epoch0010") == ("epoch", 10)
    assert run_dir.parse_tag("latest") is None and run_dir.parse_tag("global_step10") is None


def test_resume_rule(tmp_path):
    root = tmp_path / "run"
    assert run_dir.find_resume("auto", str(root), "last") is None  # nothing yet: a fresh start
    for name in ("last_epoch0001", "last_epoch0003", "best_epoch0002"):
        _tag(root, name)
    _tag(root, "last_epoch0004", complete=False)  # a save that was killed
    # no latest file: the newest complete tag of the family
    assert str(run_dir.find_resume("auto", str(root), "last")) == f"{root}/last_epoch0003"
    (root / "latest").write_text("last_epoch0004")  # latest naming an incomplete tag is never followed
    assert run_dir.find_resume(str(root), "elsewhere", "last").tag == "last_epoch0003"
    (root / "latest").write_text("last_epoch0001")
    assert run_dir.find_resume("auto", str(root), "last").tag == "last_epoch0001"
    assert run_dir.find_resume(str(root / "best"), "x", "last").tag == "best_epoch0002"  # DIR/<family>
    assert run_dir.find_resume(str(root / "last_epoch0003"), "x", "last").tag == "last_epoch0003"  # a tag dir
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        run_dir.find_resume(str(root / "last_epoch0004"), "x", "last")
    with pytest.raises(ConfigError, match="no complete 'epoch' checkpoint .* families there: best, last"):
        run_dir.find_resume(str(root / "epoch"), "x", "last")
    with pytest.raises(ConfigError, match="does not exist"):
        run_dir.find_resume(str(tmp_path / "nowhere" / "run"), "x", "last")
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        run_dir.find_resume(str(tmp_path), "x", "last")
    # a mistyped run folder beside no checkpoint at all is not a missing tag family
    with pytest.raises(ConfigError, match=f"--resume {tmp_path / 'typo'} does not exist, and {tmp_path} holds no"):
        run_dir.find_resume(str(tmp_path / "typo"), "x", "last")


def test_a_device_other_than_cpu_or_cuda_is_named_as_such():
    from lomar_fast.distributed import pick_device

    for bad in ("tpu", "gpu", "cuda1"):  # it said "asked for a GPU but torch sees none"
        with pytest.raises(ConfigError, match=f"--device {bad} is not a device this project runs on; pass cpu or cuda"):
            pick_device(bad)
    assert pick_device("cpu") == torch.device("cpu")


def test_commit_points_latest_last_and_retire_keeps_the_newest(tmp_path):
    root = tmp_path / "run"
    for e in range(5):
        (root / run_dir.tag_name("epoch", e)).mkdir(parents=True)
        # latest is untouched until the commit: a kill between the two leaves the previous tag in charge
        assert (root / "latest").read_text() == f"epoch{e - 1:04d}" if e else not (root / "latest").exists()
        run_dir.commit(root, run_dir.tag_name("epoch", e), {"epoch": e}, update_latest=True)
        assert (root / "latest").read_text() == f"epoch{e:04d}"
        assert json.loads((root / f"epoch{e:04d}" / "complete.json").read_text())["epoch"] == e
        run_dir.retire(root, "epoch", keep=2)
    assert run_dir.tags(root) == ["epoch0003", "epoch0004"]
    assert not list(root.glob(".*tmp*"))  # no temporary files left behind
    # an incomplete leftover older than the newest complete tag goes; a newer one (a save in flight) stays
    (root / "epoch0002").mkdir()
    (root / "epoch0009").mkdir()
    (root / "best_epoch0001").mkdir()
    assert run_dir.retire(root, "epoch", keep=2) == ["epoch0002"]
    assert (root / "epoch0009").is_dir() and (root / "best_epoch0001").is_dir()
    # the tag latest names is never deleted, even beyond keep
    (root / "latest").write_text("epoch0003")
    run_dir.commit(root, "epoch0009", {}, update_latest=False)
    run_dir.retire(root, "epoch", keep=1)
    assert run_dir.tags(root) == ["epoch0003", "epoch0009"]


def test_a_commit_killed_between_its_writes_never_leaves_latest_on_an_incomplete_tag(tmp_path, monkeypatch):
    root = tmp_path / "run"
    _tag(root, "epoch0000")
    (root / "latest").write_text("epoch0000")
    (root / "epoch0001").mkdir()
    real, writes = run_dir._atomic_write, []

    def dies_after_one_write(path, text):
        if writes:
            raise OSError("killed")
        writes.append(path.name)
        real(path, text)

    monkeypatch.setattr(run_dir, "_atomic_write", dies_after_one_write)
    with pytest.raises(OSError):
        run_dir.commit(root, "epoch0001", {"epoch": 1}, update_latest=True)
    latest = (root / "latest").read_text()
    assert run_dir.is_complete(root / latest), f"latest names {latest}, which has no complete.json"


def test_a_tag_saved_again_is_incomplete_until_committed_again(tmp_path):
    """A resumed fine-tune re-saves the epoch's best tag in place: its old completion mark goes before any
    file is rewritten, so a save cut short leaves an incomplete tag, not one marked complete over mixed files."""
    from types import SimpleNamespace

    from lomar_fast.trainer import Trainer

    root = tmp_path / "run"
    _tag(root, "best_epoch0003")
    seen = []

    def save_checkpoint(path, tag, client_state, save_latest):
        seen.append(run_dir.is_complete(Path(path) / tag))
        (Path(path) / tag / "mp_rank_00_model_states.pt").write_bytes(b"new")

    fake = SimpleNamespace(rank=0, root=root, step=7, state={}, family="last", cfg=SimpleNamespace(keep_last=3),
                           engine=SimpleNamespace(save_checkpoint=save_checkpoint), run_shape=lambda: {})
    assert Trainer.save(fake, "best", 3) == "best_epoch0003"
    assert seen == [False] and run_dir.is_complete(root / "best_epoch0003")  # written unmarked, then committed
    assert run_dir.uncommit(root, "best_epoch0003") is True and not run_dir.is_complete(root / "best_epoch0003")
    assert run_dir.uncommit(root, "best_epoch0003") is False


def test_output_dir_guard_and_overwrite(tmp_path):
    root = tmp_path / "out"
    run_dir.prepare_output_dir(root, None, False)  # a new directory is fine
    run_dir.prepare_output_dir(root, None, False)  # ... so is an empty one
    (root / "checkpoint-best.pth").write_bytes(b"x")
    _tag(root, "best_epoch0000")
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint-best.pth, best_epoch0000\)"):
        run_dir.prepare_output_dir(root, None, False)
    run_dir.prepare_output_dir(root, "auto", False)  # continuing it is fine
    run_dir.prepare_output_dir(root, None, True)  # --overwrite allows it; the files go only when cleared
    assert (root / "checkpoint-best.pth").exists()
    (root / "notes.txt").write_text("mine")
    assert sorted(run_dir.clear_run(root)) == ["best_epoch0000", "checkpoint-best.pth"]
    assert [p.name for p in root.iterdir()] == ["notes.txt"]  # files the run did not write are kept


def test_log_dir_and_output_files_are_checked_without_leaving_a_folder(tmp_path):
    """--log_dir (and export's or visualize's --out folder) is checked before any work, but created only by the
    first write: a folder made by the check outlived a run stopped by a later input error, and in --output_dir it
    then counted as an earlier run."""
    out = tmp_path / "out"
    run_dir.check_writable_later(out / "tensorboard", "--log_dir")
    assert not out.exists()
    run_dir.prepare_output_dir(out, None, False)  # so the corrected rerun is not refused
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"--log_dir {blocker / 'tb'}: {blocker} is a file, not a folder"):
        run_dir.check_writable_later(blocker / "tb", "--log_dir")
    run_dir.check_writable_later(out, "--log_dir")  # an existing folder
    # an output file's folder is probed the same way (export, visualize): its writer creates it
    run_dir.prepare_output_file(tmp_path / "new" / "sub" / "model.pth", "--out", "model.pth")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=f"--out {blocker / 'm.pth'}: {blocker} is a file, not a folder"):
        run_dir.prepare_output_file(blocker / "m.pth", "--out", "model.pth")


def test_overwrite_never_deletes_what_the_run_reads_and_limits_are_positive(tmp_path):
    """--overwrite clears --output_dir when the run starts: with --eval (which reads weights and writes no run)
    or with --finetune weights inside that folder it would delete what it then loads; it is refused."""
    out = tmp_path / "ft"
    out.mkdir()
    (out / "checkpoint-best.pth").write_bytes(b"x")
    elsewhere = tmp_path / "model.pth"
    elsewhere.write_bytes(b"x")
    val = tmp_path / "val.beton"
    val.write_bytes(b"x")
    base = ["--val_path", str(val), "--output_dir", str(out), "--nb_classes", "8", "--overwrite"]
    cases = [(["--eval", "--finetune", str(elsewhere)], "--overwrite deletes the run in --output_dir, and --eval"),
             (["--finetune", str(out / "checkpoint-best.pth"), "--data_path", str(val)],
              "--finetune .*checkpoint-best.pth lies inside --output_dir .*, which --overwrite deletes first")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config([*base, *extra], FinetuneConfig).validate()
    for flag in ("--max_steps_per_epoch", "--exit_after_epochs"):
        with pytest.raises(ConfigError, match=f"{flag} must be at least 1, got 0"):
            parse_config(["--data_path", str(val), flag, "0"]).validate()


def test_eval_adopts_the_settings_of_a_reference_script_checkpoint(tmp_path):
    """A fine-tuned checkpoint of the reference scripts stores its args as an argparse.Namespace: --eval takes
    its model settings from it as from a lomar_fast checkpoint (it had silently kept the flag defaults)."""
    import argparse

    import torch

    path = tmp_path / "ref.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(global_pool=False, input_size=384,
                                                                             lr=1e-3)}, path)
    cfg = parse_config(["--eval", "--finetune", str(path)], FinetuneConfig)
    assert sorted(cfg.adopt_checkpoint_args(str(path))[0]) == ["global_pool=False", "input_size=384"]
    assert cfg.global_pool is False and cfg.input_size == 384


def test_the_class_count_covers_the_class_lists_of_the_train_and_val_data(tmp_path):
    """Labels index the head's rows: the classes.json beside --data_path and --val_path must agree, and the class
    count (--nb_classes, or with --eval the checkpoint head's rows) must cover them. A val list other than the
    train list, or longer than the head, had passed and failed in the first evaluation (IndexError)."""
    def split(name: str, n: int) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "classes.json").write_text(json.dumps([f"c{i}" for i in range(n)]))
        (tmp_path / name / "x.beton").write_bytes(b"x")
        return str(tmp_path / name / "x.beton")

    train8, val8, val10 = split("train8", 8), split("val8", 8), split("val10", 10)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "x.beton").write_bytes(b"x")
    bare = str(tmp_path / "bare" / "x.beton")
    assert parse_config(["--data_path", train8, "--val_path", val8], FinetuneConfig).resolve_nb_classes() == 8
    with pytest.raises(ConfigError, match="the classes.json beside --data_path .*train8/x.beton \\(8 classes\\) and "
                                          "the one beside --val_path .*val10/x.beton \\(10\\) differ"):
        parse_config(["--data_path", train8, "--val_path", val10, "--nb_classes", "10"], FinetuneConfig).validate()
    with pytest.raises(ConfigError, match="--nb_classes 8 is smaller than the 10 classes in the classes.json beside "
                                          "--val_path .*val10/x.beton"):
        parse_config(["--data_path", bare, "--val_path", val10, "--nb_classes", "8"], FinetuneConfig).validate()
    # --eval: the head's rows are the class count; a longer val list or another --nb_classes is refused
    evaluating = parse_config(["--eval", "--val_path", val10], FinetuneConfig)
    with pytest.raises(ConfigError, match="--val_path .*val10/x.beton has 10 classes \\(its classes.json\\), the "
                                          "head in --finetune best.pth only 8"):
        evaluating.resolve_nb_classes(8, "--finetune best.pth")
    assert evaluating.resolve_nb_classes(12, "--finetune best.pth") == 12
    with pytest.raises(ConfigError, match="--nb_classes 9 differs from the 8 classes of the head in --finetune b.pth"):
        parse_config(["--eval", "--val_path", val8, "--nb_classes", "9"], FinetuneConfig).resolve_nb_classes(
            8, "--finetune b.pth")


def test_check_resume_maps_the_same_global_batch_and_refuses_other_shapes():
    cfg = {"model": "m", "input_size": 224}
    saved = {"world_size": 4, "micro_batch": 64, "accum_iter": 1, "zero_stage": 0, "config": cfg}
    assert run_dir.check_resume(saved, dict(saved), ("model", "input_size")) is None
    note = run_dir.check_resume(saved, {**saved, "world_size": 2, "accum_iter": 2}, ("model", "input_size"))
    assert "the same 256 images per step" in note
    assert not run_dir.needs_universal(saved, {**saved, "world_size": 2, "accum_iter": 2})  # ZeRO-0: files as they are
    # under ZeRO-1/2/3 the optimizer state is one file per rank: another rank count goes through the universal
    # checkpoint, another micro-batch/accum split on the same ranks does not
    zero2 = {**saved, "zero_stage": 2}
    same_ranks = {**zero2, "micro_batch": 32, "accum_iter": 2}
    assert "the same 256" in run_dir.check_resume(zero2, same_ranks, ()) and not run_dir.needs_universal(zero2, same_ranks)
    fewer = {**zero2, "world_size": 2, "accum_iter": 2}
    assert "ZeRO-2 optimizer state is one file per saved rank, converted into DeepSpeed's universal checkpoint" in (
        run_dir.check_resume(zero2, fewer, ()))
    assert run_dir.needs_universal(zero2, fewer) and not run_dir.needs_universal({"config": cfg}, fewer)
    zero3 = {**saved, "zero_stage": 3}  # ZeRO-3 partitions the weights too: they go through the same conversion
    fewer3 = {**zero3, "world_size": 2, "accum_iter": 2}
    assert "ZeRO-3 weights and optimizer state are one file per saved rank, converted into DeepSpeed's" in (
        run_dir.check_resume(zero3, fewer3, ()))
    assert run_dir.needs_universal(zero3, fewer3) and not run_dir.needs_universal(zero3, {**zero3, "micro_batch": 32,
                                                                                          "accum_iter": 2})
    with pytest.raises(ConfigError, match="under ZeRO-2, this run uses ZeRO-3.*--zero_stage 2"):
        run_dir.check_resume(zero2, {**zero2, "zero_stage": 3}, ())
    with pytest.raises(ConfigError, match="= 256 images per step, this run has .* = 128.*--batch_size 128"):
        run_dir.check_resume(saved, {"world_size": 2, "micro_batch": 64, "accum_iter": 1, "config": cfg},
                             ("model", "input_size"))
    with pytest.raises(ConfigError, match="input_size: saved 224, now 384"):
        run_dir.check_resume(saved, {**saved, "config": {**cfg, "input_size": 384}}, ("model", "input_size"))


# ------------------------------------------------------------------------------------------------ CLI
def test_run_cli_turns_only_the_projects_input_errors_into_one_line(capsys):
    def bad_flag():
        raise ConfigError("--blr -1 must be positive")

    with pytest.raises(SystemExit) as e:
        run_cli(bad_flag)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --blr -1 must be positive\n"

    def nan():
        raise NonFiniteLoss("loss became nan")

    with pytest.raises(SystemExit) as e:
        run_cli(nan)
    assert e.value.code == 3

    def deep_value_error():  # e.g. raised inside FFCV, DeepSpeed or torch: keeps its traceback
        raise ValueError("something deep")

    with pytest.raises(ValueError, match="something deep"):
        run_cli(deep_value_error)
    with pytest.raises(FileNotFoundError):
        run_cli(lambda: open("/nonexistent/file"))


def test_run_cli_hands_a_finished_entry_points_objects_to_the_exit_uncollected(monkeypatch):
    """After main returns, the objects left are frozen out of the cyclic collector (the interpreter's exit spent
    most of its 2-3 s walking them); an entry point that stops on an error leaves the collector as it was."""
    import gc

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))

    def bad_flag():
        raise ConfigError("--epochs 0 must be positive")

    with pytest.raises(SystemExit):
        run_cli(bad_flag)
    with pytest.raises(ValueError):
        run_cli(lambda: int("x"))
    assert frozen == []
    run_cli(lambda: None)
    assert frozen == [True]


def test_run_cli_takes_the_process_group_down_after_a_finished_run_or_a_non_finite_loss(in_process_world,
                                                                                         monkeypatch):
    """A finished entry point, and one that stopped on a non-finite loss (every rank raises it at the same
    read-back), leave no process group to the interpreter's exit (under torch 2.11, gloo's threads could then
    abort a rank: exit -6 in place of 0 or 3); one that stops on an input error leaves it: the other ranks may
    never reach the teardown's barrier."""
    import gc

    import deepspeed.comm.comm as ds_comm

    from lomar_fast.distributed import init_distributed

    monkeypatch.setattr(gc, "freeze", lambda: None)

    def failing(error):
        def main():
            init_distributed(torch.device("cpu"))
            raise error
        return main

    with pytest.raises(SystemExit) as e:
        run_cli(failing(ConfigError("--epochs 0 must be positive")))
    assert e.value.code == 2 and torch.distributed.is_initialized()
    with pytest.raises(SystemExit) as e:
        run_cli(failing(NonFiniteLoss("loss became nan")))
    assert e.value.code == 3 and not torch.distributed.is_initialized() and ds_comm.cdb is None
    run_cli(lambda: init_distributed(torch.device("cpu")))
    assert not torch.distributed.is_initialized() and ds_comm.cdb is None
    run_cli(lambda: None)  # nothing to take down


# ---------------------------------------------------------------------------------------- import graph
# Parsed in a fresh interpreter: CPython 3.11.7's ast.parse can fail with "AST constructor recursion depth
# mismatch" in a process where a RecursionError happened before (some other test's library code).
_GRAPH_SCRIPT = r"""
import ast, json, sys
from pathlib import Path

package = Path(sys.argv[1])


def module_name(path):
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


modules = {module_name(p): p for p in package.rglob("*.py")}
graph = {m: set() for m in modules}
for mod, path in modules.items():
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        graph[mod] |= {t for t in targets if t in modules and t != mod}
print(json.dumps({m: sorted(d) for m, d in graph.items()}))
"""


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports anywhere (top level or inside a function)."""
    out = subprocess.run([sys.executable, "-c", _GRAPH_SCRIPT, str(PACKAGE)], capture_output=True, text=True,
                         check=True).stdout
    return {m: set(d) for m, d in json.loads(out).items()}


def test_the_package_has_no_import_loop():
    graph = import_graph()
    assert "lomar_fast.ops.irpe" in graph and "lomar_fast.trainer" in graph
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import loop: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_import_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "lomar_fast.ops._dispatch" in graph["lomar_fast.ops.irpe"]  # relative, top level
    assert "lomar_fast.knn" in graph["lomar_fast.pretrain"]  # inside a function
    # and the layering DESIGN.md fixes: models never import data code; ops never import models
    for mod, deps in graph.items():
        if mod.startswith("lomar_fast.models"):
            assert not any(d.startswith("lomar_fast.data") for d in deps), (mod, deps)
        if mod.startswith("lomar_fast.ops"):
            assert not any(d.startswith(("lomar_fast.models", "lomar_fast.data")) for d in deps), (mod, deps)


def test_every_test_the_readme_names_exists():
    """README tables point at the test that shows each claim: each named test function (or test file) exists."""
    import re

    tests = Path(__file__).resolve().parent
    defined = {m for f in tests.glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    files = {f.stem for f in tests.glob("test_*.py")}
    named = set(re.findall(r"`(test_\w+)`", (tests.parent / "README.md").read_text()))
    assert named, "the README names no test: the pattern no longer matches its tables"
    assert not named - defined - files, sorted(named - defined - files)


def test_a_one_process_run_on_a_later_gpu_puts_deepspeed_there(monkeypatch):
    """DeepSpeed places the engine on cuda:LOCAL_RANK; a plain one-process start on cuda:2 (e.g. the throughput
    benchmark's --device cuda:2) said LOCAL_RANK=0, so the model went to cuda:0 and the batches to cuda:2."""
    import deepspeed

    from lomar_fast import distributed

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", env)  # what init_distributed sets stays out of the later tests
    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    assert distributed.init_distributed(torch.device("cuda", 2)) == (0, 1, 2)
    assert env["LOCAL_RANK"] == "2" and calls == [{"dist_backend": "nccl", "verbose": False}]


def test_loader_workers_share_the_cores_among_the_launchers_local_ranks(monkeypatch):
    """torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE: either divides the cores."""
    from lomar_fast.data import loaders

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert loaders.default_num_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loaders.default_num_workers() == 8
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loaders.default_num_workers() == 16


def test_export_reads_a_folder_named_auto_as_a_folder(tmp_path, monkeypatch):
    """export resolves --checkpoint by --resume's rule, where the word 'auto' means "this run's own folder":
    a folder of that name is still just a folder (it had fallen through to a bare assert)."""
    from lomar_fast import export

    (tmp_path / "auto").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--checkpoint .*auto: no complete checkpoint there"):
        export._resolve("auto", None)


def test_export_reads_dir_family_as_resume_does(tmp_path):
    """--checkpoint RUN/<family> is the newest complete tag of that family, as --resume reads it; the errors
    name --checkpoint."""
    from lomar_fast import export

    root = tmp_path / "run"
    for name in ("epoch0001", "epoch0003", "best_epoch0002"):
        _tag(root, name)
    _tag(root, "epoch0004", complete=False)
    assert export._resolve(str(root / "epoch"), None) == (root, "epoch0003")
    assert export._resolve(str(root / "best"), None) == (root, "best_epoch0002")
    assert export._resolve(str(root), None) == (root, "epoch0003")
    with pytest.raises(ConfigError, match=f"^--checkpoint {root}/last: no complete 'last' checkpoint in {root} "
                                          f"\\(tag families there: best, epoch\\)$"):
        export._resolve(str(root / "last"), None)
    with pytest.raises(ConfigError, match=f"^--checkpoint {tmp_path}/nowhere/epoch does not exist; pass a run's "
                                          f"--output_dir, a tag directory$"):
        export._resolve(str(tmp_path / "nowhere" / "epoch"), None)
    (tmp_path / "model.pth").write_bytes(b"x")
    with pytest.raises(ConfigError, match="--checkpoint .*model.pth is not a directory"):
        export._resolve(str(tmp_path / "model.pth"), None)


def test_export_checks_out_before_consolidating_and_keeps_an_earlier_file(tmp_path, monkeypatch):
    """--out that is a folder, lies under a regular file or inside the tag it is exported from stops with one
    ConfigError naming --out before any checkpoint is read; a failed write is a ConfigError too, and leaves an
    earlier file whole."""
    from lomar_fast import export

    root = tmp_path / "run"
    _tag(root, "epoch0001")
    monkeypatch.setattr(export, "consolidate", lambda *a: (_ for _ in ()).throw(AssertionError("consolidated")))
    (tmp_path / "file").write_text("a file")
    for out, message in ((tmp_path, "is a folder; pass a file name such as .*model.pth$"),
                         (tmp_path / "file" / "m.pth", f": {tmp_path}/file is a file, not a folder; pass a path in "),
                         (tmp_path / "file" / "sub" / "m.pth", f": {tmp_path}/file is a file, not a folder"),
                         (root / "epoch0001" / "m.pth", "lies in the checkpoint tag .*epoch0001")):
        with pytest.raises(ConfigError, match=f"^--out {out}.*{message}"):
            export.export(str(root), str(out))

    monkeypatch.setattr(export, "consolidate", lambda *a: ({"w": torch.zeros(2)}, {}))
    out = tmp_path / "model.pth"
    out.write_bytes(b"earlier")

    def disk_full(obj, f, *a, **k):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ConfigError, match=f"^--out {out} cannot be written \\(No space left on device\\)"):
        export.export(str(root), str(out))
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "model.pth", "run"]

    # a fine-tuning run is told from the settings saved beside its tag, before the consolidation
    monkeypatch.setattr(export, "consolidate", lambda *a: (_ for _ in ()).throw(AssertionError("consolidated")))
    ft = tmp_path / "ft"
    (ft / "last_epoch0000").mkdir(parents=True)
    run_dir.commit(ft, "last_epoch0000", {"epoch": 0, "run": {"config": {"model": "vit_tiny_patch16"}}},
                   update_latest=True)
    with pytest.raises(ConfigError, match=f"--checkpoint {ft} is a fine-tuning run \\(vit_tiny_patch16\\)"):
        export.export(str(ft), str(tmp_path / "ft.pth"))


def test_eval_takes_only_the_settings_the_weights_state():
    """A setting the weights were saved without (None: the model's default) is neither taken nor reported against
    a flag (it printed "--depth 12 given: ... was trained with depth None")."""
    cfg = parse_config(["--eval", "--depth", "12"], FinetuneConfig)
    taken, kept = cfg.adopt_args({"depth": None, "input_size": 160, "model": "vit_small_patch16"}, "--resume R")
    assert taken == ["model=vit_small_patch16", "input_size=160"] and kept == []
    assert (cfg.depth, cfg.input_size, cfg.model) == (12, 160, "vit_small_patch16")

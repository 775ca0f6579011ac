"""Fine-tuning the iRPE ViT classifier on DeepSpeed: ``deepspeed lomar_fast/finetune.py --deepspeed_config
ds_configs/zero2.json --finetune model.pth --data_path train.beton --val_path val.beton --model vit_base_patch16``
(also ``torchrun`` or plain ``python -m lomar_fast.finetune``). ``--eval`` alone evaluates a checkpoint.

The step: uint8 batch from FFCV -> normalize, random erasing, Mixup/CutMix with label smoothing on the device
(lomar_fast.data.augment) -> engine forward (drop path) -> soft-target cross-entropy -> backward -> ZeRO step;
every parameter group carries its layer-decay ``lr_scale``. After each epoch the whole val set is evaluated,
each image exactly once across ranks. Checkpoints: DeepSpeed tags ``last_epochNNNN`` (what ``--resume auto``
continues) and ``best_epochNNNN``, plus ``checkpoint-best.pth``: the classifier's float32 weights, loadable
by ``--finetune``, ``timm.create_model(..., checkpoint_path=)`` and ``lomar_fast.knn``. The loop itself is
lomar_fast.trainer's.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from lomar_fast import run_dir
from lomar_fast.checkpoint import load_weights, module_state_dict, named, save_checkpoint
from lomar_fast.cli import run_cli
from lomar_fast.config import FinetuneConfig, parse_config
from lomar_fast.errors import ConfigError
from lomar_fast.evaluate import evaluate
from lomar_fast.layer_decay import param_groups_layer_decay
from lomar_fast.models import create_model
from lomar_fast.models.classifier import describe_load, load_finetune_weights
from lomar_fast.trainer import Trainer

BEST_PTH = "checkpoint-best.pth"
CLASSIFIER_FIX = "pass a fine-tuned checkpoint-best.pth, or --resume a fine-tuning run's --output_dir"


def build_model(cfg: FinetuneConfig, nb_classes: int):
    depth = {} if cfg.depth is None else {"depth": cfg.depth}
    return create_model(cfg.model, img_size=cfg.input_size, num_classes=nb_classes, drop_path=cfg.drop_path,
                        global_pool=cfg.global_pool, **depth)


def eval_weights(cfg: FinetuneConfig, sd: dict | None, file_obj: Any = None) -> tuple[int | None, str, list[str]]:
    """``--eval``: the weights to evaluate, checked before any work. The model settings they were trained with
    are taken for every one the user did not set: from a fine-tuned checkpoint's ``args`` (``--finetune``) or
    from the run settings saved with the tag (``--resume``). Weights without a classifier head (a pretraining
    export or run) are refused. ``sd``: the ``--finetune`` file's state dict, and ``file_obj`` the object it came
    from, both read already. Returns (the head's rows, the
    weights' name, lines for the log)."""
    if cfg.resume:
        point = run_dir.find_resume(cfg.resume, cfg.output_dir, "last")
        if point is None:
            raise ConfigError(f"--eval --resume {cfg.resume}: no complete checkpoint in --output_dir {cfg.output_dir}; "
                              f"pass a fine-tuning run's folder, DIR/best or a tag directory to --resume, or "
                              f"--finetune checkpoint-best.pth")
        run = run_dir.saved_run(point)
        weights, saved = f"--resume {point}", run.get("config") or {}
        model = str(saved.get("model") or "")
        if model.startswith("lomar_") or (not model and run_dir.parse_tag(point.tag)[0] == "epoch"):
            which = f" ({model})" if model else ""
            raise ConfigError(f"--eval {weights} is a pretraining checkpoint{which}, which has no classifier to "
                              f"evaluate; fine-tune it first (python -m lomar_fast.export, then --finetune model.pth "
                              f"without --eval), or {CLASSIFIER_FIX}")
        taken, kept = cfg.adopt_args(saved, weights, refuse=("model",))
        taken += adopt_zero_stage(cfg, run.get("zero_stage"), weights)
        shapes = run_dir.saved_shapes(point)
        blocks = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
        if blocks and cfg.depth is not None and cfg.depth != blocks:
            raise ConfigError(f"--depth {cfg.depth} differs from the {blocks} blocks of {weights}; leave --depth out "
                              f"(--eval takes the run's settings)")
        head = shapes.get("head.weight")
        rows = int(head[0]) if head else saved.get("nb_classes")
    elif sd is not None:
        weights = f"--finetune {cfg.finetune}"
        missing = [k for k in ("head.weight", "head.bias") if k not in sd]
        if missing:
            raise ConfigError(f"--eval {weights} holds no classifier head ({', '.join(missing)}; a pretraining export "
                              f"has none), so the evaluation would score a randomly initialized one; {CLASSIFIER_FIX}")
        taken, kept = cfg.adopt_checkpoint_args(cfg.finetune, file_obj)
        rows = int(sd["head.weight"].shape[0])
    else:  # no weights: validate() says what to pass
        return None, "", []
    return rows, weights, ([f"from the training settings of {weights}: {', '.join(taken)}"] if taken else []) + kept


def adopt_zero_stage(cfg: FinetuneConfig, saved: int | None, weights: str) -> list[str]:
    """``--eval --resume``: a ZeRO-3 tag holds its weights in partitions only a ZeRO-3 engine loads, and a ZeRO-0-2
    tag in one file a ZeRO-3 engine does not read. The run's stage is taken when --zero_stage was not given
    (['zero_stage=S'] when that changes the JSON's); a --zero_stage on the other side of that line is refused."""
    from lomar_fast.ds_config import load_ds_config, zero_stage_of

    if saved is None:
        return []
    if "zero_stage" in cfg.explicit:
        if (cfg.zero_stage == 3) != (saved == 3):
            raise ConfigError(f"--zero_stage {cfg.zero_stage} cannot load {weights}, saved under ZeRO-{saved}; leave "
                              f"--zero_stage out (--eval takes the run's)")
        return []
    cfg.zero_stage = int(saved)
    return [] if zero_stage_of(load_ds_config(cfg.deepspeed_config)) == saved else [f"zero_stage={saved}"]


def check_labels(cfg: FinetuneConfig, nb_classes: int) -> None:
    """Every label of the data read must index a row of the head, whether or not a classes.json says how many
    classes there are: a label past the head fails inside the loss or the evaluation (on a GPU, as a device-side
    assert). Reads only the .beton's metadata."""
    from lomar_fast.data.beton import dataset_info

    for flag in ("val_path",) if cfg.eval else ("data_path", "val_path"):
        path = getattr(cfg, flag)
        span = dataset_info(path).get("label_range")
        if span is not None and (span[0] < 0 or span[1] >= nb_classes):
            fix = ("evaluate it on data of the classes the head was fine-tuned on" if cfg.eval else
                   f"pass --nb_classes {span[1] + 1} or more, or write classes.json beside it (data_prep.write_beton "
                   f"does)")
            raise ConfigError(f"--{flag} {path} holds labels {span[0]} to {span[1]}, outside the {nb_classes} "
                              f"classes of the head (0 to {nb_classes - 1}); {fix}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv, FinetuneConfig, "LoMaR fine-tuning")
    # read once, before any work: a file that is not a weights file stops here
    file_obj, sd = load_weights(cfg.finetune, "--finetune") if cfg.finetune and Path(cfg.finetune).is_file() else (
        None, None)
    head_rows, weights, notes = eval_weights(cfg, sd, file_obj) if cfg.eval else (None, "", [])
    cfg.validate()
    nb_classes = cfg.resolve_nb_classes(head_rows, weights)
    check_labels(cfg, nb_classes)
    from lomar_fast.data import build_finetune_loader
    from lomar_fast.data.augment import BatchAugment
    from lomar_fast.data.shard import build_shard

    trainer = Trainer(cfg, "last", None if cfg.clip_grad is None else {"gradient_clipping": float(cfg.clip_grad)})
    dev, dtype = trainer.device, trainer.input_dtype  # fp32 under torch_autocast: the engine casts inside matmuls
    val = build_shard(cfg.val_path, trainer.micro, cfg.input_size, dev, cfg.num_workers, os_cache=cfg.os_cache,
                      interpolation=cfg.interpolation)
    if not cfg.eval:
        trainer.set_loader(build_finetune_loader(
            cfg.data_path, batch_size=trainer.micro, input_size=cfg.input_size, num_workers=cfg.num_workers,
            device=dev, distributed=trainer.world > 1, seed=cfg.seed, os_cache=cfg.os_cache,
            batches_ahead=cfg.batches_ahead, interpolation=cfg.interpolation))
    loaded: list[str] = []

    def make_model():
        model = build_model(cfg, nb_classes)
        if sd is not None and not (cfg.eval and cfg.resume):
            report = load_finetune_weights(model, sd, named(cfg.finetune, "--finetune"))
            if cfg.eval and report["initialized"]:
                pooled = (" (a model that pools by its cls token has no fc_norm: add --no_global_pool)"
                          if all(k.startswith("fc_norm.") for k in report["initialized"]) and cfg.global_pool else "")
                raise ConfigError(f"--eval --finetune {cfg.finetune} does not hold {', '.join(report['initialized'])} "
                                  f"of this classifier{pooled}, so the evaluation would score them randomly "
                                  f"initialized; {CLASSIFIER_FIX}")
            loaded.append(describe_load(report, cfg.finetune))
        return model

    model = trainer.build(make_model, lambda m: param_groups_layer_decay(m, cfg.weight_decay, cfg.layer_decay),
                          betas=(0.9, 0.999))
    sd = file_obj = None  # loaded into the model
    if cfg.eval:
        return evaluate_only(cfg, trainer, val, nb_classes, notes, loaded)
    trainer.resume()
    trainer.state.setdefault("best_top1", -1.0)
    trainer.state.setdefault("best_epoch", -1)
    augment = BatchAugment(cfg, nb_classes, dev)
    logger = trainer.open_logger()
    logger.info(loaded[0] if loaded else "no --finetune weights: training from random initialization"
                if not trainer.resumed else f"weights from {trainer.resumed}")
    logger.info(trainer.describe(model, f", {len(model.blocks)} blocks, {nb_classes} classes, {cfg.input_size} px")
                + f", layer decay {cfg.layer_decay}, {val.total} val images")

    def step(batch, info):
        x, targets = augment(*batch, info)
        return augment.criterion(trainer.engine(x.to(dtype)).float(), targets)

    def end_epoch(epoch: int, record: dict) -> dict:
        trainer.engine.eval()
        res = evaluate(trainer.engine, val, dtype, nb_classes)
        if res["val_top1"] > trainer.state["best_top1"]:
            trainer.state.update(best_top1=res["val_top1"], best_epoch=epoch)
            trainer.save("best", epoch)
            sd = module_state_dict(trainer.engine.module)  # every rank: ZeRO-3 gathers
            if trainer.rank == 0:
                save_checkpoint(sd, Path(cfg.output_dir, BEST_PTH), epoch=epoch, val_top1=res["val_top1"],
                                val_top5=res["val_top5"], args=cfg.to_dict(), nb_classes=nb_classes)
        return {**res, **trainer.state}

    last = trainer.fit(step, end_epoch)
    if trainer.rank == 0 and last:
        print(f"best val top-1 {trainer.state['best_top1']:.2f}% at epoch {trainer.state['best_epoch']}; "
              f"weights: {Path(cfg.output_dir, BEST_PTH)}")
    return last


def evaluate_only(cfg: FinetuneConfig, trainer: Trainer, val, nb_classes: int, notes: list[str],
                  loaded: list[str]) -> dict:
    """``--eval``: the weights of ``--resume`` (a tag, a family such as DIR/best, or a run) or ``--finetune``."""
    point = trainer.resume(module_only=True)
    trainer.engine.eval()
    res = evaluate(trainer.engine, val, trainer.input_dtype, nb_classes)
    if trainer.rank == 0:
        for line in notes + loaded:
            print(line)
        print(f"eval {point or cfg.finetune}: top-1 {res['val_top1']:.2f}%  top-5 {res['val_top5']:.2f}%  loss "
              f"{res['val_loss']:.4f}  ({res['val_n']} images of {cfg.val_path}, {trainer.world} rank(s))")
        sys.stdout.flush()
    return res


if __name__ == "__main__":
    run_cli(main)

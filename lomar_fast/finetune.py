"""Fine-tuning the iRPE ViT classifier on DeepSpeed: ``deepspeed lomar_fast/finetune.py --deepspeed_config
ds_configs/zero2.json --finetune model.pth --data_path train.beton --val_path val.beton --model vit_base_patch16``
(also ``torchrun`` or plain ``python -m lomar_fast.finetune``). ``--eval`` alone evaluates a checkpoint.

The step, top-down: uint8 batch from FFCV -> normalize on the device -> random erasing -> Mixup/CutMix
with label smoothing -> engine forward (drop path) -> soft-target cross-entropy -> backward -> ZeRO step.
The lr follows a per-iteration warmup + cosine; every parameter group carries its layer-decay
``lr_scale``. After each epoch the whole val set is evaluated, each image exactly once across ranks;
DeepSpeed tags ``last`` and ``best`` are kept, plus ``checkpoint-best.pth`` (the classifier's weights in
float32, loadable by ``--finetune``, ``timm.create_model(..., checkpoint_path=)`` and ``lomar_fast.knn``).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from lomar_fast.checkpoint import CheckpointMismatch, load_file, save_checkpoint
from lomar_fast.config import RunConfig, parse_config
from lomar_fast.engine import (ConfigError, LossMeter, build_adamw, check_output_dir, compute_dtype,
                               effective_lr, lr_at, run_cli, set_lr, start_run)
from lomar_fast.layer_decay import param_groups_layer_decay
from lomar_fast.ops.window_gather import normalize_images
from lomar_fast.precision import param_dtype

BEST_PTH = "checkpoint-best.pth"


@dataclass
class FinetuneConfig(RunConfig):
    # model
    model: str = "vit_base_patch16"
    input_size: int = 224
    nb_classes: int | None = None
    drop_path: float = 0.1
    global_pool: bool = True
    depth: int | None = None
    finetune: str | None = None
    # optimisation (MAE fine-tuning recipe)
    batch_size: int = 64
    accum_iter: int = 1
    epochs: int = 100
    warmup_epochs: int = 5
    blr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    clip_grad: float | None = None
    # augmentation
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    # data
    data_path: str = ""
    val_path: str = ""
    # run
    eval: bool = False
    save_every: int = 1


HELP = {
    "model": "classifier factory name (vit_{tiny,small,base,large,huge}_patch16)",
    "input_size": "image side in pixels (multiple of 16; 384 from 224 pretraining works as is)",
    "nb_classes": "number of classes (default: the length of classes.json beside --data_path, else 1000)",
    "drop_path": "stochastic depth rate of the last block (linear from 0)",
    "global_pool": "average the patch tokens (true) or take the cls token (false)",
    "depth": "override the model's block count (small demo and test models)",
    "finetune": "initial weights: a lomar_fast export, a published LoMaR checkpoint or a fine-tuned "
                "checkpoint-best.pth (the head is kept only if its shape fits)",
    "batch_size": "micro-batch per GPU (DeepSpeed train_micro_batch_size_per_gpu)",
    "blr": "base lr: lr = blr * effective batch / 256",
    "min_lr": "lr floor of the cosine schedule",
    "layer_decay": "layer-wise lr decay: block i trains at layer_decay ** (depth - i) of the head's lr",
    "clip_grad": "gradient-norm clipping (DeepSpeed gradient_clipping; default: the JSON's)",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "mixup_prob": "probability of applying mixup or cutmix to a batch",
    "mixup_switch_prob": "probability of cutmix instead of mixup when both are on",
    "mixup_mode": "batch, pair or elem: how mixup parameters are drawn",
    "smoothing": "label smoothing",
    "reprob": "random erasing probability per image",
    "remode": "random erasing fill: pixel (per-pixel noise), rand (per-block colour) or const (zeros)",
    "recount": "random erasing boxes per image",
    "data_path": "train.beton with labels (data_prep/write_beton.py; make demo-data)",
    "val_path": "val.beton with labels, evaluated after every epoch",
    "output_dir": "where checkpoints (tags last, best; checkpoint-best.pth) and the JSONL log go",
    "resume": "'auto' (tag last in output_dir, if any) or a checkpoint directory / tag directory; "
              "with --eval, the checkpoint to evaluate",
    "eval": "only evaluate --finetune or --resume on --val_path and print top-1/top-5",
    "save_every": "save the DeepSpeed tag 'last' every N epochs (and at the end)",
    "exit_after_epochs": "save and exit after this many epochs in this invocation (--resume auto continues)",
}

_CHOICES = {"mixup_mode": ("batch", "pair", "elem"), "remode": ("pixel", "rand", "const")}


# ------------------------------------------------------------------------------------------ checks
def classes_beside(path: str) -> list[str] | None:
    """The class list of ``classes.json`` beside a .beton, or None."""
    p = Path(path).parent / "classes.json"
    if not path or not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return [str(c) for c in data] if isinstance(data, list) else None


def resolve_nb_classes(cfg: FinetuneConfig, head_rows: int | None = None) -> int:
    """Flag > (with --eval) the checkpoint head's rows > classes.json beside the data > 1000."""
    classes = classes_beside(cfg.data_path) or classes_beside(cfg.val_path)
    if cfg.nb_classes is not None:
        if cfg.nb_classes < 1:
            raise ConfigError(f"--nb_classes {cfg.nb_classes} must be at least 1")
        if classes is not None and cfg.nb_classes < len(classes):
            raise ConfigError(f"--nb_classes {cfg.nb_classes} is smaller than the {len(classes)} classes in "
                              f"classes.json beside the data; raise it or leave it out")
        return cfg.nb_classes
    if cfg.eval and head_rows is not None:
        return head_rows
    return len(classes) if classes is not None else 1000


def validate(cfg: FinetuneConfig) -> None:
    """Every check that needs no GPU and no data read, so bad input stops before any work."""
    from lomar_fast.models import model_names

    if not cfg.model.startswith("vit_") or cfg.model not in model_names():
        raise ConfigError(f"--model {cfg.model} is not a fine-tuning model; use vit_{{tiny,small,base,large,huge}}"
                          f"_patch16")
    if cfg.input_size < 16 or cfg.input_size % 16:
        raise ConfigError(f"--input_size {cfg.input_size} must be a positive multiple of the patch size 16")
    if not cfg.eval:
        if not cfg.data_path:
            raise ConfigError("--data_path is required: a labelled train.beton (make demo-data builds "
                              "data/demo/train.beton)")
        if not Path(cfg.data_path).is_file():
            raise ConfigError(f"--data_path {cfg.data_path} does not exist; build it with make prep-imagenet or "
                              f"make demo-data")
    if not cfg.val_path:
        raise ConfigError("--val_path is required: the labelled val.beton evaluated after every epoch")
    if not Path(cfg.val_path).is_file():
        raise ConfigError(f"--val_path {cfg.val_path} does not exist; build it with make prep-imagenet or "
                          f"make demo-data")
    if cfg.finetune and not Path(cfg.finetune).is_file():
        raise ConfigError(f"--finetune {cfg.finetune} does not exist; pass a model.pth from lomar_fast.export "
                          f"(make pretrain writes output/demo/model.pth) or a published LoMaR checkpoint")
    if cfg.eval and not (cfg.finetune or cfg.resume):
        raise ConfigError("--eval needs the weights to evaluate: --finetune checkpoint-best.pth or --resume DIR")
    for name in ("batch_size", "accum_iter", "epochs", "save_every", "log_every", "recount"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.depth is not None and cfg.depth < 1:
        raise ConfigError(f"--depth {cfg.depth} must be at least 1")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup_epochs {cfg.warmup_epochs} must be between 0 and --epochs {cfg.epochs}")
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise ConfigError(f"--layer_decay {cfg.layer_decay} must be in (0, 1] (1 turns layer decay off)")
    for name in ("drop_path", "smoothing", "reprob", "mixup_prob", "mixup_switch_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"--{name} {getattr(cfg, name)} must be between 0 and 1")
    if cfg.smoothing >= 1.0:
        raise ConfigError("--smoothing must be below 1")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise ConfigError("--mixup and --cutmix are Beta-distribution alphas: 0 (off) or positive")
    if mixup_active(cfg) and cfg.batch_size % 2 and not cfg.eval:
        raise ConfigError(f"--batch_size {cfg.batch_size} must be even with mixup/cutmix (pairs are mixed); "
                          f"use an even batch or --mixup 0 --cutmix 0")
    if cfg.remode not in _CHOICES["remode"] or cfg.mixup_mode not in _CHOICES["mixup_mode"]:
        raise ConfigError(f"--remode must be one of {_CHOICES['remode']} and --mixup_mode one of {_CHOICES['mixup_mode']}")
    if not cfg.eval:
        check_output_dir(cfg.output_dir)


def mixup_active(cfg: FinetuneConfig) -> bool:
    return (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0


# ------------------------------------------------------------------------------------------ model
def build_model(cfg: FinetuneConfig, nb_classes: int):
    from lomar_fast.models import create_model

    kw: dict[str, Any] = dict(img_size=cfg.input_size, num_classes=nb_classes, drop_path=cfg.drop_path,
                              global_pool=cfg.global_pool)
    if cfg.depth is not None:
        kw["depth"] = cfg.depth
    return create_model(cfg.model, **kw)


def load_finetune_weights(model, path_or_sd) -> dict[str, list[str]]:
    """Encoder weights from a pretraining export / published checkpoint, plus ``fc_norm`` and ``head``
    when the checkpoint is a fine-tuned classifier whose head fits. Returns load_pretrained's report
    ({"used", "dropped", "initialized"}) updated accordingly."""
    sd = load_file(path_or_sd) if not isinstance(path_or_sd, dict) else path_or_sd
    try:
        report = model.load_pretrained(sd)
    except CheckpointMismatch as e:
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        hint = (f" (the checkpoint has {n_blocks} blocks, the model {len(model.blocks)}: pass --depth {n_blocks} "
                f"or the matching --model)") if n_blocks and n_blocks != len(model.blocks) else ""
        raise CheckpointMismatch(f"{e}{hint}") from e
    own = model.state_dict()
    extra = {k: v for k, v in sd.items() if k in report["initialized"] and tuple(v.shape) == tuple(own[k].shape)}
    if extra and {k for k in own if k.startswith(("fc_norm.", "head."))} == set(extra):
        model.load_state_dict(extra, strict=False)
        report = {"used": sorted(report["used"] + list(extra)),
                  "dropped": sorted(k for k in report["dropped"] if k not in extra), "initialized": []}
    return report


def describe_load(report: dict[str, list[str]], path: str) -> str:
    used, dropped, fresh = report["used"], report["dropped"], report["initialized"]
    return (f"loaded {len(used)} tensors from {path}; dropped {len(dropped)}: {', '.join(dropped) or '-'}; "
            f"freshly initialized: {', '.join(fresh) or '-'}")


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(forward, loader, n_local: int, n_total: int, device: torch.device, dtype: torch.dtype,
             num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over the whole val set.

    ``loader`` reads this rank's disjoint slice (lomar_fast.knn.build_shard_loader); counts are summed
    over ranks, and the total counted must equal the file's image count (each image exactly once).
    """
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, n, loss sum
    k = min(5, num_classes)
    if loader is not None:
        for images, labels in loader:
            labels = labels.reshape(-1).long()
            logits = forward(normalize_images(images).to(dtype)).float()
            top = logits.topk(k, dim=1).indices
            hit = top == labels[:, None]
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            counts += torch.stack([hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                                   torch.tensor(float(labels.numel()), device=device, dtype=torch.float64),
                                   loss.double()])
    if int(counts[2].item()) != n_local:
        raise RuntimeError(f"evaluation read {int(counts[2].item())} images of this rank's {n_local}")
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(counts)
    n = int(counts[2].item())
    if n != n_total:
        raise RuntimeError(f"evaluation counted {n} images, the val set holds {n_total}")
    return {"val_top1": 100.0 * float(counts[0]) / n, "val_top5": 100.0 * float(counts[1]) / n,
            "val_loss": float(counts[3]) / n, "val_n": n}


# --------------------------------------------------------------------------------------- checkpoints
ADOPTED_ARGS = ("model", "depth", "input_size", "global_pool")


def adopt_checkpoint_args(cfg: FinetuneConfig, path: str) -> list[str]:
    """For ``--eval --finetune checkpoint-best.pth``: take the model settings the checkpoint was trained
    with (saved under ``args``) for every one the user did not set. Returns 'name=value' of those taken."""
    try:
        args = torch.load(path, map_location="cpu", weights_only=True).get("args") or {}
    except Exception:  # noqa: BLE001 - no readable args: keep the flags
        return []
    taken = []
    for name in ADOPTED_ARGS:
        if name in args and name not in cfg.explicit and args[name] != getattr(cfg, name):
            setattr(cfg, name, args[name])
            taken.append(f"{name}={args[name]}")
    return taken


def find_resume(cfg: FinetuneConfig) -> tuple[str, str] | None:
    """(checkpoint dir, tag) to resume from, or None. ``auto``: tag 'last' under output_dir if present."""
    if not cfg.resume:
        return None
    root = Path(cfg.output_dir if cfg.resume == "auto" else cfg.resume)
    if (root / "last").is_dir():
        return str(root), "last"
    if root.is_dir() and any(root.glob("mp_rank_*_model_states.pt")):
        return str(root.parent), root.name  # a tag directory, e.g. OUTPUT/best
    if cfg.resume == "auto":
        return None
    raise ConfigError(f"--resume {root}: no fine-tuning checkpoint there (no 'last' tag directory)")


def save_best_pth(module, path: Path, rank: int, **extra) -> None:
    """The classifier's weights as float32 ``{"model": state_dict, ...}`` (all ranks call: ZeRO-3 gathers)."""
    from lomar_fast.knn import module_state_dict

    sd = module_state_dict(module)
    if rank == 0:
        save_checkpoint(sd, path, **extra)


# ----------------------------------------------------------------------------------------------- main
def build_augment(cfg: FinetuneConfig, nb_classes: int, device: torch.device):
    """(mixup or None, random erasing or None, training criterion)."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup = None
    if mixup_active(cfg):
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=nb_classes)
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    erase = None
    if cfg.reprob > 0:
        erase = RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device=device)
    return mixup, erase, criterion


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv, FinetuneConfig, "LoMaR fine-tuning", HELP)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    validate(cfg)
    head_rows, adopted = None, []
    if cfg.eval and cfg.finetune:
        head = load_file(cfg.finetune).get("head.weight")
        if head is not None:  # a fine-tuned classifier (checkpoint-best.pth), not a pretraining export
            head_rows = int(head.shape[0])
            adopted = adopt_checkpoint_args(cfg, cfg.finetune)
    nb_classes = resolve_nb_classes(cfg, head_rows)
    import deepspeed

    from lomar_fast.data import build_finetune_loader, set_epoch
    from lomar_fast.knn import build_shard_loader
    from lomar_fast.logging_utils import RunLogger

    clip = {} if cfg.clip_grad is None else {"gradient_clipping": float(cfg.clip_grad)}
    device, ds_cfg, rank, world = start_run(cfg, clip)
    micro, accum = cfg.batch_size, cfg.accum_iter
    eff_batch = micro * accum * world
    base_lr = effective_lr(cfg.blr, cfg.lr, eff_batch)
    dtype = compute_dtype(ds_cfg)
    input_dtype = param_dtype(ds_cfg)  # fp32 under torch_autocast: the engine's autocast casts inside each matmul

    val_loader, n_val_local, n_val = build_shard_loader(cfg.val_path, micro, cfg.input_size, device,
                                                        cfg.num_workers, rank, world, cfg.os_cache)
    loader, steps_per_epoch = None, 0
    if not cfg.eval:
        loader = build_finetune_loader(cfg.data_path, batch_size=micro, input_size=cfg.input_size,
                                       num_workers=cfg.num_workers, device=device, distributed=world > 1,
                                       seed=cfg.seed, os_cache=cfg.os_cache, batches_ahead=cfg.batches_ahead)
        steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        if steps_per_epoch < 1:
            raise ConfigError(f"--data_path {cfg.data_path} gives no full batch of {micro} per rank on {world} "
                              f"rank(s); lower --batch_size")

    torch.manual_seed(cfg.seed)  # identical initial weights (and head) on every rank
    model = build_model(cfg, nb_classes)
    load_msg = None
    if cfg.finetune and not (cfg.eval and cfg.resume):
        load_msg = describe_load(load_finetune_weights(model, cfg.finetune), cfg.finetune)
    groups = param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = build_adamw(groups, base_lr, betas=(0.9, 0.999), device=device)
    if cfg.compile:
        model.compile()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    scales = [g.get("lr_scale") for g in optimizer.param_groups]
    if None in scales or len(scales) != len(groups):
        raise RuntimeError("the DeepSpeed optimizer lost the layer-decay lr_scale of its param groups")
    seed_all = cfg.seed * 1000 + rank  # mixup / erasing draws differ per rank
    torch.manual_seed(seed_all)
    np.random.seed(seed_all % 2**32)
    random.seed(seed_all)

    def forward(x):
        return engine(x)

    start_epoch, step, best, best_epoch = 0, 0, -1.0, -1
    resume = find_resume(cfg)
    if resume is not None:
        path, client = engine.load_checkpoint(resume[0], tag=resume[1], load_module_only=cfg.eval,
                                              load_optimizer_states=not cfg.eval,
                                              load_lr_scheduler_states=not cfg.eval)
        if path is None:
            raise ConfigError(f"--resume: could not load checkpoint {resume[1]} from {resume[0]}")
        client = client or {}
        start_epoch, step = int(client.get("epoch", -1)) + 1, int(client.get("step", 0))
        best, best_epoch = float(client.get("best_top1", -1.0)), int(client.get("best_epoch", -1))

    if cfg.eval:
        engine.eval()
        res = evaluate(forward, val_loader, n_val_local, n_val, device, input_dtype, nb_classes)
        if rank == 0:
            if adopted:
                print(f"from the checkpoint's training settings: {', '.join(adopted)}")
            if load_msg:
                print(load_msg)
            src = f"{resume[0]}/{resume[1]}" if resume else cfg.finetune
            print(f"eval {src}: top-1 {res['val_top1']:.2f}%  top-5 {res['val_top5']:.2f}%  loss {res['val_loss']:.4f}"
                  f"  ({res['val_n']} images of {cfg.val_path}, {world} rank(s))")
            sys.stdout.flush()
        return res

    mixup, erase, criterion = build_augment(cfg, nb_classes, device)
    logger = RunLogger(cfg, rank=rank, total_epochs=cfg.epochs)
    if load_msg:
        logger.info(load_msg)
    elif not resume:
        logger.info("no --finetune weights: training from random initialization")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model {cfg.model} ({n_params / 1e6:.1f}M params, {len(model.blocks)} blocks, {nb_classes} classes, "
                f"{cfg.input_size} px), {world} rank(s) on {device.type}, {dtype}, "
                f"ZeRO-{ds_cfg.get('zero_optimization', {}).get('stage', 0)}, micro-batch {micro} x accum {accum} x "
                f"{world} = {eff_batch}, lr {base_lr:.3g}, layer decay {cfg.layer_decay}, {steps_per_epoch} steps/epoch, "
                f"{n_val} val images" + (f", resumed at epoch {start_epoch} step {step}" if resume else ""))
    last: dict = {}
    meter = LossMeter(device, cfg.log_every, cfg.output_dir)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch(loader, epoch)
            engine.train()
            logger.start_epoch(epoch, steps_per_epoch)
            meter.start_epoch()
            epoch_t0 = time.perf_counter()
            lr = base_lr
            for i, (images, labels) in enumerate(loader):
                if i >= steps_per_epoch:
                    break
                lr = lr_at(step, steps_per_epoch, base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                set_lr(optimizer, lr)
                x = normalize_images(images)
                targets = labels.reshape(-1).long()
                if erase is not None:
                    x = erase(x)
                if mixup is not None:
                    x, targets = mixup(x, targets)
                logits = engine(x.to(input_dtype))
                loss = criterion(logits.float(), targets)
                engine.backward(loss)
                engine.step()
                meter.add(loss)
                step += 1
                if meter.due(i, steps_per_epoch - 1):
                    value, n, dt = meter.read(epoch, step)
                    group_lrs = [g["lr"] for g in optimizer.param_groups]
                    logger.log_steps(epoch=epoch, step=step, loss=value, lr=max(group_lrs),
                                     images_per_sec=n * micro * world / dt, n=n, lr_low=min(group_lrs))
            epoch_time = time.perf_counter() - epoch_t0
            engine.eval()
            res = evaluate(forward, val_loader, n_val_local, n_val, device, input_dtype, nb_classes)
            improved = res["val_top1"] > best
            if improved:
                best, best_epoch = res["val_top1"], epoch
            last = dict(epoch=epoch, step=step, loss=meter.epoch_mean, lr=lr, **res, best_top1=best,
                        best_epoch=best_epoch, epoch_time=epoch_time,
                        images_per_sec=meter.epoch_steps * micro * world / max(epoch_time, 1e-9))
            logger.end_epoch(**last)
            client = dict(epoch=epoch, step=step, best_top1=best, best_epoch=best_epoch, config=cfg.to_dict(),
                          world_size=world, nb_classes=nb_classes, val=res)
            if improved:
                engine.save_checkpoint(cfg.output_dir, tag="best", client_state=client, save_latest=False)
                save_best_pth(engine.module, Path(cfg.output_dir, BEST_PTH), rank, epoch=epoch,
                              val_top1=res["val_top1"], val_top5=res["val_top5"], args=cfg.to_dict(),
                              nb_classes=nb_classes)
            stopping = cfg.exit_after_epochs is not None and epoch + 1 - start_epoch >= cfg.exit_after_epochs
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stopping:
                engine.save_checkpoint(cfg.output_dir, tag="last", client_state=client)
            if stopping:
                logger.info(f"exiting after {cfg.exit_after_epochs} epoch(s) as asked; --resume auto continues")
                break
    finally:
        logger.close()
    if rank == 0 and not last:
        print(f"nothing to train: the run in {cfg.output_dir} already reached epoch {cfg.epochs}")
    elif rank == 0:
        Path(cfg.output_dir, "summary.json").write_text(json.dumps({**last, "config": cfg.to_dict()}, indent=1))
        print(f"best val top-1 {best:.2f}% at epoch {best_epoch}; weights: {Path(cfg.output_dir, BEST_PTH)}")
    return last


if __name__ == "__main__":
    run_cli(main, CheckpointMismatch)

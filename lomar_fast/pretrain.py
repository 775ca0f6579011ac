"""LoMaR pretraining on DeepSpeed: ``deepspeed lomar_fast/pretrain.py --deepspeed_config ds_configs/zero2.json
--data_path train.beton --model lomar_vit_base_patch16 ...`` (also ``torchrun`` or plain ``python -m``).

The step, top-down: uint8 batch from FFCV -> windows and masks drawn on the device from a stream
seeded by (seed, rank, step) -> engine forward (window gather, encoder, loss) -> backward -> ZeRO step.
The loss stays on the device and is read back every ``--log_every`` steps.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lomar_fast.config import PretrainConfig, parse_config
from lomar_fast.engine import (ConfigError, LossMeter, build_adamw, check_output_dir, compute_dtype,
                               effective_lr, lr_at, param_groups_weight_decay, run_cli, set_lr, start_run)
from lomar_fast.logging_utils import RunLogger
from lomar_fast.models import create_model
from lomar_fast.models.lomar import validate_lomar_geometry

STREAM_SALT = 0x5DEECE66D


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the window/mask stream at a given optimizer-independent micro-step: resumable by construction."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + STREAM_SALT) % (2**63 - 1)


def validate(cfg: PretrainConfig) -> None:
    """Every check that needs no GPU and no data read, so bad input stops before any work."""
    if not cfg.model.startswith("lomar_"):
        raise ConfigError(f"--model {cfg.model} is not a LoMaR pretraining model; use lomar_vit_*_patch16 "
                          f"(benchmarks/throughput.py runs the MAE baseline)")
    if not cfg.data_path:
        raise ConfigError("--data_path is required: the train.beton written by data_prep/write_beton.py "
                          "(make demo-data builds data/demo/train.beton)")
    if not Path(cfg.data_path).is_file():
        raise ConfigError(f"--data_path {cfg.data_path} does not exist; build it with make prep-imagenet or "
                          f"make demo-data")
    validate_lomar_geometry(cfg.input_size, 16, cfg.window_size, cfg.num_window, cfg.mask_ratio)
    for name in ("batch_size", "accum_iter", "epochs", "save_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup_epochs {cfg.warmup_epochs} must be between 0 and --epochs {cfg.epochs}")
    if cfg.knn_every < 0:
        raise ConfigError(f"--knn_every {cfg.knn_every} must be 0 (off) or a positive number of epochs")
    if cfg.knn_every and not (cfg.knn_train and cfg.knn_val):
        raise ConfigError("--knn_every needs --knn_train and --knn_val: labelled .beton files (make demo-data "
                          "builds data/demo/train.beton and val.beton)")
    if (cfg.knn_train or cfg.knn_val) and not cfg.knn_every:
        raise ConfigError("--knn_train/--knn_val are only read by the k-NN monitor: add --knn_every N")
    for flag in ("knn_train", "knn_val"):
        if cfg.knn_every and not Path(getattr(cfg, flag)).is_file():
            raise ConfigError(f"--{flag} {getattr(cfg, flag)} does not exist")
        if cfg.knn_every:
            from lomar_fast.data.beton import check_beton

            check_beton(getattr(cfg, flag), need_label=True, input_size=cfg.input_size)
    check_output_dir(cfg.output_dir)


def find_resume(cfg: PretrainConfig) -> tuple[str, str] | None:
    """(checkpoint dir, tag) to resume from, or None. ``auto`` takes the latest under output_dir."""
    if not cfg.resume:
        return None
    root = Path(cfg.output_dir if cfg.resume == "auto" else cfg.resume)
    if cfg.resume != "auto" and (root / "latest").is_file() is False and root.parent.joinpath("latest").is_file():
        return str(root.parent), root.name  # a tag directory was given
    latest = root / "latest"
    if not latest.is_file():
        if cfg.resume == "auto":
            return None  # nothing to resume yet: start fresh
        raise ConfigError(f"--resume {root}: no DeepSpeed checkpoint there (no 'latest' file)")
    return str(root), latest.read_text().strip()


def epoch_losses(output_dir: str) -> list[tuple[int, float]]:
    """(epoch, mean loss) of every epoch in the run's JSONL log, the latest record per epoch."""
    path = Path(output_dir, "log.jsonl")
    losses: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "epoch":
                losses[int(rec["epoch"])] = float(rec["loss"])
    return sorted(losses.items())


def build_model(cfg: PretrainConfig):
    return create_model(cfg.model, img_size=cfg.input_size, window_size=cfg.window_size,
                        num_window=cfg.num_window, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                        window_sampling=cfg.window_sampling, pairing=cfg.pairing, drop_path=cfg.drop_path)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    validate(cfg)
    import deepspeed
    from lomar_fast.data import build_pretrain_loader, epoch_order, set_epoch

    device, ds_cfg, rank, world = start_run(cfg)
    micro, accum = cfg.batch_size, cfg.accum_iter
    eff_batch = micro * accum * world
    base_lr = effective_lr(cfg.blr, cfg.lr, eff_batch)
    torch.manual_seed(cfg.seed + rank)

    loader = build_pretrain_loader(cfg.data_path, batch_size=micro, input_size=cfg.input_size,
                                   num_workers=cfg.num_workers, device=device, distributed=world > 1,
                                   seed=cfg.seed, os_cache=cfg.os_cache, batches_ahead=cfg.batches_ahead)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(f"--data_path {cfg.data_path} gives no full batch of {micro} per rank on {world} rank(s); "
                          f"lower --batch_size")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    optimizer = build_adamw(groups, base_lr, device=device)
    if cfg.compile:
        model.compile()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    dtype = compute_dtype(ds_cfg)

    start_epoch, step = 0, 0
    resume = find_resume(cfg)
    if resume is not None:
        path, client = engine.load_checkpoint(resume[0], tag=resume[1])
        if path is None:
            raise ConfigError(f"--resume: could not load checkpoint {resume[1]} from {resume[0]}")
        start_epoch, step = int(client["epoch"]) + 1, int(client["step"])

    logger = RunLogger(cfg, rank=rank, total_epochs=cfg.epochs)
    logger.info(f"model {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), {world} rank(s) "
                f"on {device.type}, {dtype}, ZeRO-{ds_cfg.get('zero_optimization', {}).get('stage', 0)}, micro-batch "
                f"{micro} x accum {accum} x {world} = {eff_batch}, lr {base_lr:.3g}, {steps_per_epoch} steps/epoch"
                + (f", resumed at epoch {start_epoch} step {step}" if resume else ""))
    gen = torch.Generator(device=device)
    meter = LossMeter(device, cfg.log_every, cfg.output_dir)
    last = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            set_epoch(loader, epoch)
            if cfg.record_data_order:
                order_dir = Path(cfg.output_dir, "data_order")
                order_dir.mkdir(exist_ok=True)
                order = epoch_order(loader, epoch)
                (order_dir / f"rank{rank}_epoch{epoch}.json").write_text(json.dumps([int(i) for i in order]))
            engine.train()
            logger.start_epoch(epoch, steps_per_epoch)
            meter.start_epoch()
            epoch_t0 = time.perf_counter()
            for i, batch in enumerate(loader):
                if i >= steps_per_epoch:
                    break
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                lr = lr_at(step, steps_per_epoch, base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                set_lr(optimizer, lr)
                gen.manual_seed(step_seed(cfg.seed, rank, step))
                windows, masks = engine.module.sample(images.shape[0], generator=gen, device=device)
                loss, _, _ = engine(images, windows, masks, validate=False)
                engine.backward(loss)
                engine.step()
                meter.add(loss)
                step += 1
                if meter.due(i, steps_per_epoch - 1):
                    value, n, dt = meter.read(epoch, step)
                    logger.log_steps(epoch=epoch, step=step, loss=value, lr=lr,
                                     images_per_sec=n * micro * world / dt, n=n)
            epoch_time = time.perf_counter() - epoch_t0
            last = dict(epoch=epoch, step=step, loss=meter.epoch_mean, epoch_time=epoch_time,
                        images_per_sec=meter.epoch_steps * micro * world / max(epoch_time, 1e-9))
            if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
                from lomar_fast.knn import monitor

                knn = monitor(engine.module, cfg.knn_train, cfg.knn_val, cfg.input_size, micro, device,
                              cfg.num_workers, dtype)  # every rank takes a slice of the images
                last.update(knn_top1=knn["top1"], knn_top5=knn["top5"], knn_seconds=knn["seconds"])
            logger.end_epoch(**last)
            stopping = cfg.exit_after_epochs is not None and epoch + 1 - start_epoch >= cfg.exit_after_epochs
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs or stopping:
                client = dict(epoch=epoch, step=step, config=cfg.to_dict(), world_size=world)
                engine.save_checkpoint(cfg.output_dir, tag=f"epoch{epoch:04d}", client_state=client)
                logger.info(f"checkpoint {cfg.output_dir}/epoch{epoch:04d}")
            if stopping:
                logger.info(f"exiting after {cfg.exit_after_epochs} epoch(s) as asked; --resume auto continues")
                break
    finally:
        logger.close()
    if rank == 0 and not last:
        print(f"nothing to train: the run in {cfg.output_dir} already reached epoch {cfg.epochs}")
    elif rank == 0:
        Path(cfg.output_dir, "summary.json").write_text(json.dumps({**last, "config": cfg.to_dict()}, indent=1))
    if rank == 0:
        print("loss by epoch: " + " ".join(f"{e}:{v:.4f}" for e, v in epoch_losses(cfg.output_dir)))
    return last


if __name__ == "__main__":
    run_cli(main)

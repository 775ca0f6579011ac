"""LoMaR pretraining on DeepSpeed: ``deepspeed lomar_fast/pretrain.py --deepspeed_config ds_configs/zero2.json
--data_path train.beton --model lomar_vit_base_patch16 ...`` (also ``torchrun`` or plain ``python -m``).

The step: uint8 batch from FFCV -> windows and masks drawn on the device from a stream seeded by
(seed, rank, step) -> engine forward (window gather, encoder, loss) -> backward -> ZeRO step. Checkpoints are
the DeepSpeed tags ``epochNNNN``; ``--resume auto`` continues from the newest complete one. The loop itself
(lr schedule, loss read-back every ``--log_every`` steps, checkpoints, logging) is lomar_fast.trainer's.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lomar_fast.cli import run_cli
from lomar_fast.config import PretrainConfig, parse_config
from lomar_fast.distributed import derived_seed
from lomar_fast.logging_utils import epoch_records
from lomar_fast.models import create_model
from lomar_fast.optim import param_groups_weight_decay
from lomar_fast.trainer import Trainer

WINDOW_STREAM = 0x57  # the window/mask stream's tag among the run's derived seeds


def build_model(cfg: PretrainConfig):
    return create_model(cfg.model, img_size=cfg.input_size, window_size=cfg.window_size,
                        num_window=cfg.num_window, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                        window_sampling=cfg.window_sampling, pairing=cfg.pairing, drop_path=cfg.drop_path)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv, PretrainConfig, "LoMaR pretraining")
    cfg.validate()
    from lomar_fast.data import build_pretrain_loader

    trainer = Trainer(cfg, "epoch")
    dev = trainer.device
    trainer.set_loader(build_pretrain_loader(
        cfg.data_path, batch_size=trainer.micro, input_size=cfg.input_size, num_workers=cfg.num_workers, device=dev,
        distributed=trainer.world > 1, seed=cfg.seed, os_cache=cfg.os_cache, batches_ahead=cfg.batches_ahead,
        interpolation=cfg.interpolation))
    model = trainer.build(lambda: build_model(cfg), lambda m: param_groups_weight_decay(m, cfg.weight_decay),
                          betas=(0.9, 0.95))
    trainer.resume()
    trainer.open_logger().info(trainer.describe(model, ""))
    gen = torch.Generator(device=dev)

    def step(images, info):
        gen.manual_seed(derived_seed(cfg.seed, WINDOW_STREAM, trainer.rank, info.step))  # resumable by construction
        windows, masks = trainer.engine.module.sample(images.shape[0], generator=gen, device=dev)
        loss, _, _ = trainer.engine(images, windows, masks, validate=False)
        return loss

    def end_epoch(epoch: int, record: dict) -> dict:
        if not cfg.knn_every or ((epoch + 1) % cfg.knn_every and epoch + 1 != cfg.epochs):
            return {}
        from lomar_fast.knn import monitor

        knn = monitor(trainer.engine.module, cfg.knn_train, cfg.knn_val, cfg.input_size, trainer.micro, dev,
                      cfg.num_workers, trainer.dtype, cfg.interpolation)  # every rank takes a slice of the images
        return dict(knn_top1=knn["top1"], knn_top5=knn["top5"], knn_weights_l1=knn["weights_l1"],
                    knn_seconds=knn["seconds"])

    last = trainer.fit(step, end_epoch)
    if trainer.rank == 0:
        print("loss by epoch: " + " ".join(f"{r['epoch']}:{r['loss']:.4f}" for r in epoch_records(cfg.output_dir)))
    return last


if __name__ == "__main__":
    run_cli(main)

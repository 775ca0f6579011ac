"""Data loading: FFCV ``.beton`` files -> uint8 NHWC batches on the device.

Builders (see :mod:`lomar_fast.data.loaders` for pipelines, ordering and resuming)::

    build_pretrain_loader(path, batch_size, input_size=224, ...)  # yields images
    build_finetune_loader(path, batch_size, input_size=224, ...)  # yields (images, labels)
    build_val_loader(path, batch_size, input_size=224, ...)       # yields (images, labels)

``dataset_info(path)`` checks a ``.beton`` and returns its size, fields and largest side.
``.beton`` files are written by ``python -m data_prep.write_beton``.
"""
from .numba_cache import cache_typed_dict_helpers

cache_typed_dict_helpers()  # before the first FFCV import below: a second start skips ~3.5 s of numba compiles

from .ffcv_reader import type_os_cache_reader_apart  # noqa: E402

type_os_cache_reader_apart()  # FFCV's own reader makes numba's uint8 array type read-only for the whole process

from .beton import BetonError, check_beton, dataset_info  # noqa: E402
from lomar_fast.images import eval_crop_pct

from .loaders import (
    FINETUNE_SCALE,
    PRETRAIN_SCALE,
    RATIO,
    build_finetune_loader,
    build_pretrain_loader,
    build_val_loader,
    default_num_workers,
    epoch_order,
    finetune_pipelines,
    pretrain_pipelines,
    set_epoch,
    stop_epoch,
    val_pipelines,
)

__all__ = [
    "BetonError", "check_beton", "dataset_info",
    "build_pretrain_loader", "build_finetune_loader", "build_val_loader",
    "pretrain_pipelines", "finetune_pipelines", "val_pipelines",
    "set_epoch", "stop_epoch", "epoch_order", "default_num_workers",
    "PRETRAIN_SCALE", "FINETUNE_SCALE", "RATIO", "eval_crop_pct",
]

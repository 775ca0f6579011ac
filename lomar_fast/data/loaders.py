"""FFCV loaders for pretraining, fine-tuning and validation.

Each use has one builder; its pipeline is a plain list of FFCV operations (see the
``*_pipelines`` functions). Batches are uint8 NHWC tensors on ``device``; nothing is
normalized here (the training step normalizes on the device).

=============  ==========================================================  ===============
builder        image pipeline                                              yields
=============  ==========================================================  ===============
pretrain       RandomResizedCrop(S, scale 0.2..1, ratio 3/4..4/3) + flip   images
finetune       RandomResizedCrop(S, scale 0.08..1, ratio 3/4..4/3) + flip  (images, labels)
val            short side to S / crop_pct, center crop S (MAE's; ``area``:  (images, labels)
               FFCV's center crop of side * crop_pct, resized to S)
=============  ==========================================================  ===============

images: uint8 (B, S, S, 3); labels: int64 (B,). ``interpolation`` picks the resize of every crop: ``"bicubic"``
(the default: PIL's antialiased bicubic, exactly, as the MAE/LoMaR reference pipelines resize) or ``"area"``
(OpenCV INTER_AREA, FFCV's); the training crop boxes and flips are the same for both. See
:mod:`lomar_fast.data.seeded_crop`.

Order and resuming. With ``order='random'`` FFCV draws epoch e's order from
``default_rng(seed + e)`` (single process) or from ``DistributedSampler(seed=seed)`` with
``set_epoch(e)`` (``distributed=True``: each rank gets its own shard of ceil(N / world) images,
padded by repeating images from the start of the epoch's order as ``DistributedSampler`` does, then cut
to whole batches: a few images appear twice or not at all in an epoch, as in MAE's loaders; all ranks
must pass the same seed). The epoch is the loader's ``next_epoch`` counter, which FFCV
advances each time an epoch starts. To resume at epoch E, build the loader with the same
seed and call :func:`set_epoch` (or pass ``start_epoch=E``): the next ``for`` loop then
replays exactly epoch E's order. Random crops and flips are reproduced too: the training
pipelines use :class:`~lomar_fast.data.seeded_crop.SeededRandomResizedCrop`, whose draws are
a function of (seed, epoch, sample index), so they do not depend on worker threads and a
resumed run sees the same pixels as the uninterrupted one.

Batches are views into FFCV's ring of ``batches_ahead + 2`` buffers: ``clone()`` a batch
you want to keep past the next few iterations.
"""
from __future__ import annotations

import gc
import os
import queue
import threading
import warnings
import weakref
from typing import Union

import numpy as np
import torch

from lomar_fast.images import DEFAULT_INTERPOLATION, eval_crop_pct

from .beton import IMAGE_FIELD, LABEL_FIELD, check_beton

PRETRAIN_SCALE = (0.2, 1.0)
FINETUNE_SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)

Device = Union[str, torch.device]


def default_num_workers() -> int:
    """Usable cores divided among the ranks of this node (torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's
    LOCAL_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, cores // max(1, local))


def numba_thread_limit() -> int:
    """The most threads numba starts in this process (``NUMBA_NUM_THREADS``, by default the cores)."""
    from numba import config

    return int(config.NUMBA_NUM_THREADS)


def usable_workers(requested: int) -> int:
    """``requested`` decode threads, or fewer where numba, which runs FFCV's threads, may start fewer: it
    refuses more than ``NUMBA_NUM_THREADS`` (by default the machine's cores) with a bare ValueError. Asking
    for more warns once and uses numba's limit (MAE's ``--num_workers 10`` on an 8-core machine trains)."""
    limit = numba_thread_limit()
    if requested <= limit:
        return requested
    warnings.warn(f"--num_workers {requested} is more than the {limit} decode threads numba can start here "
                  f"(NUMBA_NUM_THREADS, by default the number of cores); using {limit}", stacklevel=4)
    return limit


def loader_workers(num_workers: int | None) -> int:
    """The decode threads an FFCV loader of this package gets for ``num_workers``: that many (0 or None: the
    cores this rank may use), never more than numba can start (:func:`usable_workers`)."""
    if num_workers and num_workers > 0:
        return usable_workers(num_workers)
    return min(default_num_workers(), numba_thread_limit())


def _order(order, distributed: bool):
    from ffcv.loader import OrderOption

    if isinstance(order, str):
        key = order.strip().upper().replace("-", "_")
        if key not in OrderOption.__members__:
            raise ValueError(f"order must be one of 'random', 'quasi_random', 'sequential'; got {order!r}")
        order = OrderOption[key]
    if not isinstance(order, OrderOption):
        raise ValueError(f"order must be a string or ffcv OrderOption, got {order!r}")
    if distributed and order == OrderOption.QUASI_RANDOM:
        raise ValueError("order='quasi_random' cannot be used with distributed=True "
                         "(FFCV has no distributed quasi-random order); use order='random'")
    return order


def _to_device(device: Device) -> list:
    """FFCV's last pipeline step, as a list: none on the CPU, else a copy that returns once done
    (``non_blocking=False``).

    On the CPU the batch is the decoder's output buffer itself. FFCV gives every stage of the pipeline a ring of
    ``batches_ahead + 2`` batch buffers indexed by the same slot, so a ``ToDevice`` to the CPU copied each batch
    into a second ring that is reused exactly when the first one is: a 38 MB copy per 256-image batch at 224 px
    that bought nothing, run on torch's OpenMP threads, whose spin after each copy took cores from numba's decode
    threads.

    On a GPU FFCV's loader thread decodes each batch into a pinned host buffer of its ring, queues the copy to
    the GPU on that slot's stream behind an event of the training stream, and decodes batch n + ring into the
    same host buffer as soon as the step loop has taken batch n + 1, without waiting for the first copy. With a
    non-blocking copy that is safe only while the GPU lags fewer than about ``batches_ahead + 1`` steps behind
    the host, which a step loop without host syncs does not promise. A blocking copy waits in the loader thread,
    not in the step; it costs the loader thread the copy itself (a 256-image batch at 224 px is 38 MB), and a
    wait only when the GPU lags that far."""
    from ffcv.transforms import ToDevice

    device = torch.device(device)
    if device.type == "cpu":
        return []
    return [ToDevice(device, non_blocking=False)]


def pretrain_pipelines(input_size: int, device: Device = "cpu", seed: int = 0,
                       interpolation: str = DEFAULT_INTERPOLATION) -> dict:
    """{'image': [...], 'label': None}: RandomResizedCrop(scale 0.2..1) + flip, uint8 NHWC."""
    from ffcv.transforms import ToTensor

    from .seeded_crop import SeededRandomResizedCrop

    return {
        IMAGE_FIELD: [
            SeededRandomResizedCrop((input_size, input_size), scale=PRETRAIN_SCALE, ratio=RATIO,
                                    flip_prob=0.5, seed=seed, interpolation=interpolation),
            ToTensor(),
            *_to_device(device),
        ],
        LABEL_FIELD: None,
    }


def _label_pipeline(device: Device) -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1), *_to_device(device)]


def finetune_pipelines(input_size: int, device: Device = "cpu", seed: int = 0,
                       interpolation: str = DEFAULT_INTERPOLATION) -> dict:
    """RandomResizedCrop(scale 0.08..1) + flip; labels int64 (B,)."""
    from ffcv.transforms import ToTensor

    from .seeded_crop import SeededRandomResizedCrop

    return {
        IMAGE_FIELD: [
            SeededRandomResizedCrop((input_size, input_size), scale=FINETUNE_SCALE, ratio=RATIO,
                                    flip_prob=0.5, seed=seed, interpolation=interpolation),
            ToTensor(),
            *_to_device(device),
        ],
        LABEL_FIELD: _label_pipeline(device),
    }


def val_pipelines(input_size: int, device: Device = "cpu", interpolation: str = DEFAULT_INTERPOLATION) -> dict:
    """Center crop of side int(min(H, W) * eval_crop_pct(input_size)) (224/256 up to 224 px, the whole short
    side above), resized to input_size; labels int64 (B,)."""
    from ffcv.transforms import ToTensor

    from .seeded_crop import CenterCrop

    return {
        IMAGE_FIELD: [
            CenterCrop((input_size, input_size), ratio=eval_crop_pct(input_size), interpolation=interpolation),
            ToTensor(),
            *_to_device(device),
        ],
        LABEL_FIELD: _label_pipeline(device),
    }


class _FirstOutput:
    """Wraps FFCV's epoch iterator to yield the only output instead of a 1-tuple."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)[0]

    def close(self):
        self._it.close()


def _loader_class(image_only: bool):
    from ffcv.loader import Loader

    class SeededLoader(Loader):
        """An ffcv Loader that tells its seeded operations which epoch each iteration replays (and, for
        pretraining, yields the image batch alone). A new iteration ends the previous one if it is still running
        (an epoch left with ``break``, or still being read: that reader then gets at most the batches already
        decoded, then StopIteration). Its decoding thread would otherwise go on decoding into the decoders'
        per-thread buffers and numba's per-thread generators alongside the new epoch's, and, blocked on its full
        queue forever, keep the epoch's pinned buffers."""

        _running = None  # weak reference to the last epoch's FFCV iterator (a thread)

        def __iter__(self):
            self._stop_running()  # and hold no reference to it: the new epoch's buffers may reuse its memory
            for op in getattr(self, "seeded_ops", ()):
                op.set_epoch(self.next_epoch)
            it = super().__iter__()
            self._running = weakref.ref(it)
            return _FirstOutput(it) if image_only else it

        def _stop_running(self) -> None:
            ref = self._running
            if ref is None:
                return
            previous = ref()
            if previous is not None and previous.is_alive():
                stop_epoch(previous)
            previous = None
            if ref() is not None:
                # still held: numba's compile of the first batch leaves a reference cycle through the loader
                # thread's frames (later epochs sometimes do too), which holds that epoch's buffers (the pinned
                # ones too) until Python's collector happens to run. Collected now, before the new epoch allocates
                # its own. (A caller that keeps its own reference to the old iterator pays this collection at
                # every epoch: drop it before the next iter().)
                gc.collect()

    return SeededLoader


AST_RACE = "AST constructor recursion depth mismatch"


def construct_loader(make, attempts: int = 3):
    """``make()``, a new FFCV loader, made again (with new pipelines) where it failed on CPython 3.11's AST race.

    FFCV writes each loader's pipeline as Python source and parses it with ``ast``. Up to CPython 3.11.7 the AST
    constructor kept its recursion depth in one global: a garbage collection inside it that lets another thread
    run AST work (numba compiling another loader's first batch parses its functions' source) makes the depth
    count wrong, and ``ast.parse`` raises ``SystemError: AST constructor recursion depth mismatch`` (CPython
    gh-106905, fixed in 3.11.8 and 3.12). Nothing is wrong with the pipeline then, and the next attempt parses
    it. Any other error is raised at once."""
    for attempt in range(attempts):
        try:
            return make()
        except SystemError as e:
            if AST_RACE not in str(e) or attempt == attempts - 1:
                raise


def _build(path, fields, make_pipelines, batch_size, num_workers, distributed, seed, order, os_cache,
           batches_ahead, drop_last, start_epoch, image_only=False):

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = _order(order, distributed)
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed to be initialized "
                             "(init_process_group) before the loader is built")
    cls = _loader_class(image_only)

    def make():
        pipelines = make_pipelines()
        # Disable every stored field the pipelines do not use.
        full = {name: None for name in fields}
        full.update({k: v for k, v in pipelines.items() if k in fields})
        # collected before FFCV takes the lists apart
        seeded = [op for ops in pipelines.values() if ops for op in ops if hasattr(op, "set_epoch")]
        decoders = [op for ops in pipelines.values() if ops for op in ops if hasattr(op, "region_decodes")]
        loader = cls(str(path), batch_size=batch_size,
                     num_workers=loader_workers(num_workers),
                     os_cache=os_cache, order=order, distributed=distributed,
                     seed=int(seed), pipelines=full, drop_last=drop_last, batches_ahead=batches_ahead)
        loader.seeded_ops = seeded
        loader.decoders = decoders  # the image decoders (their region_decodes counts)
        return loader

    loader = construct_loader(make)
    set_epoch(loader, start_epoch)
    return loader


def build_pretrain_loader(path: str | os.PathLike, batch_size: int, input_size: int = 224,
                          num_workers: int | None = None, device: Device = "cpu",
                          distributed: bool = False, seed: int = 0, order="random",
                          os_cache: bool = True, batches_ahead: int = 3, drop_last: bool = True,
                          start_epoch: int = 0, interpolation: str = DEFAULT_INTERPOLATION):
    """Pretraining loader: iterating yields uint8 image batches of shape (B, S, S, 3) on ``device``.

    RandomResizedCrop to input_size (scale 0.2..1, ratio 3/4..4/3), horizontal flip p=0.5, crops resized with
    ``interpolation`` ('area' or 'bicubic', see the module doc). Labels are not read. Raises FileNotFoundError /
    BetonError for a bad file or an input_size larger than the stored images, ValueError for a bad
    order/distributed combo or interpolation.
    """
    info = check_beton(path, need_label=False, input_size=input_size)
    return _build(path, info["fields"], lambda: pretrain_pipelines(input_size, device, seed, interpolation), batch_size,
                  num_workers, distributed, seed, order, os_cache, batches_ahead, drop_last, start_epoch,
                  image_only=True)


def build_finetune_loader(path: str | os.PathLike, batch_size: int, input_size: int = 224,
                          num_workers: int | None = None, device: Device = "cpu",
                          distributed: bool = False, seed: int = 0, order="random",
                          os_cache: bool = True, batches_ahead: int = 3, drop_last: bool = True,
                          start_epoch: int = 0, interpolation: str = DEFAULT_INTERPOLATION):
    """Fine-tuning loader: yields (images uint8 (B, S, S, 3), labels int64 (B,)) on ``device``.

    RandomResizedCrop (scale 0.08..1, ratio 3/4..4/3) + horizontal flip, resized with ``interpolation``.
    """
    info = check_beton(path, need_label=True, input_size=input_size)
    return _build(path, info["fields"], lambda: finetune_pipelines(input_size, device, seed, interpolation), batch_size,
                  num_workers, distributed, seed, order, os_cache, batches_ahead, drop_last, start_epoch)


def build_val_loader(path: str | os.PathLike, batch_size: int, input_size: int = 224,
                     num_workers: int | None = None, device: Device = "cpu",
                     distributed: bool = False, seed: int = 0, order="sequential",
                     os_cache: bool = True, batches_ahead: int = 3, drop_last: bool = False,
                     start_epoch: int = 0, interpolation: str = DEFAULT_INTERPOLATION):
    """Validation loader: yields (images uint8 (B, S, S, 3), labels int64 (B,)) on ``device``.

    Center crop of side int(min(H, W) * eval_crop_pct(input_size)), resized to input_size with ``interpolation``
    ('bicubic' reads the pixels around the crop too, as resizing the whole image first would). Sequential order and
    no dropped tail by default, so every image is seen once (with ``distributed=True``
    FFCV's sampler pads the last shard with repeated images, as DistributedSampler does).
    """
    info = check_beton(path, need_label=True, input_size=input_size)
    return _build(path, info["fields"], lambda: val_pipelines(input_size, device, interpolation), batch_size,
                  num_workers, distributed, seed, order, os_cache, batches_ahead, drop_last, start_epoch)


def stop_epoch(batches) -> None:
    """End an epoch's iterator that was not run to its end (``--max_steps_per_epoch``), and wait for FFCV's
    decoding thread to exit. Without the wait, that thread can still be decoding the abandoned epoch's next
    batches when the next epoch starts, and two pipelines then share numba's worker threads and their
    per-thread random state: the seeded crops of the new epoch's first batch can come out wrong. Reading the
    iterator afterwards gives at most the batches already decoded, then StopIteration."""
    inner = getattr(batches, "_it", batches)
    if isinstance(inner, threading.Thread):
        inner.terminate_event.set()  # seen by the thread when its output queue is full
        while inner.is_alive():
            inner.join(timeout=1.0)
            if inner.is_alive() and inner.output_queue.full():  # e.g. blocked handing over its end marker
                try:
                    inner.output_queue.get_nowait()
                except queue.Empty:
                    pass
        # a stopped thread sends no end marker: sent here, a reader still holding this iterator gets what is
        # queued and then the end of the epoch, instead of waiting forever
        while True:
            try:
                inner.output_queue.put_nowait(None)
                break
            except queue.Full:
                inner.output_queue.get_nowait()
    inner.close()  # releases the epoch's memory, once nothing decodes into it


def set_epoch(loader, epoch: int) -> None:
    """Makes the loader's next iteration replay epoch ``epoch``'s order (see module doc)."""
    if int(epoch) < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    loader.next_epoch = int(epoch)


def epoch_order(loader, epoch: int) -> np.ndarray:
    """Sample indices (into the .beton) this loader/rank reads in ``epoch``, before batching."""
    order = np.asarray(loader.traversal_order.sample_order(int(epoch)))
    n = len(loader) * loader.batch_size if loader.drop_last else len(order)
    return order[:n]

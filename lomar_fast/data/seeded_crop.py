"""A RandomResizedCrop + horizontal-flip decoder whose randomness is a function of
(seed, epoch, sample index): the same epoch yields the same crops and flips on every run,
which is what makes a resumed run reproduce the uninterrupted one.

Both decoders decode a JPEG into one scratch buffer per decode thread (:class:`ThreadScratch`), made once per
loader and not pinned, where FFCV's give every image of every batch slot its own pinned buffer of the largest
image's size: 1 GB of pinned memory per rank for batches of 256 from a ``.beton`` of 512-px images. The training
crop decodes only the part of a JPEG its crop reads where the JPEG's restart markers allow it
(:mod:`lomar_fast.data.jpeg_region`).

The decode threads share a batch's images through a queue, the images of largest estimated cost first
(:func:`decode_cost`), where FFCV's loop gives each thread an equal, contiguous share: the thread with the slower
share held up the whole batch (about 12% of 16 threads' time at batch 256, from per-image times measured on one
core). ``LOMAR_DECODE_SCHEDULE=static`` restores FFCV's shares.

FFCV's own RandomResizedCrop and RandomHorizontalFlip draw from numba's per-thread generators,
which nothing seeds. Here every image reseeds the calling thread's generator from a hash of
(seed, epoch, index) right before drawing its crop and flip, so the result does not depend on
which worker thread decodes which image. The epoch lives in a one-element array that the compiled
pipeline reads through its address, so changing epochs needs no recompilation.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from numba import carray, get_thread_id, njit, types
from numba.extending import intrinsic

from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, get_center_crop,
                                   get_random_crop)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

from lomar_fast.images import DEFAULT_INTERPOLATION, INTERPOLATIONS

from .jpeg_region import region_into
from .resample import (ORDER_HORIZONTAL_FIRST, ORDER_PIL13, ORDER_VERTICAL_FIRST, bicubic_margin,
                       horizontal_first, resize_bicubic_part, resize_crop_bicubic)

_MASK32 = np.uint64(0xFFFFFFFF)


def check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    return interpolation


def _pointer_intrinsic(kind):
    """An intrinsic that turns an integer address into a ``kind*`` inside compiled code."""

    @intrinsic
    def pointer(typingctx, address):
        sig = types.CPointer(kind)(types.intp)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(kind)))

        return sig, codegen

    return pointer


_POINTERS = {np.dtype(np.int64): _pointer_intrinsic(types.int64), np.dtype(np.uint8): _pointer_intrinsic(types.uint8)}


def _array_at(array: np.ndarray):
    """A function of no arguments that returns ``array`` (kept alive by the caller) to a decode loop. Compiled,
    it rebuilds the array from its address, as numba freezes a global array into a read-only constant; in FFCV's
    pure-Python mode (``Compiler.set_enabled(False)``), where no intrinsic runs, it returns the array itself."""
    if not Compiler.is_enabled:
        return lambda: array
    address, shape, pointer = array.ctypes.data, array.shape, _POINTERS[array.dtype]

    @njit(nogil=True)
    def at():
        return carray(pointer(address), shape)

    return at


def mix_seed(seed: int, epoch: int, index: int) -> int:
    """32-bit seed of one image's draws (splitmix64 finalizer over the three numbers)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def _mix_seed_jit(seed, epoch, index):
    z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9) \
        + np.uint64(index) * np.uint64(0x94D049BB133111EB)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & _MASK32


# Compiled once and cached on disk (numba's cache=True): a new loader then compiles only its own decode loop.
_mix_seed_c = njit(nogil=True, cache=True)(_mix_seed_jit)
_get_crop_c = njit(nogil=True, cache=True)(get_random_crop)
_horizontal_first_c = njit(nogil=True, cache=True)(horizontal_first)
_center_crop_c = njit(nogil=True, cache=True)(get_center_crop)


@njit(nogil=True, cache=True)
def draw_crop(seed, epoch, index, height, width, scale, ratio, flip_prob):
    """One image's draw: ``(top, left, crop_h, crop_w, flip)``. It reseeds the calling thread's numba generator
    from (seed, epoch, index), then draws FFCV's RandomResizedCrop box and the flip. The decoder calls it;
    anything that needs to know which crop and flip an image got can call it too."""
    np.random.seed(_mix_seed_c(seed, epoch, index))
    i, j, h, w = _get_crop_c(height, width, scale, ratio)
    return i, j, h, w, np.random.random() < flip_prob


def compile_draws():
    """The compiled per-image draw (see :func:`draw_crop`)."""
    return draw_crop


@njit(nogil=True, cache=True)
def _flip_rows(img):
    h, w, c = img.shape
    for r in range(h):
        for x in range(w // 2):
            for ch in range(c):
                t = img[r, x, ch]
                img[r, x, ch] = img[r, w - 1 - x, ch]
                img[r, w - 1 - x, ch] = t


@intrinsic
def _fetch_add(typingctx, counter):
    """``counter[0]`` (an int64 array) before one is added to it, atomically."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", array.data, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counter), codegen


@njit(nogil=True)
def _claim_compiled(queue):
    return _fetch_add(queue)


def _claim_python(queue):
    k = int(queue[0])
    queue[0] = k + 1
    return k


def claim_function():
    """``claim(queue)``: the next position of a decode queue (``queue``: int64 array of one element, from 0), each
    position handed to exactly one caller whichever threads call; in FFCV's pure-Python mode, a plain counter."""
    return _claim_compiled if Compiler.is_enabled else _claim_python


@njit(nogil=True)
def _take_compiled(queue, otherwise, balanced):
    return _claim_compiled(queue) if balanced else np.int64(otherwise)


def _take_python(queue, otherwise, balanced):
    return _claim_python(queue) if balanced else np.int64(otherwise)


def take_function():
    """``take(queue, otherwise, balanced)``: ``claim(queue)`` where ``balanced``, else ``otherwise`` (a decode
    loop's own index, then the batch's end). A call, so that numba does not take the static loop's next position
    for its index."""
    return _take_compiled if Compiler.is_enabled else _take_python


# the resize's time per crop pixel against the decode's per JPEG byte (about 3 ns against 20 ns on one core, for
# q90 JPEGs of 500 x 375 pixels and a bicubic resize to 224)
RESIZE_WEIGHT = 0.15


@njit(nogil=True, cache=True)
def decode_cost(nbytes, jpeg, region, height, width, crop_h, crop_w):
    """An estimate, in relative units, of the time to decode one image and resize its crop (crop_h, crop_w): the
    JPEG's bytes, the crop's share of them where only the crop's region is decoded, plus the crop's pixels for
    the resize. It orders a batch's images for the decode threads, so only its ranking matters."""
    crop = np.float64(crop_h) * np.float64(crop_w)
    if not jpeg:
        return RESIZE_WEIGHT * crop
    share = crop / (np.float64(height) * np.float64(width)) if region else 1.0
    return np.float64(nbytes) * share + RESIZE_WEIGHT * crop


@njit(nogil=True, cache=True)
def decode_order(cost, balanced):
    """The order in which a batch's images are decoded: the largest ``cost`` first (ties in batch order) where
    ``balanced``, else batch order."""
    if balanced:
        return np.argsort(-cost, kind="mergesort")
    return np.arange(cost.shape[0])


@njit(nogil=True, cache=True)
def plan_batch(cost, balanced, threads):
    """(order, queue, loops) of a batch whose images have estimated ``cost``: the decode order, the queue
    :func:`claim_function`'s claim reads (at 0), and the parallel loop's length: one loop per decode thread
    (``threads``), each claiming images until the queue is past the batch (balanced), or one iteration per image,
    FFCV's loop."""
    queue = np.empty(1, np.int64)
    queue[0] = 0
    return decode_order(cost, balanced), queue, threads if balanced else cost.shape[0]


def jpeg_decoder():
    """``decode(data, height, width, top, bottom, left, right, buf, streams, tid, region, regions)``: (pixels, y0,
    x0), the JPEG ``data`` (height, width) decoded into decode thread ``tid``'s buffer ``buf``. With ``region``,
    where its restart markers allow, only the rectangle of restart segments that holds rows ``top:bottom`` and
    columns ``left:right`` (:mod:`.jpeg_region`; counted in ``regions[tid]``), the pixels from image row ``y0`` and
    column ``x0`` on; else the whole image (0, 0). Compiled as FFCV compiles a decoder's helpers."""
    imdecode_c = Compiler.compile(imdecode)
    region_c = region_into

    def decode(data, height, width, top, bottom, left, right, buf, streams, tid, region, regions):
        if region:
            size, y0, x0, rh, rw = region_c(data, top, bottom, left, right, streams, tid)
            if size > 0 and imdecode_c(streams[tid][:size], buf, rh, rw, rh, rw, 0, 0, 1, 1, False, False) == 0:
                regions[tid] += 1
                return buf.reshape(-1)[:3 * rh * rw].reshape(rh, rw, 3), y0, x0
        imdecode_c(data, buf, height, width, height, width, 0, 0, 1, 1, False, False)
        return buf.reshape(-1)[:3 * height * width].reshape(height, width, 3), np.int64(0), np.int64(0)

    return Compiler.compile(decode)


def image_reader(mem_read):
    """``read(metadata, batch_indices, k, storage_state)``: (stored bytes, height, width, is a JPEG) of a batch's
    ``k``-th image, compiled as FFCV compiles a decoder's helpers."""
    jpg = 0  # FFCV's mode id of a JPEG-stored image

    def read(metadata, batch_indices, k, storage_state):
        field = metadata[batch_indices[k]]
        return (mem_read(field['data_ptr'], storage_state), np.uint32(field['height']), np.uint32(field['width']),
                field['mode'] == jpg)

    return Compiler.compile(read)


DECODE_SCHEDULE_ENV = "LOMAR_DECODE_SCHEDULE"
DECODE_SCHEDULES = ("balanced", "static")


def decode_schedule() -> str:
    """``$LOMAR_DECODE_SCHEDULE``: how a batch's images are shared among the decode threads. ``balanced`` (the
    default): through a queue, largest estimated cost first, each thread taking the next image when it has
    finished one. ``static``: FFCV's loop, each thread an equal, contiguous share of the batch. Anything else is
    a ValueError."""
    value = os.environ.get(DECODE_SCHEDULE_ENV, "balanced").strip().lower()
    if value not in DECODE_SCHEDULES:
        raise ValueError(f"{DECODE_SCHEDULE_ENV}={value!r} must be one of {', '.join(DECODE_SCHEDULES)}")
    return value


REGION_DECODE_ENV = "LOMAR_REGION_DECODE"


def region_decode_enabled() -> bool:
    """``$LOMAR_REGION_DECODE``: ``1`` (the default) or ``0``; anything else is a ValueError."""
    value = os.environ.get(REGION_DECODE_ENV, "1").strip().lower()
    if value not in ("0", "1"):
        raise ValueError(f"{REGION_DECODE_ENV}={value!r} must be 1 (decode only a crop's region of JPEGs with "
                         "restart markers) or 0 (decode every JPEG whole)")
    return value == "1"


class ThreadScratch:
    """For FFCV's crop decoders: JPEGs decode into one buffer per decode thread.

    FFCV's crop decoders ask the loader for a decode buffer of the largest image's size for every image of every
    batch slot (``batches_ahead + 2`` of them), and the loader pins them all: at batch 256 from a ``.beton`` of
    512-px images, 1 GB of pinned memory per rank, pinned again by each epoch's iterator. A buffer is needed
    only while its image is decoded and cropped, so one per thread is enough. These are made once per decoder
    (so per loader), one row per thread numba may start (``NUMBA_NUM_THREADS``; rows of threads that never run
    stay untouched, so not resident), not pinned. The decoder asks the loader for its output batch alone.

    A row is the decoding thread's (numba's ``get_thread_id``), so two epochs of one loader must not decode at
    once: the loaders of :mod:`lomar_fast.data.loaders` stop an abandoned epoch before starting the next.
    """

    _scratch: np.ndarray | None = None
    _streams: np.ndarray | None = None

    def init_region_decode(self, region_decode: bool | None) -> None:
        """The region switch (default: ``$LOMAR_REGION_DECODE``) and the per-thread count of JPEGs decoded by region
        alone (written by the compiled code)."""
        self.region_decode = region_decode_enabled() if region_decode is None else bool(region_decode)
        self._regions = np.zeros(max(int(numba.config.NUMBA_NUM_THREADS), 1), dtype=np.int64)

    @property
    def region_decodes(self) -> int:
        """How many JPEGs this decoder decoded by their crop's region alone (:mod:`.jpeg_region`), not whole."""
        return int(self._regions.sum())

    def declare_state_and_memory(self, previous_state):
        state, (output, _decode_buffer) = super().declare_state_and_memory(previous_state)
        return state, output

    def scratch(self):
        """This decoder's decode buffers for its decode loop (see :func:`_array_at`), made on the first call.
        FFCV calls ``generate_code`` again at every epoch; the buffers, whose address the compiled code holds,
        stay. A decoder serves one loader: a ``.beton`` with larger images than the buffers' is refused."""
        heights = self.metadata["height"].astype(np.int64)
        widths = self.metadata["width"].astype(np.int64)
        row = max(int((heights * widths).max(initial=1)) * 3, 1)
        if self._scratch is None:
            self._scratch = np.empty((max(int(numba.config.NUMBA_NUM_THREADS), 1), row), dtype=np.uint8)
        elif self._scratch.shape[1] < row:
            raise ValueError(f"{type(self).__name__}: this decoder's buffers were made for images of up to "
                             f"{self._scratch.shape[1] // 3} pixels, and its loader now reads images of {row // 3}; "
                             "give each loader its own decoder (lomar_fast.data's pipeline functions make new ones)")
        return _array_at(self._scratch)

    def streams(self):
        """One buffer per decode thread for the JPEG of a crop's region (:mod:`.jpeg_region`), as long as a
        decode buffer: a JPEG longer than that is decoded whole. Made with the decode buffers, and like them only
        resident where written."""
        if self._streams is None:
            self._streams = np.empty(self._scratch.shape, dtype=np.uint8)
        return _array_at(self._streams)


class SeededRandomResizedCrop(ThreadScratch, RandomResizedCropRGBImageDecoder):
    """RandomResizedCrop (scale, ratio) to ``output_size`` plus a flip with probability ``flip_prob``; the crop is
    resized with ``interpolation`` (``"area"`` or ``"bicubic"``, see the module doc).

    With ``region_decode`` (default: ``$LOMAR_REGION_DECODE``, on unless ``0``), a JPEG whose restart markers
    tile its rows (the ``.beton`` writer writes them) is decoded only over the rectangle of restart segments its
    crop reads (:mod:`.jpeg_region`): the same pixels for less work. Other JPEGs are decoded whole. The choice is
    made when the decoder is made (FFCV compiles the loader's pipeline when the loader is built), as is the
    decode threads' schedule (``$LOMAR_DECODE_SCHEDULE``, see :func:`decode_schedule`).

    ``set_epoch(e)`` selects the epoch whose draws the next batches use.
    """

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip_prob: float = 0.5, seed: int = 0,
                 interpolation: str = DEFAULT_INTERPOLATION, region_decode: bool | None = None):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.interpolation = check_interpolation(interpolation)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed) & 0xFFFFFFFF
        self.init_region_decode(region_decode)
        self.schedule = decode_schedule()
        self._epoch = np.zeros(1, dtype=np.int64)  # read by the compiled code through its address

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def generate_code(self):
        read_c = image_reader(self.memory_read)
        my_range = Compiler.get_iterator()
        jpeg_c = jpeg_decoder()
        area_c = Compiler.compile(resize_crop)
        flip_c = _flip_rows
        bicubic = self.interpolation == "bicubic"

        def resize_crop_c(image, top, bottom, left, right, destination, flip):
            """That crop of ``image`` alone, resized into ``destination`` and mirrored where ``flip``: the bicubic
            resize mirrors as it resizes; FFCV's INTER_AREA resize is mirrored after."""
            if bicubic:
                resize_crop_bicubic(image, top, bottom, left, right, destination, ORDER_PIL13, flip)
            else:
                area_c(image, top, bottom, left, right, destination)
                if flip:
                    flip_c(destination)

        resize_crop_c = Compiler.compile(resize_crop_c)
        draw_c = draw_crop
        cost_c = decode_cost
        plan_c = plan_batch
        take_c = take_function()
        balanced = self.schedule == "balanced"
        scale = np.array(self.scale, dtype=np.float64)
        ratio = np.array(self.ratio, dtype=np.float64)
        flip_prob = self.flip_prob
        seed = self.seed
        epoch_at = _array_at(self._epoch)  # this object keeps the array alive
        scratch_at = self.scratch()
        streams_at = self.streams()
        region = self.region_decode
        regions_at = _array_at(self._regions)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination = my_storage
            epoch = epoch_at()[0]
            scratch = scratch_at()
            streams = streams_at()
            regions = regions_at()
            n = len(batch_indices)
            # every image's draw (top, left, height, width, flip) and its estimated cost, then the decode order
            boxes = np.empty((n, 5), np.int64)
            cost = np.empty(n, np.float64)
            for p in my_range(n):  # about 2 us an image, mostly reseeding the generator: on the threads too
                stored, rows, cols, is_jpeg = read_c(metadata, batch_indices, p, storage_state)
                top, left, crop_h, crop_w, flip = draw_c(seed, epoch, batch_indices[p], rows, cols, scale, ratio,
                                                         flip_prob)
                boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3], boxes[p, 4] = top, left, crop_h, crop_w, flip
                cost[p] = cost_c(stored.shape[0], is_jpeg, region, rows, cols, crop_h, crop_w)
            order, queue, loops = plan_c(cost, balanced, numba.get_num_threads())
            for slot in my_range(loops):
                k = take_c(queue, slot, balanced)
                while k < n:
                    dst_ix = order[k]
                    image_data, height, width, jpeg = read_c(metadata, batch_indices, dst_ix, storage_state)
                    i, j, h, w = boxes[dst_ix, 0], boxes[dst_ix, 1], boxes[dst_ix, 2], boxes[dst_ix, 3]
                    flip = boxes[dst_ix, 4] != 0
                    if jpeg:  # the crop's region alone where the JPEG's restart markers allow it
                        tid = get_thread_id()
                        pixels, y0, x0 = jpeg_c(image_data, height, width, i, i + h, j, j + w, scratch[tid],
                                                streams, tid, region, regions)
                        resize_crop_c(pixels, i - y0, i - y0 + h, j - x0, j - x0 + w, destination[dst_ix], flip)
                    else:
                        resize_crop_c(image_data.reshape(height, width, 3), i, i + h, j, j + w,
                                      destination[dst_ix], flip)
                    k = take_c(queue, n, balanced)
            return destination[:n]

        decode.is_parallel = True
        return decode


def eval_box(height: int, width: int, size: int, ratio: float) -> tuple[float, float, float, float, int]:
    """MAE's evaluation transform, ``Resize(int(size / ratio), BICUBIC)`` then ``CenterCrop(size)``, as one box of
    the source image: (top, bottom, left, right) in source pixels, and the pass order of PIL's whole-image resize.
    torchvision resizes the short side to ``int(size / ratio)`` and the long side to ``int(that * long / short)``,
    then crops at ``round((n - size) / 2)``; a bicubic resize of this box to (size, size) samples the same points
    with the same filter widths as that resize-then-crop."""
    short_side = int(size / ratio)
    if height <= width:
        nh, nw = short_side, int(short_side * width / height)
    else:
        nh, nw = int(short_side * height / width), short_side
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    sy, sx = height / nh, width / nw
    order = ORDER_HORIZONTAL_FIRST if _horizontal_first_c(height, width, nh, nw, ORDER_PIL13) else ORDER_VERTICAL_FIRST
    return top * sy, (top + size) * sy, left * sx, (left + size) * sx, order


_eval_box_c = njit(nogil=True, cache=True)(eval_box)


class CenterCrop(ThreadScratch, CenterCropRGBImageDecoder):
    """The evaluation crop resized to ``output_size`` with ``interpolation``. ``"area"`` gives FFCV's decoder's
    pixels (a center crop of side ``int(ratio * min(H, W))``, INTER_AREA); ``"bicubic"`` is MAE's transform,
    ``Resize(int(output_size / ratio), BICUBIC)`` then ``CenterCrop(output_size)`` (torchvision on PIL images),
    computed as one PIL bicubic resize of the matching box of the whole image (:func:`eval_box`).

    With ``region_decode`` (as :class:`SeededRandomResizedCrop`'s), a JPEG with restart markers is decoded only
    over the segments that hold the crop and, for the bicubic resize, the pixels its filter reads around the box:
    the same pixels for less work."""

    def __init__(self, output_size, ratio: float, interpolation: str = DEFAULT_INTERPOLATION,
                 region_decode: bool | None = None):
        super().__init__(output_size, ratio)
        self.interpolation = check_interpolation(interpolation)
        self.schedule = decode_schedule()
        self.init_region_decode(region_decode)

    def generate_code(self):
        read_c = image_reader(self.memory_read)
        my_range = Compiler.get_iterator()
        jpeg_c = jpeg_decoder()
        area_c = Compiler.compile(resize_crop)
        center_c = _center_crop_c
        box_c = _eval_box_c
        margin_c = bicubic_margin
        cost_c = decode_cost
        plan_c = plan_batch
        take_c = take_function()
        balanced = self.schedule == "balanced"
        ratio = float(self.ratio)
        size = int(self.output_size[0])
        bicubic = self.interpolation == "bicubic"
        scratch_at = self.scratch()
        streams_at = self.streams()
        region = self.region_decode
        regions_at = _array_at(self._regions)

        def crop_box(height, width):
            """(top, bottom, left, right, passes) of the resize in image coordinates, and the rows and columns
            (t, b, l, r) its pixels come from: the bicubic filter also reads pixels around the box."""
            if bicubic:
                top, bottom, left, right, passes = box_c(np.int64(height), np.int64(width), size, ratio)
                my, mx = margin_c(bottom - top, size), margin_c(right - left, size)
                return (top, bottom, left, right, passes, max(int(top) - my, 0), min(int(bottom) + my, height),
                        max(int(left) - mx, 0), min(int(right) + mx, width))
            i, j, h, w = center_c(height, width, 0.0, ratio)  # FFCV's center crop of side int(ratio * min(H, W))
            return (np.float64(i), np.float64(i + h), np.float64(j), np.float64(j + w), np.int64(0), np.int64(i),
                    np.int64(i + h), np.int64(j), np.int64(j + w))

        crop_box = Compiler.compile(crop_box)

        def resize_c(pixels, y0, x0, height, width, top, bottom, left, right, passes, destination):
            """The box (image coordinates) of the image whose pixels from (y0, x0) on ``pixels`` holds."""
            if bicubic:
                resize_bicubic_part(pixels, y0, x0, height, width, top, bottom, left, right, destination, passes)
            else:
                area_c(pixels, int(top) - y0, int(bottom) - y0, int(left) - x0, int(right) - x0, destination)

        resize_c = Compiler.compile(resize_c)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination = my_storage
            scratch = scratch_at()
            streams = streams_at()
            regions = regions_at()
            n = len(batch_indices)
            cost = np.empty(n, np.float64)
            for p in range(n):
                image_data, height, width, jpeg = read_c(metadata, batch_indices, p, storage_state)
                side = int(ratio * min(height, width))
                cost[p] = cost_c(image_data.shape[0], jpeg, region, height, width, side, side)
            order, queue, loops = plan_c(cost, balanced, numba.get_num_threads())
            for slot in my_range(loops):  # as in SeededRandomResizedCrop
                k = take_c(queue, slot, balanced)
                while k < n:
                    dst_ix = order[k]
                    image_data, height, width, jpeg = read_c(metadata, batch_indices, dst_ix, storage_state)
                    top, bottom, left, right, passes, t, b, l, r = crop_box(height, width)
                    if jpeg:
                        tid = get_thread_id()
                        pixels, y0, x0 = jpeg_c(image_data, height, width, t, b, l, r, scratch[tid], streams, tid,
                                                region, regions)
                        resize_c(pixels, y0, x0, height, width, top, bottom, left, right, passes,
                                 destination[dst_ix])
                    else:
                        resize_c(image_data.reshape(height, width, 3), 0, 0, height, width, top, bottom, left, right,
                                 passes, destination[dst_ix])
                    k = take_c(queue, n, balanced)
            return destination[:n]

        decode.is_parallel = True
        return decode

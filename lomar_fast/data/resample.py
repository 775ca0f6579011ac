"""Antialiased bicubic resizing of uint8 HWC images, compiled with numba, with PIL's exact arithmetic.

``resize_crop_bicubic(src, top, bottom, left, right, dst)`` writes into ``dst`` (uint8 (H, W, 3)) what
``Image.fromarray(src).crop((left, top, right, bottom)).resize((W, H), Image.BICUBIC)`` returns: the filter stops
at the crop's edges, as in torchvision's and timm's RandomResizedCrop (crop, then resize). The arguments are those
of FFCV's ``resize_crop`` (OpenCV INTER_AREA), so a decoder can call either. ``resize_bicubic`` (same arguments)
is ``Image.resize((W, H), Image.BICUBIC, box=(left, top, right, bottom))`` instead: the filter also reads the
pixels around the box. Both are exact, pixel for pixel, for boxes inside the image.

The arithmetic is PIL's (Pillow's ``libImaging/Resample.c``):

- Per axis, output pixel ``o`` is centred at ``in0 + (o + 0.5) * scale`` with ``scale = (in1 - in0) / out``
  (box bounds as float32, the rest in double). When shrinking, the cubic kernel (a = -0.5, support 2) is
  stretched by ``scale``, so it covers ``2 * scale`` input pixels on each side (antialiasing).
- The taps run over input pixels ``[int(center - support + 0.5), int(center + support + 0.5))`` clipped to
  the image; tap ``x`` weighs ``cubic((x - center + 0.5) / max(scale, 1))``, the weights are divided by
  their sum, then rounded half away from zero to fixed point with 22 fractional bits.
- Two separable passes, each accumulating ``pixel * weight`` in integers from ``2**21`` (the rounding half),
  shifting right by 22 and clamping to 0..255; the intermediate image is uint8, so the order of the passes
  matters. Pillow <= 12 always runs the horizontal pass first; Pillow >= 13 runs the vertical pass first when the
  image's height shrinks by more than twice its width (in pixels). ``order`` picks one; the default is
  Pillow 13's, so the pixels do not depend on which Pillow is installed.

The coefficients are computed without fastmath, so the double arithmetic, and so every rounding, is PIL's
(the FFCV pipeline that calls these functions is compiled with fastmath; these keep their own flags). Both
passes run along the first axis of a C-contiguous array, whole rows at a time, which vectorizes; the horizontal
pass therefore works on a transposed copy of the pixels it reads.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

PRECISION_BITS = 22  # fractional bits of the fixed-point weights (PIL: 32 - 8 - 2)
SUPPORT = 2.0  # the bicubic kernel's half-width, in output pixels
A = -0.5  # the cubic convolution parameter


@njit(fastmath=False, nogil=True, cache=True)
def _cubic(x):
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * A
    return 0.0


@njit(fastmath=False, nogil=True, cache=True)
def bicubic_coeffs(in_size, in0, in1, out_size):
    """Taps of one axis: (first int32 (out,), count int32 (out,), weights int32 (out, ksize)) with
    ``out[o] = clip((sum_t src[first[o] + t] * weights[o, t] + 2**21) >> 22)``."""
    lo = np.float32(in0)
    hi = np.float32(in1)
    scale = np.float64(np.float32(hi - lo)) / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int32)
    count = np.empty(out_size, np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
    pre = np.empty(ksize, np.float64)
    inv = 1.0 / filterscale
    one = np.float64(1 << PRECISION_BITS)
    for o in range(out_size):
        center = np.float64(lo) + (o + 0.5) * scale
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        n = xmax - xmin
        if n > ksize:  # cannot happen for boxes inside the image; keeps the writes in bounds
            n = ksize
        total = 0.0
        for t in range(n):
            w = _cubic((t + xmin - center + 0.5) * inv)
            pre[t] = w
            total += w
        for t in range(n):
            w = pre[t] / total if total != 0.0 else pre[t]
            weights[o, t] = int(w * one - 0.5) if w < 0 else int(w * one + 0.5)
        first[o] = xmin
        count[o] = max(n, 0)
    return first, count, weights


@njit(nogil=True, cache=True)
def _clip8(acc):
    v = acc >> PRECISION_BITS
    return 0 if v < 0 else (255 if v > 255 else v)


@njit(nogil=True, cache=True)
def _pass(src, r0, c0, first, count, weights, out):
    """One resampling pass along the first axis: ``out[o, q] = clip((2**21 + sum_t src[r0 + first[o] + t, c0 + q]
    * weights[o, t]) >> 22)`` per channel. Whole rows are accumulated at once (vectorizable): the same integer
    sums as PIL's loop over pixels, added in another order. ``src`` and ``out`` are C-contiguous."""
    n = out.shape[1] * 3
    acc = np.empty(n, np.int32)
    rows = src.reshape(src.shape[0], src.shape[1] * 3)  # once: a reshape in the loop is a call per row
    lines = out.reshape(out.shape[0], n)
    for o in range(out.shape[0]):
        acc[:] = 1 << (PRECISION_BITS - 1)
        for t in range(count[o]):
            k = weights[o, t]
            row = rows[r0 + first[o] + t, 3 * c0:3 * c0 + n]
            for q in range(n):
                acc[q] += np.int32(row[q]) * k
        line = lines[o]
        for q in range(n):
            line[q] = _clip8(acc[q])


@intrinsic
def _load_u32(typingctx, array, index):
    """The 4 bytes of a uint8 array from ``index`` on, as one little-endian word (unaligned load), in a uint64."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        word = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(32).as_pointer())
        return builder.zext(builder.load(word, align=1), ir.IntType(64))

    return types.uint64(array, types.intp), codegen


@intrinsic
def _store_u32(typingctx, array, index, value):
    """Writes the low 4 bytes of ``value`` (uint64) into a uint8 array from ``index`` on (unaligned store)."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint8):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        word = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(32).as_pointer())
        builder.store(builder.trunc(args[2], ir.IntType(32)), word, align=1)
        return context.get_dummy_value()

    return types.void(array, types.intp, types.uint64), codegen


_LOW3 = np.uint64(0xFFFFFF)
_LOW2 = np.uint64(0xFFFF)
_LOW1 = np.uint64(0xFF)


@njit(nogil=True, cache=True)
def _transpose(src, r0, c0, out):
    """``out[c, r] = src[r0 + r, c0 + c]`` (pixels of 3 bytes) for ``out`` of shape (cols, rows, 3); both arrays
    C-contiguous. Four source rows at a time: each output row gets the 12 bytes of 4 pixels as three 32-bit
    stores, made of one 32-bit load per pixel (its 3 bytes and the next pixel's first, inside the row for every
    column but the last, which is copied byte by byte)."""
    cols, rows = out.shape[0], out.shape[1]
    width = src.shape[1] * 3
    s1 = src.reshape(-1)
    o1 = out.reshape(-1)
    stride = rows * 3
    r = 0
    while r + 4 <= rows:
        p = (r0 + r) * width + 3 * c0
        o = 3 * r
        for _ in range(cols - 1):
            a = _load_u32(s1, p)
            b = _load_u32(s1, p + width)
            c = _load_u32(s1, p + 2 * width)
            d = _load_u32(s1, p + 3 * width)
            _store_u32(o1, o, (a & _LOW3) | (b << np.uint64(24)))
            _store_u32(o1, o + 4, ((b >> np.uint64(8)) & _LOW2) | (c << np.uint64(16)))
            _store_u32(o1, o + 8, ((c >> np.uint64(16)) & _LOW1) | (d << np.uint64(8)))
            p += 3
            o += stride
        for k in range(4):  # the last column
            for ch in range(3):
                o1[o + 3 * k + ch] = s1[p + k * width + ch]
        r += 4
    while r < rows:
        p = (r0 + r) * width + 3 * c0
        o = 3 * r
        for _ in range(cols):
            o1[o] = s1[p]
            o1[o + 1] = s1[p + 1]
            o1[o + 2] = s1[p + 2]
            p += 3
            o += stride
        r += 1


ORDER_PIL13 = 0  # Pillow >= 13: vertical pass first when the height shrinks by more than twice the width
ORDER_HORIZONTAL_FIRST = 1  # Pillow <= 12: always horizontal first
ORDER_VERTICAL_FIRST = 2  # forced: a box resize standing for a whole-image resize whose PIL 13 order is vertical


def horizontal_first(in_h: int, in_w: int, out_h: int, out_w: int, order: int = ORDER_PIL13) -> bool:
    """Whether PIL runs the horizontal pass first for an (in_h, in_w) image resized to (out_h, out_w)."""
    if order == ORDER_HORIZONTAL_FIRST:
        return True
    if order == ORDER_VERTICAL_FIRST:
        return False
    return not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)


_horizontal_first_jit = njit(nogil=True, cache=True)(horizontal_first)


@njit(nogil=True, cache=True)
def _resample(src, y_off, x_off, in_h, in_w, top, bottom, left, right, dst, order, flip):
    """Resize box (top, bottom, left, right) of the (in_h, in_w) image that starts at src[y_off, x_off], mirrored
    left to right where ``flip``. The entry points pass a C-contiguous ``src`` and canonical argument types, so
    this compiles once.

    Both passes run along the first axis of their input (see ``_pass``), so the horizontal one works on a
    transposed copy; only the pixels the passes read are copied. The mirror costs nothing: the horizontal pass
    takes its output columns' taps in reverse order, so column ``x`` gets exactly the sums unmirrored column
    ``out_w - 1 - x`` would have."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    xfirst, xcount, xw = bicubic_coeffs(in_w, left, right, out_w)
    yfirst, ycount, yw = bicubic_coeffs(in_h, top, bottom, out_h)
    r0, c0 = yfirst[0], xfirst[0]
    rows = yfirst[out_h - 1] + ycount[out_h - 1] - r0  # the source rows and columns any output reads
    cols = xfirst[out_w - 1] + xcount[out_w - 1] - c0
    if flip:
        xfirst, xcount, xw = xfirst[::-1].copy(), xcount[::-1].copy(), xw[::-1].copy()
    if _horizontal_first_jit(in_h, in_w, out_h, out_w, order):
        src_t = np.empty((cols, rows, 3), np.uint8)
        _transpose(src, y_off + r0, x_off + c0, src_t)
        mid_t = np.empty((out_w, rows, 3), np.uint8)
        _pass(src_t, -c0, 0, xfirst, xcount, xw, mid_t)
        mid = np.empty((rows, out_w, 3), np.uint8)
        _transpose(mid_t, 0, 0, mid)
        _pass(mid, -r0, 0, yfirst, ycount, yw, dst)
    else:
        mid = np.empty((out_h, cols, 3), np.uint8)
        _pass(src, y_off, x_off + c0, yfirst, ycount, yw, mid)
        mid_t = np.empty((cols, out_h, 3), np.uint8)
        _transpose(mid, 0, 0, mid_t)
        out_t = np.empty((out_w, out_h, 3), np.uint8)
        _pass(mid_t, -c0, 0, xfirst, xcount, xw, out_t)
        _transpose(out_t, 0, 0, dst)


@njit(nogil=True, cache=True)
def resize_bicubic(src, top, bottom, left, right, dst, order=ORDER_PIL13, flip=False):
    """PIL's ``Image.resize((W, H), BICUBIC, box=(left, top, right, bottom))`` of ``src`` (uint8 (h, w, 3)) into
    ``dst`` (uint8 (H, W, 3)): the filter reads the pixels around the box too. The box must lie inside ``src``.

    ``order`` picks whose pass order to follow: ``ORDER_PIL13`` (Pillow >= 13: vertical first when the image's
    height shrinks by more than twice its width, in pixels) or ``ORDER_HORIZONTAL_FIRST`` (Pillow <= 12). The
    two differ only where the rounding and clipping of the uint8 intermediate differ. ``flip`` mirrors the
    result left to right (``transpose(FLIP_LEFT_RIGHT)`` after the resize), at no cost."""
    _resample(np.ascontiguousarray(src), np.int64(0), np.int64(0), np.int64(src.shape[0]), np.int64(src.shape[1]),
              np.float64(top), np.float64(bottom), np.float64(left), np.float64(right), dst, np.int64(order),
              bool(flip))


@njit(nogil=True, cache=True)
def bicubic_margin(extent, out_size):
    """How many pixels beyond a box edge the bicubic resize of a box ``extent`` pixels long to ``out_size`` reads:
    the kernel's support, 2 output pixels (stretched by the shrink factor), plus the rounding of the taps."""
    return int(SUPPORT * max(extent / out_size, 1.0)) + 2


@njit(nogil=True, cache=True)
def resize_bicubic_part(src, y0, x0, height, width, top, bottom, left, right, dst, order=ORDER_PIL13):
    """:func:`resize_bicubic` of a (height, width) image of which ``src`` holds only the part from row ``y0`` and
    column ``x0`` on; the box is in the whole image's coordinates. The same pixels as from the whole image when
    ``src`` holds every pixel the filter reads: the box plus :func:`bicubic_margin` pixels on each side, within
    the image (the weights are those of the whole image, clipped at its edges)."""
    _resample(np.ascontiguousarray(src), -np.int64(y0), -np.int64(x0), np.int64(height), np.int64(width),
              np.float64(top), np.float64(bottom), np.float64(left), np.float64(right), dst, np.int64(order), False)


@njit(nogil=True, cache=True)
def resize_crop_bicubic(src, top, bottom, left, right, dst, order=ORDER_PIL13, flip=False):
    """PIL's ``Image.crop((left, top, right, bottom)).resize((W, H), BICUBIC)`` of ``src`` into ``dst``: the
    filter stops at the crop's edges (torchvision's and timm's RandomResizedCrop). Same arguments as
    ``ffcv.libffcv.resize_crop``'s box (rows ``top:bottom``, columns ``left:right``). ``flip`` mirrors the result
    left to right (RandomHorizontalFlip after the crop), at no cost."""
    h = np.int64(bottom - top)
    w = np.int64(right - left)
    _resample(np.ascontiguousarray(src), np.int64(top), np.int64(left), h, w, np.float64(0), np.float64(h),
              np.float64(0), np.float64(w), dst, np.int64(order), bool(flip))

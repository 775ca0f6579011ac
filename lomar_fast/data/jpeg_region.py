"""Decoding only the part of a JPEG that a crop reads, through the JPEG's restart markers.

A baseline JPEG written with a restart interval (``DRI``) is a sequence of entropy-coded segments of
``interval`` MCUs each, separated by ``RST`` markers, and each segment decodes on its own (the DC predictions
restart at every marker). When the segments tile the MCU rows (the interval divides the MCUs per row, or is a
whole number of rows), the segments that cover a rectangle of MCUs form a JPEG of that rectangle: the same
headers with the frame's height and width changed, then those segments with their markers renumbered.
:func:`jpeg_region` writes that smaller JPEG; decoding it does only the entropy decoding, inverse DCTs,
upsampling and colour conversion of the segments a crop needs, instead of the whole image's.

Its pixels equal the whole image's at every position the crop reads: the inverse DCT of a block does not depend
on its neighbours, and the chroma upsampling, which does, reads at most one chroma sample past a pixel's own, so
the rectangle reaches ``MARGIN`` pixels past the crop on every side where the image continues. (libjpeg
interpolates chroma only in components more than 2 samples wide, so no rectangle is narrower than that.) The loader's
crop decoders (:mod:`lomar_fast.data.seeded_crop`) decode a JPEG this way when it has restart markers that tile
its rows, and the whole JPEG otherwise; the ``.beton`` writer (``data_prep/write_beton.py``) writes them.

JPEGs this does not take (``jpeg_region`` returns 0 and the caller decodes the whole image): no restart interval,
an interval that does not tile the rows, a progressive, lossless or arithmetic-coded frame, a scan that does not
hold every component, a height given only by a DNL marker, a crop whose rectangle is the whole image, or any
marker structure it does not recognise.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# pixels of context kept around the crop: libjpeg's chroma upsampling reads one chroma sample either side (1 is
# enough; tests/test_jpeg_region.py finds 0 too few)
MARGIN = 2


@njit(nogil=True, cache=True)
def _u16(data, i):
    return (np.int64(data[i]) << 8) | np.int64(data[i + 1])


@njit(nogil=True, cache=True)
def _layout(data):
    """(sof, sos_end, height, width, mcu_w, mcu_h, interval) of a baseline JPEG with a restart interval whose
    single scan holds every component; sof = -1 where it is not one."""
    fail = (np.int64(-1), np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0))
    n = data.shape[0]
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return fail
    i = np.int64(2)
    sof = np.int64(-1)
    height = width = ncomp = interval = np.int64(0)
    hmax = vmax = np.int64(1)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return fail
        m = np.int64(data[i + 1])
        if m == 0xFF:  # a fill byte before a marker
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        length = _u16(data, i + 2)
        if length < 2 or i + 2 + length > n:
            return fail
        if m == 0xC0 or m == 0xC1:  # baseline or extended sequential, Huffman-coded
            if length < 8:
                return fail
            height = _u16(data, i + 5)
            width = _u16(data, i + 7)
            ncomp = np.int64(data[i + 9])
            if ncomp < 1 or length < 8 + 3 * ncomp:
                return fail
            for c in range(ncomp):
                s = np.int64(data[i + 11 + 3 * c])
                h, v = s >> 4, s & 15
                if h == 0 or v == 0:
                    return fail
                hmax = max(hmax, h)
                vmax = max(vmax, v)
            sof = i
        elif 0xC2 <= m <= 0xCF and m != 0xC4 and m != 0xC8 and m != 0xCC:  # progressive, lossless, arithmetic
            return fail
        elif m == 0xDD:
            if length != 4:
                return fail
            interval = _u16(data, i + 4)
        elif m == 0xDA:
            if sof < 0 or np.int64(data[i + 4]) != ncomp:  # one scan with every component
                return fail
            if height == 0 or width == 0 or interval == 0:
                return fail
            if ncomp == 1:  # a single-component scan is not interleaved: 8x8 MCUs whatever the sampling
                hmax = vmax = 1
            return sof, i + 2 + length, height, width, 8 * hmax, 8 * vmax, interval
        elif m == 0xD9:
            return fail
        i += 2 + length
    return fail


def _readonly(data: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1).view()
    view.setflags(write=False)
    return view


def jpeg_layout(data: np.ndarray) -> tuple[int, int, int, int, int, int, int]:
    """``(sof, sos_end, height, width, mcu_width, mcu_height, restart_interval)`` of the JPEG ``data`` (uint8)
    where :func:`jpeg_region` can take it apart (``sof`` is the frame header's offset), else ``sof`` -1."""
    return tuple(int(v) for v in _layout(_readonly(data)))


def jpeg_region(data: np.ndarray, top: int, bottom: int, left: int, right: int,
                out: np.ndarray) -> tuple[int, int, int, int, int]:
    """Write into ``out`` (uint8, at least ``len(data) + 2`` bytes) a JPEG of the rectangle of restart segments
    that holds rows ``top:bottom`` and columns ``left:right`` of the JPEG ``data`` (uint8), with ``MARGIN``
    pixels around them where the image continues. Returns ``(size, y0, x0, height, width)``: the new JPEG is
    ``out[:size]``, and its pixel ``(r, c)`` is the image's ``(y0 + r, x0 + c)``. ``size`` is 0 where the JPEG
    does not allow it (see the module doc): decode the whole image then.

    Compiled code calls :func:`region_into` (``out`` as row ``row`` of a 2-D array) directly."""
    return tuple(int(v) for v in region_into(_readonly(data), top, bottom, left, right, out.reshape(1, -1), 0))


# The compiled functions take the JPEG as a read-only array and the output as a row of a 2-D array. FFCV's
# memory managers set ``mutable = False`` on numba's shared type object for writable 1-D uint8 arrays
# (``nb.uint8[::1]``) whenever a loader is built; a compiled signature holding that object changes its hash
# then, and the next compilation that calls the function fails with a KeyError inside numba.
@njit(nogil=True, cache=True)
def region_into(data, top, bottom, left, right, streams, row):
    """:func:`jpeg_region` writing into ``streams[row]``; ``data`` read-only (see above)."""
    none = (np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0))
    out = streams[row]
    n = np.int64(data.shape[0])
    sof, sos_end, height, width, mcu_w, mcu_h, interval = _layout(data)
    if sof < 0 or out.shape[0] < n + 2:
        return none
    mcus_x = (width + mcu_w - 1) // mcu_w
    mcus_y = (height + mcu_h - 1) // mcu_h
    if mcus_x % interval == 0:  # segments of `interval` MCUs, several to a row
        seg_cols, seg_rows = interval, np.int64(1)
    elif interval % mcus_x == 0:  # segments of whole rows
        seg_cols, seg_rows = mcus_x, interval // mcus_x
    else:
        return none
    per_row = mcus_x // seg_cols
    seg_w, seg_h = seg_cols * mcu_w, seg_rows * mcu_h
    n_rows = (mcus_y + seg_rows - 1) // seg_rows
    gx0 = max(np.int64(left) - MARGIN, 0) // seg_w
    gx1 = min((min(np.int64(right) + MARGIN, width) + seg_w - 1) // seg_w, per_row)
    gy0 = max(np.int64(top) - MARGIN, 0) // seg_h
    gy1 = min((min(np.int64(bottom) + MARGIN, height) + seg_h - 1) // seg_h, n_rows)
    if gx1 <= gx0 or gy1 <= gy0 or (gx0 == 0 and gy0 == 0 and gx1 == per_row and gy1 == n_rows):
        return none
    x0, y0 = gx0 * seg_w, gy0 * seg_h
    region_w = min(width, gx1 * seg_w) - x0
    region_h = min(height, gy1 * seg_h) - y0
    if region_w <= mcu_w // 4:  # chroma 2 samples wide or less: libjpeg upsamples it without interpolating
        return none
    # the headers, with the frame's size changed
    out[:sos_end] = data[:sos_end]
    out[sof + 5] = region_h >> 8
    out[sof + 6] = region_h & 0xFF
    out[sof + 7] = region_w >> 8
    out[sof + 8] = region_w & 0xFF
    pos = sos_end
    last = (gy1 - 1) * per_row + gx1 - 1  # the last segment needed
    seg = np.int64(0)
    start = sos_end
    copied = np.int64(0)
    i = sos_end
    while seg <= last:
        # find the end of segment `seg`: the next RST marker, or the end of the scan
        end = np.int64(-1)
        while i + 1 < n:
            if data[i] == 0xFF:
                nxt = np.int64(data[i + 1])
                if nxt == 0x00 or nxt == 0xFF:  # a stuffed 0xFF in the data, or a fill byte
                    i += 1 if nxt == 0xFF else 2
                    continue
                if 0xD0 <= nxt <= 0xD7 or nxt == 0xD9:
                    end = i
                    break
                return none  # another marker inside the scan (DNL, a second scan's tables, ...)
            i += 1
        if end < 0:
            return none  # a truncated scan
        if data[end + 1] == 0xD9 and seg < last:
            return none  # fewer segments than the frame holds
        row, col = seg // per_row, seg % per_row
        if gy0 <= row < gy1 and gx0 <= col < gx1:
            if copied > 0:
                out[pos] = 0xFF
                out[pos + 1] = 0xD0 + (copied - 1) % 8
                pos += 2
            size = end - start
            out[pos:pos + size] = data[start:end]
            pos += size
            copied += 1
        seg += 1
        i = end + 2
        start = i
    out[pos] = 0xFF
    out[pos + 1] = 0xD9
    return pos + 2, y0, x0, region_h, region_w


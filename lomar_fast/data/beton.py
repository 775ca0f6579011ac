"""Validation of FFCV ``.beton`` files before a loader touches them.

FFCV itself reports a truncated or foreign file with low-level errors (or not at all, and
then reads garbage). :func:`dataset_info` reads the header, field table, per-sample
metadata and allocation table with NumPy, checks that they are consistent with the file
size, and raises :class:`BetonError` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lomar_fast.errors import InputError

# Layout of ffcv 1.0.x files (ffcv/types.py, format version 2).
_FORMAT_VERSION = 2
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)),
                        ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# type id -> (field class name, per-sample metadata dtype)
_FIELD_TYPES = {
    0: ("FloatField", np.dtype("<f8")),
    1: ("IntField", np.dtype("<i8")),
    2: ("RGBImageField", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"),
                                   ("data_ptr", "<u8")])),
    3: ("BytesField", np.dtype([("ptr", "<u8"), ("size", "<u8")])),
    4: ("NDArrayField", np.dtype("<u8")),
    5: ("JSONField", np.dtype([("ptr", "<u8"), ("size", "<u8")])),
    6: ("TorchTensorField", np.dtype("<u8")),
}

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
CLASSES_FILE = "classes.json"


class BetonError(InputError, ValueError):
    """A ``.beton`` file that cannot be used (truncated, foreign, missing fields, too small)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _name(raw: np.ndarray) -> str:
    b = bytes(raw)
    return b.split(b"\0", 1)[0].decode("ascii", errors="replace")


def dataset_info(path: str | os.PathLike) -> dict:
    """Reads and checks the structure of an FFCV ``.beton`` file (no image is decoded).

    Returns a dict::

        {"path": str, "num_images": int, "fields": {name: field class name},
         "max_side": int | None, "min_side": int | None,   # over the 'image' field
         "max_height": int, "max_width": int, "jpeg_fraction": float,
         "page_size": int, "file_size": int, "classes": list[str] | None,
         "label_range": (int, int) | None}                  # the 'label' field's smallest and largest value

    ``classes`` is read from ``classes.json`` beside the file when present.
    Raises FileNotFoundError if the file does not exist and BetonError if it is not a
    complete FFCV file (wrong format, truncated, inconsistent tables).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such .beton file (write one with "
                                "`python -m data_prep.write_beton` or `make demo-data`)")
    if path.is_dir():
        raise BetonError(path, "is a folder, expected a .beton file")
    size = path.stat().st_size
    if size < _HEADER.itemsize:
        raise BetonError(path, f"truncated or not an FFCV file ({size} bytes, smaller than the header)")
    header = np.fromfile(path, dtype=_HEADER, count=1)[0]
    if int(header["version"]) != _FORMAT_VERSION:
        raise BetonError(path, f"not an FFCV .beton of format version {_FORMAT_VERSION} "
                               f"(header says {int(header['version'])})")
    n_fields, n = int(header["num_fields"]), int(header["num_samples"])
    page = int(header["page_size"])
    if not 1 <= n_fields <= 255 or page <= 0 or page & (page - 1):
        raise BetonError(path, "corrupt header (field count or page size)")
    fd_end = _HEADER.itemsize + n_fields * _FIELD_DESC.itemsize
    if size < fd_end:
        raise BetonError(path, "truncated inside the field table")
    descs = np.fromfile(path, dtype=_FIELD_DESC, count=n_fields, offset=_HEADER.itemsize)
    fields, dtypes = {}, []
    for d in descs:
        tid, name = int(d["type_id"]), _name(d["name"])
        if tid not in _FIELD_TYPES:
            raise BetonError(path, f"field {name!r} has an unknown type id {tid}")
        fields[name] = _FIELD_TYPES[tid][0]
        dtypes.append((name, _FIELD_TYPES[tid][1]))
    meta_type = np.dtype([("", dt) for _, dt in dtypes], align=True)
    meta_end = fd_end + n * meta_type.itemsize
    if size < meta_end:
        raise BetonError(path, f"truncated: {n} samples declared but the metadata ends past "
                               f"the end of the file ({size} bytes); rewrite it")
    table_ptr = int(header["alloc_table_ptr"])
    if table_ptr == 0 or table_ptr < meta_end or table_ptr > size:
        raise BetonError(path, "truncated or unfinished: the allocation table is missing "
                               "(the writer did not complete); rewrite it")
    if (size - table_ptr) % _ALLOC.itemsize:
        raise BetonError(path, "truncated: the allocation table is cut short; rewrite it")
    table = np.fromfile(path, dtype=_ALLOC, offset=table_ptr)
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise BetonError(path, "corrupt: sample data points past the data region; rewrite it")
    meta = np.fromfile(path, dtype=meta_type, count=n, offset=fd_end)
    meta.dtype.names = [name for name, _ in dtypes]

    info = {"path": str(path), "num_images": n, "fields": fields, "max_side": None,
            "min_side": None, "max_height": None, "max_width": None, "jpeg_fraction": None,
            "page_size": page, "file_size": size, "classes": None, "label_range": None}
    if fields.get(LABEL_FIELD) == "IntField" and n:  # an IntField's value is its metadata: no sample is read
        info["label_range"] = (int(meta[LABEL_FIELD].min()), int(meta[LABEL_FIELD].max()))
    img_name = IMAGE_FIELD if fields.get(IMAGE_FIELD) == "RGBImageField" else next(
        (k for k, v in fields.items() if v == "RGBImageField"), None)
    if img_name is not None and n:
        m = meta[img_name]
        h, w = m["height"].astype(np.int64), m["width"].astype(np.int64)
        if (h == 0).any() or (w == 0).any():
            raise BetonError(path, "corrupt: some images have zero size; rewrite it")
        if not np.isin(m["data_ptr"], table["ptr"]).all():
            raise BetonError(path, "corrupt: image data missing from the allocation table; rewrite it")
        sides = np.maximum(h, w)
        info.update(max_side=int(sides.max()), min_side=int(np.minimum(h, w).min()),
                    max_height=int(h.max()), max_width=int(w.max()),
                    jpeg_fraction=float((m["mode"] == 0).mean()))
    cpath = path.with_name(CLASSES_FILE)
    if cpath.is_file():
        try:
            classes = json.loads(cpath.read_text())
            if isinstance(classes, list):
                info["classes"] = [str(c) for c in classes]
        except (OSError, ValueError):
            pass
    return info


def check_beton(path: str | os.PathLike, need_label: bool, input_size: int | None = None) -> dict:
    """dataset_info plus the checks a loader needs; raises BetonError naming the file."""
    info = dataset_info(path)
    fields = info["fields"]
    if fields.get(IMAGE_FIELD) != "RGBImageField":
        raise BetonError(path, f"needs an RGBImageField named {IMAGE_FIELD!r} (found fields: "
                               f"{fields or 'none'}); write it with data_prep.write_beton")
    if need_label and fields.get(LABEL_FIELD) != "IntField":
        raise BetonError(path, f"needs an IntField named {LABEL_FIELD!r} for labels (found fields: "
                               f"{fields}); write it with data_prep.write_beton")
    if info["num_images"] == 0:
        raise BetonError(path, "holds no images")
    if input_size is not None:
        if int(input_size) <= 0:
            raise BetonError(path, f"input size must be positive, got {input_size}")
        if int(input_size) > info["max_side"]:
            raise BetonError(path, f"crop size {input_size} is larger than the largest stored "
                                   f"image side ({info['max_side']} px); rewrite the dataset with "
                                   f"--max-side >= {input_size} or use a smaller --input_size")
    return info

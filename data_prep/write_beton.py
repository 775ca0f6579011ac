"""ImageFolder tree -> FFCV ``.beton`` files (one per split).

Usage::

    python -m data_prep.write_beton --src /datasets/imagenet --out /fast/ffcv --splits train val

The source is the standard ImageNet layout ``<src>/<split>/<class>/<image>``; any file
PIL can read is accepted. Each split becomes ``<out>/<split>.beton`` with two fields:

- ``image``: ``ffcv.fields.RGBImageField`` (RGB, longest side at most ``--max-side``)
- ``label``: ``ffcv.fields.IntField`` (index of the class in the sorted class list)

Beside the ``.beton`` files the writer leaves ``classes.json`` (the class list; a label is
an index into it) and ``<split>.report.json`` (counts, options, timing, and every skipped
file with the reason). Grayscale, CMYK, palette and RGBA images are converted to RGB; files
that cannot be decoded (truncated, not an image) are skipped and listed in the report.

Writes are atomic: each split is written to a hidden temporary file and renamed when it is
complete, so an interrupted run never leaves a ``.beton`` that looks finished. An existing
output is only replaced with ``--force``. Every check on the source tree (missing split,
empty class folder, unreadable folder, class lists that differ between splits) runs before
anything is written.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile

# Truncated files must fail loudly (and be skipped), never decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

WRITE_MODES = ("jpg", "proportion", "raw")
CLASSES_FILE = "classes.json"
IMAGE_FIELD = "image"
LABEL_FIELD = "label"
_MIN_PAGE = 1 << 21
# restart markers: segments of about this many MCUs (4: 64 pixels wide in 4:2:0, the sampling written), and the
# most --restart-mcus takes
RESTART_MCUS = 4
MAX_RESTART_MCUS = 64
JPEG_MCU_WIDTH = 16  # 4:2:0
MAX_SIDE = 16384  # --max-side at most this: a raw image of that side fits a 1 GiB page (FFCV allows < 4 GiB)


class DataPrepError(RuntimeError):
    """Bad input to the writer (the message names the path and the fix)."""


@dataclass
class WriteOptions:
    """Options of :func:`write_dataset` (defaults are the CLI defaults).

    max_side: longest side kept in the file; larger images are downscaled (INTER_AREA).
        0 keeps the original size.
    write_mode: ``jpg`` (JPEG at ``jpeg_quality``), ``raw`` (uint8 pixels, exact) or
        ``proportion`` (each image JPEG with probability ``compress_probability``, else raw).
    workers: writer processes (default: all usable cores).
    chunk_size: images handed to a worker at a time.
    classes: keep only these class folders (labels are re-indexed 0..k-1 over them).
    max_per_class: keep at most this many images per class (the first ones by file name).
    seed: seeds the per-image choice of ``proportion`` mode (deterministic output).
    restart_mcus: JPEGs get restart markers every about this many MCUs (64 pixels at 4, in 4:2:0), so that
        the loader decodes only the part of each image its random crop reads (``lomar_fast.data.jpeg_region``);
        the decoded pixels are the same. 0 writes none (the whole image is decoded).
    """

    max_side: int = 512
    write_mode: str = "jpg"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    workers: int = 0
    chunk_size: int = 100
    classes: list[str] | None = None
    max_per_class: int | None = None
    force: bool = False
    seed: int = 0
    restart_mcus: int = RESTART_MCUS
    progress: bool = True

    def validate(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise DataPrepError(f"--write-mode must be one of {WRITE_MODES}, got {self.write_mode!r}")
        if self.max_side < 0 or (0 < self.max_side < 16) or self.max_side > MAX_SIDE:
            raise DataPrepError(f"--max-side must be 0 (keep) or 16..{MAX_SIDE}, got {self.max_side} (every writer "
                                f"process holds a page of one raw image of that side: 1 GiB at {MAX_SIDE})")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataPrepError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise DataPrepError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.chunk_size < 1:
            raise DataPrepError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise DataPrepError(f"--max-per-class must be >= 1, got {self.max_per_class}")
        if not 0 <= self.restart_mcus <= MAX_RESTART_MCUS:
            raise DataPrepError(f"--restart-mcus must be in 0..{MAX_RESTART_MCUS} (0: no restart markers), "
                                f"got {self.restart_mcus}")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


# ----------------------------------------------------------------------------- scanning

def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as e:
        raise DataPrepError(f"{path}: cannot read the folder ({e.strerror}); fix its permissions") from e
    except NotADirectoryError as e:
        raise DataPrepError(f"{path}: expected a folder, found a file") from e
    except OSError as e:
        raise DataPrepError(f"{path}: cannot read the folder ({e})") from e


def scan_split(split_dir: Path, classes: Sequence[str] | None = None,
               max_per_class: int | None = None) -> tuple[list[str], list[tuple[str, int]], int]:
    """Lists ``split_dir/<class>/<image>``.

    Returns (sorted class names, [(path, label)] sorted by class then file name,
    number of ignored non-image files). Raises DataPrepError for a missing or unreadable
    folder, a split without class folders, an empty class folder or an unknown class.
    """
    if not split_dir.exists():
        raise DataPrepError(f"{split_dir}: split folder not found (expected <src>/<split>/<class>/<images>)")
    if not split_dir.is_dir():
        raise DataPrepError(f"{split_dir}: expected a folder of class folders, found a file")
    found = [e.name for e in _list_dir(split_dir) if e.is_dir() and not e.name.startswith(".")]
    if not found:
        raise DataPrepError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<images>)")
    if classes is not None:
        missing = sorted(set(classes) - set(found))
        if missing:
            raise DataPrepError(f"{split_dir}: requested classes not found: {', '.join(missing[:10])}"
                                + (" ..." if len(missing) > 10 else ""))
        names = sorted(set(classes))
    else:
        names = found
    exts = _image_extensions()
    samples: list[tuple[str, int]] = []
    ignored = 0
    for label, name in enumerate(names):
        cdir = split_dir / name
        files = []
        # the whole class folder, subfolders included, in torchvision ImageFolder's order
        _list_dir(cdir)  # an unreadable class folder: the error names it

        def walk_error(e: OSError, cdir=cdir) -> None:
            raise DataPrepError(f"{e.filename or cdir}: cannot read the folder ({e.strerror}); fix its "
                                f"permissions") from e

        walked = []
        for root, dirs, fnames in os.walk(cdir, followlinks=True, onerror=walk_error):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders (.ipynb_checkpoints) are skipped
            walked.append((root, fnames))
        for root, fnames in sorted(walked):
            for fname in sorted(fnames):
                if fname.startswith("."):
                    continue
                if os.path.splitext(fname)[1].lower() in exts:
                    files.append(os.path.join(root, fname))
                else:
                    ignored += 1
        if not files:
            raise DataPrepError(f"{cdir}: class folder has no image files; remove it or add images"
                                " (or leave it out with --classes)")
        if max_per_class is not None:
            files = files[:max_per_class]
        samples.extend((f, label) for f in files)
    return names, samples, ignored


# ----------------------------------------------------------------------------- decoding

def load_rgb(path: str, max_side: int = 0) -> np.ndarray:
    """Decodes any PIL-readable file to a (H, W, 3) uint8 RGB array.

    JPEGs much larger than ``max_side`` are decoded at a reduced DCT scale (never below the
    target size); the final downscale to ``max_side`` happens in the FFCV field (INTER_AREA), except for
    images so elongated that it would give a side of 0 pixels, which are downscaled here (box filter, at
    least 1 pixel a side). Transparent images are composited on white; 16-bit images are scaled by their
    bit depth (65535 is white), float images by their largest value. Raises on truncated or unreadable files.
    """
    with Image.open(path) as im:
        if max_side and im.format == "JPEG":
            w, h = im.size
            s = max_side / max(w, h)
            if s < 0.5:
                im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba).convert("RGB")
        elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() if arr.size else 1.0
            if im.mode.startswith("I;16") or (im.mode == "I" and hi <= 65535):
                scale = 255.0 / 65535.0  # the bit depth, the same for every image (not its own brightest pixel)
            else:
                scale = 255.0 / hi if hi > 0 else 1.0
            arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr, "L").convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        if max_side and max(w, h) > max_side and int(min(w, h) * (max_side / max(w, h))) < 1:
            # FFCV's resize (the same float arithmetic) would make the short side 0 pixels
            s = max_side / max(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX)
        arr = np.asarray(im)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"decoded to unexpected array {arr.shape} {arr.dtype}")
    if min(arr.shape[:2]) < 1:
        raise ValueError("empty image")
    return np.ascontiguousarray(arr)


class FolderSamples:
    """Indexable (image, label) source handed to the writer processes."""

    def __init__(self, samples: Sequence[tuple[str, int]], max_side: int):
        self.samples = list(samples)
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return load_rgb(path, self.max_side), label


# ----------------------------------------------------------------------------- writing

def restart_interval(width: int, target: int = RESTART_MCUS, mcu_width: int = JPEG_MCU_WIDTH) -> int:
    """The restart interval, in MCUs, of an image ``width`` pixels wide whose MCUs are ``mcu_width`` wide: the
    divisor of its MCUs per row from 2 to ``2 * target`` nearest ``target`` (the larger one on a tie), so that
    the segments tile the rows and a crop can take whole columns of them; one segment per row where none is."""
    mcus = -(-int(width) // int(mcu_width))
    divisors = [d for d in range(2, min(mcus, 2 * target) + 1) if mcus % d == 0]
    if not divisors:
        return mcus
    return min(divisors, key=lambda d: (abs(d - target), -d))


def encode_jpeg(image: np.ndarray, quality: int, restart_mcus: int = RESTART_MCUS) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> JPEG bytes (uint8, 1-D): 4:2:0 at ``quality``, with a restart marker every
    :func:`restart_interval` MCUs (none for ``restart_mcus`` 0). The markers change the entropy-coded bytes
    alone: the decoded pixels are those of the same JPEG without them."""
    import cv2

    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality),
              int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR), int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)]
    if restart_mcus:
        params += [int(cv2.IMWRITE_JPEG_RST_INTERVAL), restart_interval(image.shape[1], restart_mcus)]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError("the image could not be encoded as a JPEG")
    return data.reshape(-1)


def _writer_process(work_q, metadata_sm, metadata_type, fields, allocator, done, alloc_q,
                    skip_q, dataset, seed, restart_mcus=RESTART_MCUS):
    import functools

    from ffcv.fields import rgb_image
    from ffcv.writer import handle_sample

    # this forked writer's JPEGs: FFCV's image field encodes through its module's encode_jpeg(image, quality)
    rgb_image.encode_jpeg = functools.partial(encode_jpeg, restart_mcus=restart_mcus)

    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    names = metadata_type.names
    with allocator:
        while True:
            chunk = work_q.get()
            if chunk is None:
                break
            for dest_ix, src_ix in chunk:
                try:
                    sample = dataset[src_ix]
                    # Deterministic 'proportion' choice, whatever worker gets the image.
                    np.random.seed((seed * 1_000_003 + int(dest_ix)) % (1 << 32))
                    handle_sample(sample, dest_ix, names, metadata, allocator, fields)
                except Exception as e:  # noqa: BLE001 - any per-image failure is a skip
                    skip_q.put((int(dest_ix), int(src_ix), f"{type(e).__name__}: {e}"))
            with done.get_lock():
                done.value += len(chunk)
    alloc_q.put(allocator.allocations)
    del metadata


def _write_beton(fname: str, dataset: FolderSamples, fields: dict, workers: int,
                 chunk_size: int, page_size: int, seed: int, desc: str,
                 progress: bool, shown: str | None = None,
                 restart_mcus: int = RESTART_MCUS) -> list[tuple[int, str]]:
    """Writes ``dataset`` to ``fname``; returns [(source index, reason)] of skipped images. ``shown``: the name
    the errors give the file (the split's .beton, where ``fname`` is its temporary name).

    Unlike ``DatasetWriter.from_indexed_dataset``, an image that fails to load or encode is
    dropped (the file is compacted at the end) and a crashed worker stops the write with an
    error instead of hanging.
    """
    from ffcv.types import ALLOC_TABLE_TYPE
    from ffcv.writer import DatasetWriter
    from ffcv.memory_allocator import MemoryAllocator
    from tqdm import tqdm

    n = len(dataset)
    writer = DatasetWriter(fname, fields, page_size=page_size, num_workers=workers)
    writer.num_samples = n
    writer.prepare()
    ctx = mp.get_context("fork")
    work_q, alloc_q, skip_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    # Small datasets: smaller chunks so that every worker gets a share.
    chunk_size = max(1, min(chunk_size, math.ceil(n / (4 * workers))))
    order = list(enumerate(range(n)))
    for i in range(0, n, chunk_size):
        work_q.put(order[i:i + chunk_size])
    for _ in range(workers):
        work_q.put(None)
    done = ctx.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(fname, writer.data_region_start, page_size)
    procs = [ctx.Process(target=_writer_process,
                         args=(work_q, writer.metadata_sm, writer.metadata_type, fields,
                               allocator, done, alloc_q, skip_q, dataset, seed, restart_mcus),
                         daemon=True)
             for _ in range(workers)]
    skipped: dict[int, tuple[int, str]] = {}
    metadata = None  # a view of the shared metadata: released before the shared memory is closed

    def drain_skips(timeout: float = 0.0) -> None:
        while True:
            try:
                d, s, why = skip_q.get(timeout=timeout) if timeout else skip_q.get_nowait()
            except queue_mod.Empty:
                return
            skipped[d] = (s, why)

    def check_workers() -> None:
        bad = [p for p in procs if p.exitcode not in (None, 0)]
        if bad:
            raise DataPrepError(f"{shown or fname}: a writer process died (exit code {bad[0].exitcode}); "
                                "nothing was written. Check free disk space and memory, then rerun.")

    try:
        for p in procs:
            p.start()
        bar = tqdm(total=n, unit="img", desc=desc, disable=not progress, smoothing=0.1)
        seen = 0
        while seen < n:
            drain_skips()
            val = done.value
            if val > seen:
                bar.update(val - seen)
                seen = val
                continue
            check_workers()
            time.sleep(0.05)
        bar.close()
        allocations = []
        for _ in procs:
            while True:
                try:
                    allocations.append(alloc_q.get(timeout=0.5))
                    break
                except queue_mod.Empty:
                    drain_skips()
                    check_workers()
        for p in procs:
            p.join()
        check_workers()
        drain_skips(timeout=0.05)

        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        keep = np.ones(n, dtype=bool)
        keep[list(skipped)] = False
        kept = int(keep.sum())
        if kept == 0:
            raise DataPrepError(f"{shown or fname}: every image was unreadable (first: "
                                f"{next(iter(skipped.values()))[1]})")
        new_id = np.cumsum(keep) - 1
        table = [np.array(a, dtype=ALLOC_TABLE_TYPE) for a in allocations if len(a)]
        table = np.concatenate(table) if table else np.zeros(0, dtype=ALLOC_TABLE_TYPE)
        table = table[keep[table["sample_id"].astype(np.int64)]]
        table["sample_id"] = new_id[table["sample_id"].astype(np.int64)]
        with open(fname, "r+b") as fp:
            fp.seek(writer.metadata_start)
            fp.write(metadata[keep].tobytes())
            fp.seek(0, os.SEEK_END)
            writer.header["alloc_table_ptr"] = fp.tell()
            writer.header["num_samples"] = kept
            fp.write(table.tobytes())
            fp.seek(0)
            fp.write(writer.header.tobytes())
            fp.flush()
            os.fsync(fp.fileno())
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=5)
        # a live view keeps the buffer exported: close() would raise BufferError and hide the error being raised
        metadata = None
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
    return [skipped[d] for d in sorted(skipped)]


def _page_size_for(max_side: int, write_mode: str) -> int:
    """Smallest power-of-two page (>= 8 MiB) that fits one raw image of the largest size."""
    if max_side == 0:
        need = 64 << 20
    else:
        need = max_side * max_side * 3  # a JPEG can be as large as the raw pixels
    size = 4 * _MIN_PAGE
    while size < need + 4096:
        size *= 2
    return size


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_stale_partials(out: Path, name: str) -> None:
    """Removes temp files of ``name`` left by writer runs that were killed."""
    for p in out.glob(f".{name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def write_dataset(src: str | os.PathLike, out: str | os.PathLike,
                  splits: Sequence[str] = ("train", "val"),
                  options: WriteOptions | None = None) -> dict:
    """Writes ``<out>/<split>.beton`` for each split of the ImageFolder tree ``src``.

    Returns a summary dict {split: report}. Raises DataPrepError before writing anything
    when the source tree or the options are bad, or when an output exists without ``force``.
    """
    opts = options or WriteOptions()
    opts.validate()
    src, out = Path(src), Path(out)
    if not splits:
        raise DataPrepError("--splits needs at least one split name (e.g. train val)")
    if not src.is_dir():
        raise DataPrepError(f"{src}: source folder not found (expected {src}/<split>/<class>/<images>)")
    workers = opts.workers if opts.workers > 0 else usable_cores()

    # 1) every check on the inputs, before anything is written
    scanned = {}
    class_names = None
    for split in splits:
        names, samples, ignored = scan_split(src / split, opts.classes, opts.max_per_class)
        if class_names is None:
            class_names = names
        elif names != class_names:
            diff = sorted(set(names) ^ set(class_names))
            raise DataPrepError(f"{src / split}: class folders differ from {src / splits[0]} "
                                f"(e.g. {', '.join(diff[:5])}); every split needs the same classes")
        scanned[split] = (samples, ignored)
    targets = {s: out / f"{s}.beton" for s in splits}
    if not opts.force:
        existing = [str(t) for t in targets.values() if t.exists()]
        if existing:
            raise DataPrepError(f"{', '.join(existing)}: already exists; pass --force to overwrite")
    classes_path = out / CLASSES_FILE
    if classes_path.exists() and not opts.force:
        try:
            old = json.loads(classes_path.read_text())
        except (OSError, ValueError):
            old = None
        if old != class_names:
            raise DataPrepError(f"{classes_path}: holds a different class list; pass --force to "
                                "overwrite or write to another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataPrepError(f"{out}: cannot create the output folder ({e})") from e
    if not os.access(out, os.W_OK):
        raise DataPrepError(f"{out}: output folder is not writable")

    # 2) write each split to a temporary name, rename when complete
    from ffcv.fields import IntField, RGBImageField

    _atomic_write_text(classes_path, json.dumps(class_names, indent=0) + "\n")
    summary = {}
    for split in splits:
        samples, ignored = scanned[split]
        target = targets[split]
        _remove_stale_partials(out, target.name)
        tmp = out / f".{target.name}.partial-{os.getpid()}"
        fields = {
            IMAGE_FIELD: RGBImageField(write_mode=opts.write_mode,
                                       max_resolution=opts.max_side or None,
                                       jpeg_quality=opts.jpeg_quality,
                                       compress_probability=opts.compress_probability),
            LABEL_FIELD: IntField(),
        }
        t0 = time.perf_counter()
        try:
            skipped = _write_beton(str(tmp), FolderSamples(samples, opts.max_side), fields,
                                   workers=max(1, min(workers, len(samples))),
                                   chunk_size=opts.chunk_size,
                                   page_size=_page_size_for(opts.max_side, opts.write_mode),
                                   restart_mcus=opts.restart_mcus,
                                   seed=opts.seed, desc=split, progress=opts.progress, shown=str(target))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        secs = time.perf_counter() - t0
        report = {
            "split": split,
            "source": str(src / split),
            "beton": str(target),
            "num_classes": len(class_names),
            "num_found": len(samples),
            "num_written": len(samples) - len(skipped),
            "num_skipped": len(skipped),
            "num_ignored_non_image_files": ignored,
            "skipped": [{"path": samples[i][0], "reason": why} for i, why in skipped],
            "seconds": round(secs, 3),
            "images_per_sec": round(len(samples) / secs, 1) if secs > 0 else None,
            "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "force")},
            "workers": workers,
        }
        _atomic_write_text(out / f"{split}.report.json", json.dumps(report, indent=1) + "\n")
        summary[split] = report
        if opts.progress:
            print(f"{target}: {report['num_written']} images, {len(class_names)} classes, "
                  f"{len(skipped)} skipped ({report['images_per_sec']} img/s)"
                  + (f"; see {out / (split + '.report.json')}" if skipped else ""),
                  file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------- CLI

def _parse_classes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise DataPrepError(f"--classes {value}: cannot read the file {path} ({why}); pass @FILE of a text "
                                f"file with one class folder name per line, or the names comma-separated") from e
        items = text.replace(",", "\n").split()
    else:
        items = value.split(",")
    items = [x.strip() for x in items if x.strip()]
    if not items:
        raise DataPrepError(f"--classes {value}: no class names"
                            + (f" in the file {value[1:]}" if value.startswith("@") else "")
                            + "; pass class folder names, comma-separated or one per line in @FILE")
    return items


def build_parser() -> argparse.ArgumentParser:
    d = WriteOptions()
    p = argparse.ArgumentParser(
        prog="python -m data_prep.write_beton",
        description="Write an ImageFolder tree (<src>/<split>/<class>/<image>) to FFCV "
                    "<out>/<split>.beton files with an RGB 'image' field and an int 'label' field.")
    p.add_argument("--src", required=True, help="root of the ImageFolder tree")
    p.add_argument("--out", required=True, help="output folder for <split>.beton, classes.json, reports")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders (default: train val)")
    p.add_argument("--max-side", type=int, default=d.max_side,
                   help=f"downscale so the longest side is at most this; 0 keeps originals (default {d.max_side})")
    p.add_argument("--write-mode", choices=WRITE_MODES, default=d.write_mode,
                   help=f"jpg: JPEG; raw: uint8 pixels; proportion: JPEG with probability "
                        f"--compress-probability (default {d.write_mode})")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help=f"JPEG quality (default {d.jpeg_quality})")
    p.add_argument("--compress-probability", type=float, default=d.compress_probability,
                   help=f"for --write-mode proportion (default {d.compress_probability})")
    p.add_argument("--workers", type=int, default=0, help="writer processes (default: all usable cores)")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help=f"images per work item (default {d.chunk_size})")
    p.add_argument("--classes", default=None,
                   help="class subset: comma-separated folder names, or @file with one per line "
                        "(default: all; labels index the sorted subset)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="keep at most N images per class, first by file name (default: all)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for --write-mode proportion (default 0)")
    p.add_argument("--restart-mcus", type=int, default=d.restart_mcus,
                   help=f"restart markers every about this many MCUs (default {d.restart_mcus}), so the loader "
                        "decodes only the part of each JPEG a crop reads (same pixels); 0 writes none")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A plain kill must still clean up the temporary file. The handler is put back afterwards: a caller that
    # runs main() in its own process (the tests) keeps its own, and its later forks do not inherit this one.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        opts = WriteOptions(max_side=args.max_side, write_mode=args.write_mode,
                            jpeg_quality=args.jpeg_quality,
                            compress_probability=args.compress_probability,
                            workers=args.workers, chunk_size=args.chunk_size,
                            classes=_parse_classes(args.classes),
                            max_per_class=args.max_per_class, force=args.force,
                            seed=args.seed, restart_mcus=args.restart_mcus, progress=not args.quiet)
        write_dataset(args.src, args.out, args.splits, opts)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial .beton was left behind", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

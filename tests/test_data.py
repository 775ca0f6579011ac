"""Tests of data_prep (ImageFolder -> .beton) and lomar_fast.data (FFCV loaders). CPU only.

FFCV compiles each loader's pipeline with Numba (seconds each), so the tests share a few
loaders and small images.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ffcv  # noqa: F401,E402  (a core dependency: fail, do not skip, without it)

import data_prep.write_beton as wb  # noqa: E402
from data_prep.write_beton import DataPrepError, WriteOptions, write_dataset  # noqa: E402
from lomar_fast.data import (  # noqa: E402
    BetonError, build_finetune_loader, build_pretrain_loader, build_val_loader, dataset_info,
    epoch_order, finetune_pipelines, pretrain_pipelines, set_epoch,
)

CLASSES = ["apple", "bird", "car"]
SIZES = [(96, 72), (72, 96), (100, 100), (120, 80)]  # (W, H)


def gradient_image(w: int, h: int, k: int) -> np.ndarray:
    """R grows left->right (0..255), G top->bottom, B a texture that depends on k."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    yy, xx = np.mgrid[0:h, 0:w]
    b = 128 + 80 * np.sin(xx / (4 + k % 3)) * np.cos(yy / 6)
    return np.stack([x, y, b], -1).round().clip(0, 255).astype(np.uint8)


def make_tree(root: Path, per_split=(("train", 8), ("val", 4))) -> Path:
    for split, n in per_split:
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                w, h = SIZES[(i + c) % len(SIZES)]
                Image.fromarray(gradient_image(w, h, i + c)).save(d / f"{cls}_{i:04d}.png")
    return root


def expected_samples(root: Path, split: str) -> list[tuple[Path, int]]:
    out = []
    for c, cls in enumerate(sorted(CLASSES)):
        out += [(p, c) for p in sorted((root / split / cls).iterdir())]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ImageFolder tree (PNG) and its raw-mode .beton files."""
    base = tmp_path_factory.mktemp("tiny")
    tree = make_tree(base / "src")
    out = base / "beton"
    write_dataset(tree, out, ("train", "val"),
                  WriteOptions(write_mode="raw", workers=2, progress=False))
    return tree, out


def read_raw_images(beton: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Decodes a raw-mode .beton without FFCV's pipeline: (images, labels)."""
    from ffcv.reader import Reader

    r = Reader(str(beton))
    mm = np.memmap(beton, dtype=np.uint8, mode="r")
    meta = {name: r.metadata[r.metadata.dtype.names[i]] for i, name in enumerate(r.field_names)}
    imgs = []
    for m in meta["image"]:
        assert m["mode"] == 1  # raw
        n = int(m["height"]) * int(m["width"]) * 3
        p = int(m["data_ptr"])
        imgs.append(np.array(mm[p:p + n]).reshape(int(m["height"]), int(m["width"]), 3))
    return imgs, np.array(meta["label"])


# ----------------------------------------------------------------------------- writer

def test_writer_outputs_match_sources(tiny):
    tree, out = tiny
    assert json.loads((out / "classes.json").read_text()) == sorted(CLASSES)
    for split in ("train", "val"):
        exp = expected_samples(tree, split)
        imgs, labels = read_raw_images(out / f"{split}.beton")
        assert labels.tolist() == [c for _, c in exp]
        for img, (p, _) in zip(imgs, exp):
            np.testing.assert_array_equal(img, np.asarray(Image.open(p)))
        rep = json.loads((out / f"{split}.report.json").read_text())
        assert rep["num_written"] == len(exp) and rep["num_skipped"] == 0
    info = dataset_info(out / "train.beton")
    assert info["num_images"] == 24 and info["max_side"] == 120 and info["min_side"] == 72
    assert info["fields"] == {"image": "RGBImageField", "label": "IntField"}
    assert info["classes"] == sorted(CLASSES)


def test_writer_converts_or_skips_bad_files(tmp_path):
    d = tmp_path / "src" / "train" / "odd"
    d.mkdir(parents=True)
    rgb = gradient_image(40, 30, 0)
    Image.fromarray(rgb[..., 0]).save(d / "a_gray.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(d / "b_cmyk.jpg", quality=95)
    Image.fromarray(rgb).save(d / "c_png_named.JPEG", format="PNG")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "d_rgba.png")
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (d / "e_truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "f_garbage.jpg").write_bytes(os.urandom(2000))
    (d / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    write_dataset(tmp_path / "src", out, ("train",),
                  WriteOptions(write_mode="raw", workers=2, progress=False))
    rep = json.loads((out / "train.report.json").read_text())
    assert rep["num_found"] == 6 and rep["num_ignored_non_image_files"] == 1
    assert rep["num_skipped"] == 2 and rep["num_written"] == 4
    assert sorted(Path(s["path"]).name for s in rep["skipped"]) == ["e_truncated.jpg", "f_garbage.jpg"]
    imgs, labels = read_raw_images(out / "train.beton")
    assert len(imgs) == 4 and labels.tolist() == [0, 0, 0, 0]
    assert all(im.shape == (30, 40, 3) for im in imgs)
    gray = imgs[0].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(imgs[1].astype(int) - rgb).mean() < 8  # CMYK converted back to RGB
    np.testing.assert_array_equal(imgs[2], rgb)  # PNG content behind a .JPEG name
    np.testing.assert_array_equal(imgs[3], rgb)  # alpha dropped


def test_writer_resizes_to_max_side(tmp_path):
    d = tmp_path / "src" / "train" / "x"
    d.mkdir(parents=True)
    Image.fromarray(gradient_image(300, 200, 0)).save(d / "big.jpg", quality=95)
    out = tmp_path / "out"
    write_dataset(tmp_path / "src", out, ("train",),
                  WriteOptions(max_side=64, jpeg_quality=90, workers=1, progress=False))
    info = dataset_info(out / "train.beton")
    assert (info["max_width"], info["max_height"]) == (64, 42) and info["jpeg_fraction"] == 1.0


def test_loading_16_bit_thin_and_nested_images(tmp_path):
    """16-bit images scale by the bit depth (one value gives one grey in every image, not one relative to each
    image's brightest pixel); an image so thin that FFCV's resize would give it a 0-pixel side is downscaled
    while loaded, to at least 1 pixel; class folders are walked as torchvision's ImageFolder walks them; and
    --max-side stays where one raw image fits a writer's page."""
    a = np.full((4, 5), 512, np.uint16)
    b = a.copy()
    b[0, 0] = 65535
    for name, arr in (("a.png", a), ("b.png", b)):
        Image.fromarray(arr).save(tmp_path / name)
    got_a, got_b = wb.load_rgb(str(tmp_path / "a.png")), wb.load_rgb(str(tmp_path / "b.png"))
    assert got_a[1, 1].tolist() == got_b[1, 1].tolist() == [2, 2, 2]  # round(512 * 255 / 65535)
    assert got_b[0, 0].tolist() == [255, 255, 255]

    Image.fromarray(gradient_image(3, 2000, 0)).save(tmp_path / "thin.png")
    assert wb.load_rgb(str(tmp_path / "thin.png"), max_side=512).shape == (512, 1, 3)
    Image.fromarray(gradient_image(49, 25088, 0)).save(tmp_path / "exact.png")  # 49 * (512 / 25088) = 0.99999...
    assert wb.load_rgb(str(tmp_path / "exact.png"), max_side=512).shape == (512, 1, 3)
    assert wb.load_rgb(str(tmp_path / "thin.png")).shape == (2000, 3, 3)  # no --max-side: kept

    root = tmp_path / "tree" / "train"
    for rel in ("cat/b.png", "cat/a.png", "cat/sub/c.png", "cat/sub/deeper/d.png", "cat/.hidden/e.png",
                "dog/z.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient_image(8, 8, 0)).save(root / rel)
    names, samples, ignored = wb.scan_split(root)
    assert names == ["cat", "dog"] and ignored == 0
    rel = [(str(Path(f).relative_to(root)), label) for f, label in samples]
    assert rel == [("cat/a.png", 0), ("cat/b.png", 0), ("cat/sub/c.png", 0), ("cat/sub/deeper/d.png", 0),
                   ("dog/z.png", 1)]

    with pytest.raises(DataPrepError, match="--max-side must be 0 \\(keep\\) or 16..16384, got 30000"):
        WriteOptions(max_side=30000).validate()


@pytest.mark.parametrize("case", ["missing_split", "empty_class", "src_is_file", "unreadable",
                                  "classes_differ", "unknown_class"])
def test_writer_rejects_bad_trees_before_writing(tmp_path, monkeypatch, case):
    src = make_tree(tmp_path / "src", per_split=(("train", 1), ("val", 1)))
    opts = WriteOptions(workers=1, progress=False)
    splits = ("train", "val")
    if case == "missing_split":
        splits = ("train", "test")
    elif case == "empty_class":
        (src / "val" / "zebra").mkdir()
        (src / "train" / "zebra").mkdir()
        (src / "train" / "zebra" / "x.png").write_bytes(b"")
    elif case == "src_is_file":
        src = src / "train" / "apple" / "apple_0000.png"
    elif case == "unreadable":
        real = os.scandir

        def denied(path):
            if str(path).endswith("bird"):
                raise PermissionError(13, "Permission denied")
            return real(path)
        monkeypatch.setattr(wb.os, "scandir", denied)
    elif case == "classes_differ":
        (src / "val" / "car").rename(src / "val" / "cow")
    elif case == "unknown_class":
        opts.classes = ["apple", "dog"]
    out = tmp_path / "out"
    with pytest.raises(DataPrepError) as e:
        write_dataset(src, out, splits, opts)
    msg = str(e.value)
    expected = {"missing_split": "test", "empty_class": "zebra", "src_is_file": "apple_0000.png",
                "unreadable": "bird", "classes_differ": "class folders differ",
                "unknown_class": "dog"}[case]
    assert expected in msg
    assert not out.exists() or not any(out.iterdir())


def test_split_of_only_unreadable_images_stops_with_its_error(tmp_path):
    """A split whose every image fails to decode raises the writer's own error (the shared metadata's view is
    released before its memory is closed, which otherwise raised BufferError over it), leaves no .beton or
    partial file of that split, and keeps the split written before it."""
    src = make_tree(tmp_path / "src", per_split=(("train", 1), ("val", 1)))
    for f in (src / "val").rglob("*.png"):
        f.unlink()
        f.with_suffix(".jpg").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=f"^{out / 'val.beton'}: every image was unreadable"):  # not its temp name
        write_dataset(src, out, ("train", "val"), WriteOptions(write_mode="raw", workers=1, progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train.beton", "train.report.json"]


def test_writer_class_subset_and_limit(tmp_path):
    src = make_tree(tmp_path / "src", per_split=(("train", 5),))
    out = tmp_path / "out"
    write_dataset(src, out, ("train",), WriteOptions(write_mode="raw", classes=["car", "bird"],
                                                     max_per_class=2, workers=1, progress=False))
    assert json.loads((out / "classes.json").read_text()) == ["bird", "car"]
    imgs, labels = read_raw_images(out / "train.beton")
    assert labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(imgs[2], np.asarray(Image.open(src / "train/car/car_0000.png")))


def test_writer_classes_file_errors_name_the_flag_and_file(tmp_path, capsys):
    """--classes @FILE that is missing, a folder or empty: one error line naming --classes and the file, exit 2,
    nothing written."""
    src = make_tree(tmp_path / "src", per_split=(("train", 1),))
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n")
    for arg, said in ((f"@{tmp_path / 'missing.txt'}", "No such file"), (f"@{tmp_path}", "Is a directory"),
                      (f"@{tmp_path / 'empty.txt'}", "no class names")):
        assert wb.main(["--src", str(src), "--out", str(out), "--splits", "train", "--quiet", "--workers", "1",
                        "--classes", arg]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: --classes {arg}: ") and said in err
        assert arg[1:] in err.split(": ", 2)[2]
    assert not out.exists()


def test_writer_refuses_to_overwrite_without_force(tiny, tmp_path):
    tree, _ = tiny
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    assert wb.main(["--src", str(tree), "--out", str(out), "--splits", "val", "--quiet",
                    "--write-mode", "raw", "--workers", "1"]) == 0
    before = (out / "val.beton").read_bytes()
    assert wb.main(["--src", str(tree), "--out", str(out), "--splits", "val", "--quiet",
                    "--workers", "1"]) == 2
    assert (out / "val.beton").read_bytes() == before
    assert wb.main(["--src", str(tree), "--out", str(out), "--splits", "val", "--quiet",
                    "--workers", "1", "--force"]) == 0  # jpg now
    assert dataset_info(out / "val.beton")["jpeg_fraction"] == 1.0
    # main() put the caller's SIGTERM handler back (a left-behind one was inherited by later fork pools)
    assert signal.getsignal(signal.SIGTERM) is handler


def test_interrupted_write_leaves_no_beton(tiny, tmp_path, monkeypatch):
    tree, _ = tiny
    real = wb.load_rgb

    def crash(path, max_side=0):
        if path.endswith("bird_0003.png"):
            os._exit(3)  # a writer process dies mid-write
        return real(path, max_side)

    monkeypatch.setattr(wb, "load_rgb", crash)
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match="died"):
        write_dataset(tree, out, ("train",), WriteOptions(workers=2, progress=False))
    assert not (out / "train.beton").exists()
    assert [p.name for p in out.iterdir() if "beton" in p.name] == []


# ----------------------------------------------------------------------------- bad .beton

def test_bad_beton_files_raise_clear_errors(tiny, tmp_path):
    _, out = tiny
    good = (out / "val.beton").read_bytes()
    with pytest.raises(FileNotFoundError, match="nope.beton"):
        build_val_loader(tmp_path / "nope.beton", 4, 32)
    cut = tmp_path / "cut.beton"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(BetonError, match="cut.beton.*(truncated|unfinished)"):
        build_pretrain_loader(cut, 4, 32)
    tiny_file = tmp_path / "tiny.beton"
    tiny_file.write_bytes(good[:10])
    with pytest.raises(BetonError, match="truncated"):
        dataset_info(tiny_file)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(BetonError, match="junk.beton"):
        dataset_info(junk)
    with pytest.raises(BetonError, match="crop size 500 is larger.*120 px"):
        build_pretrain_loader(out / "val.beton", 4, 500)


def test_beton_without_label_field(tmp_path):
    from ffcv.fields import RGBImageField
    from ffcv.writer import DatasetWriter

    class Images:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (gradient_image(50, 40, i),)

    path = tmp_path / "nolabel.beton"
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw")}, num_workers=1
                  ).from_indexed_dataset(Images())
    assert dataset_info(path)["fields"] == {"image": "RGBImageField"}
    with pytest.raises(BetonError, match="nolabel.beton.*'label'"):
        build_val_loader(path, 2, 32)
    with pytest.raises(BetonError, match="nolabel.beton.*'label'"):
        build_finetune_loader(path, 2, 32)


def test_quasi_random_refused_when_distributed(tiny):
    _, out = tiny
    with pytest.raises(ValueError, match="quasi_random"):
        build_pretrain_loader(out / "train.beton", 4, 32, distributed=True, order="quasi_random")


# ----------------------------------------------------------------------------- loaders

def reference_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """MAE's evaluation transform (torchvision on PIL): resize the short side to size / (224/256), bicubic, then
    center crop."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(int(size / (224 / 256)), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(tf(Image.fromarray(img))).astype(np.int16)


@pytest.fixture(scope="module")
def val_loader(tiny):
    _, out = tiny
    return build_val_loader(out / "train.beton", batch_size=8, input_size=48, num_workers=2,
                            order="random", seed=3)


def test_val_round_trip_matches_reference(tiny, val_loader):
    tree, _ = tiny
    exp = expected_samples(tree, "train")
    order = epoch_order(val_loader, 0)
    assert sorted(order.tolist()) == list(range(len(exp)))
    seen = []
    for images, labels in val_loader:
        assert images.dtype == torch_uint8() and images.shape[1:] == (48, 48, 3)
        assert labels.dtype == torch_int64() and labels.ndim == 1
        seen += list(zip(images.numpy().astype(np.int16), labels.tolist()))
    assert len(seen) == len(exp)
    for (img, label), ix in zip(seen, order):
        path, cls = exp[ix]
        assert label == cls
        ref = reference_center_crop(np.asarray(Image.open(path)), 48)
        diff = np.abs(img - ref)
        # MAE's transform to within float rounding (FFCV's crop-then-resize box was 0.75 px off: 5-10 levels)
        assert diff.max() <= 1, (path, diff.mean(), diff.max())


def test_resume_at_epoch_reproduces_order(tiny, val_loader):
    _, out = tiny

    set_epoch(val_loader, 0)
    epochs = []
    for _ in range(3):
        epochs.append(np.concatenate([x.numpy().reshape(len(x), -1)[:, ::97].copy()
                                      for x, _ in val_loader]))
    assert val_loader.next_epoch == 3
    assert not np.array_equal(epochs[0], epochs[1])  # the order changes between epochs
    set_epoch(val_loader, 1)  # resume at epoch 1
    again = np.concatenate([x.numpy().reshape(len(x), -1)[:, ::97].copy() for x, _ in val_loader])
    np.testing.assert_array_equal(again, epochs[1])
    # A fresh loader with the same seed, set to epoch 2, replays epoch 2's order.
    fresh = build_val_loader(out / "train.beton", batch_size=8, input_size=48, num_workers=2,
                             order="random", seed=3, start_epoch=2)
    np.testing.assert_array_equal(epoch_order(fresh, fresh.next_epoch), epoch_order(val_loader, 2))
    other_seed = build_val_loader(out / "train.beton", batch_size=8, input_size=48,
                                  num_workers=2, order="random", seed=4)
    assert not np.array_equal(epoch_order(other_seed, 2), epoch_order(val_loader, 2))


def torch_uint8():
    import torch
    return torch.uint8


def torch_int64():
    import torch
    return torch.int64


def test_pipeline_declarations():
    pre = pretrain_pipelines(64)
    fin = finetune_pipelines(64)
    assert pre["label"] is None
    assert tuple(pre["image"][0].scale) == (0.2, 1.0) and tuple(fin["image"][0].scale) == (0.08, 1.0)
    assert np.allclose(pre["image"][0].ratio, (3 / 4, 4 / 3))
    assert pre["image"][0].flip_prob == 0.5 and fin["image"][0].flip_prob == 0.5  # flip fused into the crop


def test_seeded_crops_replay_an_epoch_whatever_the_workers(tiny):
    """The crops and flips of epoch e are a function of (seed, e, index). A loader whose epoch 0 was cut short
    (stop_epoch: FFCV's decoding thread is gone before the next epoch, so no two pipelines share numba's
    workers and their per-thread random state) and that then ran epochs 1 and 2, and a fresh loader started at
    epoch 1 with another worker count (a resumed run), yield the same pixels in epochs 1 and 2."""
    import threading

    from lomar_fast.data import stop_epoch

    _, out = tiny

    def loader(epoch, workers, seed=0):
        return build_pretrain_loader(out / "train.beton", batch_size=4, input_size=48, num_workers=workers,
                                     seed=seed, start_epoch=epoch, batches_ahead=2)

    def pixels(ld):
        return torch_cat([x.clone() for x in ld])

    continued = loader(0, workers=2)
    batches = iter(continued)
    next(batches)  # 1 of 6 batches, then the epoch is abandoned
    thread = batches._it  # FFCV's EpochIterator (a Thread) behind the image-only wrapper
    assert isinstance(thread, threading.Thread) and thread.is_alive()
    stop_epoch(batches)
    assert not thread.is_alive()
    set_epoch(continued, 1)
    epochs = [pixels(continued), pixels(continued)]  # epochs 1 and 2
    resumed = loader(1, workers=1)
    assert (epochs[0] == pixels(resumed)).all() and (epochs[1] == pixels(resumed)).all()
    # FFCV's static shares of each batch instead of the queue: the same pixels
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOMAR_DECODE_SCHEDULE", "static")
        static = loader(1, workers=2)
    assert static.seeded_ops[0].schedule == "static" and continued.seeded_ops[0].schedule == "balanced"
    assert (epochs[0] == pixels(static)).all()
    # an epoch left with `break` (no stop_epoch): the next iteration stops its thread first, and replays as well
    set_epoch(continued, 1)
    abandoned = iter(continued)
    next(abandoned)
    thread = abandoned._it
    assert thread.is_alive()
    set_epoch(continued, 1)
    assert (pixels(continued) == epochs[0]).all()
    assert not thread.is_alive()
    # the ended epoch, read on: what was decoded, then its end (a stopped thread sends no end marker of its own)
    reader = threading.Thread(target=lambda: [x for x in abandoned], daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert not (next(iter(loader(1, workers=2, seed=5))) == epochs[0][:4]).all()
    # sample by sample (the order changes with the epoch too): every image gets new crops or flips each epoch
    by_index = [{int(i): x for i, x in zip(epoch_order(continued, e), ep)} for e, ep in ((1, epochs[0]),
                                                                                          (2, epochs[1]))]
    assert all(not torch_equal(by_index[0][i], by_index[1][i]) for i in by_index[0])


def test_the_decode_queue_hands_each_image_to_one_thread_largest_cost_first(monkeypatch):
    """The balanced schedule's parts. claim() from every numba thread at once (a prange of one loop per thread, as
    the decoders run it) hands each queue position to exactly one caller, and counts every call; FFCV's
    pure-Python mode gets a plain counter. The order is the largest estimated cost first, ties in batch order
    (batch order for the static schedule); the estimate counts a region-decoded crop's share of the JPEG's bytes
    plus its pixels for the resize. A bad schedule name is one error naming the variable."""
    import numba
    from ffcv.pipeline.compiler import Compiler

    from lomar_fast.data.seeded_crop import (RESIZE_WEIGHT, SeededRandomResizedCrop, claim_function, decode_cost,
                                             decode_order)

    claim = claim_function()

    @numba.njit(parallel=True)
    def take(n, queue, taken):
        for _ in numba.prange(numba.get_num_threads()):
            k = claim(queue)
            while k < n:
                taken[k] += 1
                for _w in range(50):  # some work between claims, as a decode does
                    taken[k] = taken[k] * 1
                k = claim(queue)

    n = 200_000
    queue, taken = np.zeros(1, np.int64), np.zeros(n, np.int64)
    take(n, queue, taken)
    assert (taken == 1).all() and queue[0] == n + numba.get_num_threads()  # every thread's last claim: past n
    Compiler.set_enabled(False)
    try:
        plain = claim_function()
    finally:
        Compiler.set_enabled(True)
    q = np.zeros(1, np.int64)
    assert plain is not claim and [plain(q) for _ in range(3)] == [0, 1, 2] and q[0] == 3

    cost = np.array([1.0, 5.0, 0.5, 5.0, 3.0])
    assert decode_order(cost, True).tolist() == [1, 3, 4, 0, 2]
    assert decode_order(cost, False).tolist() == [0, 1, 2, 3, 4]
    whole = decode_cost(40_000, True, False, 300, 400, 150, 200)
    assert whole == pytest.approx(40_000 + RESIZE_WEIGHT * 30_000)
    assert decode_cost(40_000, True, True, 300, 400, 150, 200) == pytest.approx(10_000 + RESIZE_WEIGHT * 30_000)
    assert decode_cost(360_000, False, True, 300, 400, 150, 200) == pytest.approx(RESIZE_WEIGHT * 30_000)
    monkeypatch.setenv("LOMAR_DECODE_SCHEDULE", "dynamic")
    with pytest.raises(ValueError, match="LOMAR_DECODE_SCHEDULE='dynamic' must be one of balanced, static"):
        SeededRandomResizedCrop((32, 32))


def torch_cat(xs):
    import torch
    return torch.cat(xs)


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def test_more_workers_than_numba_can_start_warns_and_uses_its_limit(tiny):
    """FFCV's decode threads are numba's, which refuses more than NUMBA_NUM_THREADS (the cores) with a bare
    ValueError: the default --num_workers 8 on a 2-core machine was a traceback. It warns and uses the limit."""
    from lomar_fast.data.loaders import numba_thread_limit

    _, out = tiny
    limit = numba_thread_limit()
    with pytest.warns(UserWarning, match=rf"--num_workers {limit + 6} is more than the {limit} decode threads"):
        loader = build_pretrain_loader(out / "train.beton", batch_size=4, input_size=48, num_workers=limit + 6)
    assert loader.num_workers == limit
    assert next(iter(loader)).shape == (4, 48, 48, 3)


def test_the_evaluation_shard_also_keeps_to_numbas_thread_limit(tiny):
    """Fine-tuning's validation set and k-NN read through build_shard, FFCV's loader too: the same --num_workers
    (default 8) above numba's limit warns and uses the limit there, instead of numba's ValueError. A pass left
    unfinished is stopped by the next, as with the training loaders."""
    from lomar_fast.data.loaders import numba_thread_limit
    from lomar_fast.data.shard import build_shard

    _, out = tiny
    limit = numba_thread_limit()
    with pytest.warns(UserWarning, match=rf"--num_workers {limit + 6} is more than the {limit} decode threads"):
        shard = build_shard(out / "val.beton", 4, 48, "cpu", limit + 6, rank=0, world=1)
    assert shard.loader.num_workers == limit
    images, labels = next(shard.batches())  # a pass left unfinished, its decoding thread still running
    assert images.shape[1:] == (48, 48, 3) and labels.ndim == 1
    thread = shard.loader._running()
    assert thread is not None and thread.is_alive()
    passes = [[(x.clone(), y.clone()) for x, y in shard.batches()] for _ in range(2)]  # each stops the one before
    assert not thread.is_alive()
    assert len(passes[0]) == shard.num_batches == 3
    assert torch_equal(passes[0][0][0], images) and torch_equal(passes[0][0][1], labels)
    assert all(torch_equal(a[0], b[0]) and torch_equal(a[1], b[1]) for a, b in zip(*passes))


def test_batches_follow_the_epoch_order(tiny, val_loader):
    """Batch i of epoch e holds samples epoch_order(e)[i*B:(i+1)*B] (FFCV's Loader, whatever the pipeline): what
    the trainer hands RandAugment as the batch's sample indices."""
    tree, _ = tiny
    labels = [c for _, c in expected_samples(tree, "train")]
    for epoch in (4, 5):
        set_epoch(val_loader, epoch)
        order = epoch_order(val_loader, epoch)
        got = [int(y) for _, ys in val_loader for y in ys.reshape(-1)]
        assert got == [labels[i] for i in order] and len(got) == len(order)
    assert list(epoch_order(val_loader, 4)) != list(epoch_order(val_loader, 5))


def test_pretrain_pipeline(tiny):
    import torch

    _, out = tiny
    loader = build_pretrain_loader(out / "train.beton", batch_size=12, input_size=64,
                                   num_workers=2, order="sequential")
    assert len(loader) == 2
    sizes = [SIZES[(i % 8 + i // 8) % len(SIZES)] for i in range(24)]  # (W, H) of sample i
    epochs = []
    for _ in range(3):
        batches = [x.clone() for x in loader]
        assert all(isinstance(x, torch.Tensor) for x in batches)
        x = torch.cat(batches)
        assert x.shape == (24, 64, 64, 3) and x.dtype == torch.uint8 and x.device.type == "cpu"
        epochs.append(x)
    x = torch.cat(epochs).numpy().astype(np.float64)
    assert x.max() > 150 and x.min() < 100  # real pixels, not normalized or zeros
    assert not torch.equal(epochs[0], epochs[1])  # new random crops every epoch
    # R grows left->right in every source image: a flipped crop has it decreasing.
    slope = x[:, :, -8:, 0].mean((1, 2)) - x[:, :, :8, 0].mean((1, 2))
    assert (slope > 0).sum() >= 10 and (slope < 0).sum() >= 10
    # Crop width / image width >= sqrt(0.2 * 3/4 * H / W) for scale >= 0.2, ratio >= 3/4.
    span = np.abs(x[:, :, -1, 0].mean(1) - x[:, :, 0, 0].mean(1)) / 255.0
    bound = np.array([np.sqrt(0.15 * h / w) for w, h in sizes] * 3)
    assert (span >= bound - 0.06).all(), (span - bound).min()


# ----------------------------------------------------------------------------- distributed

def _dist_rank(rank: int, port: int, beton: str, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loader = build_val_loader(beton, batch_size=4, input_size=32, num_workers=1,
                                  distributed=True, order="random", seed=0, drop_last=False)
        orders = {e: epoch_order(loader, e).tolist() for e in (0, 1)}
        labels = [y.tolist() for _, y in loader]
        Path(result_dir, f"rank{rank}.json").write_text(
            json.dumps({"orders": orders, "labels": sum(labels, [])}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_read_disjoint_shards(tiny, tmp_path):
    import torch.multiprocessing as tmp_mp

    tree, out = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp_mp.spawn(_dist_rank, args=(port, str(out / "train.beton"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    all_labels = [c for _, c in expected_samples(tree, "train")]
    for e in ("0", "1"):
        a, b = r0["orders"][e], r1["orders"][e]
        assert len(a) == len(b) == 12
        assert not set(a) & set(b) and sorted(a + b) == list(range(24))
    assert r0["orders"]["0"] != r0["orders"]["1"]
    # what each rank actually read is the shard its sampler gave it
    assert r0["labels"] == [all_labels[i] for i in r0["orders"]["0"]]
    assert r1["labels"] == [all_labels[i] for i in r1["orders"]["0"]]


# ----------------------------------------------------------------------------- demo + bench

def test_make_demo_is_quick_and_idempotent(tmp_path, capsys):
    from data_prep import make_demo

    out = tmp_path / "demo"
    assert make_demo.main(["--out", str(out), "--train-per-class", "3", "--val-per-class", "1",
                           "--quiet"]) == 0
    classes = json.loads((out / "classes.json").read_text())
    assert len(classes) >= 8
    train = sorted((out / "imagefolder" / "train").glob("*/*.jpg"))
    assert len(train) == 3 * len(classes)
    assert all(300 <= max(Image.open(p).size) <= 500 for p in train)
    assert dataset_info(out / "train.beton")["num_images"] == len(train)
    assert dataset_info(out / "val.beton")["num_images"] == len(classes)
    stamp = (out / "train.beton").stat().st_mtime_ns
    assert make_demo.main(["--out", str(out)]) == 0
    assert "already present" in capsys.readouterr().err
    assert (out / "train.beton").stat().st_mtime_ns == stamp


@pytest.mark.slow  # starts fresh interpreters or a benchmark
def test_loader_benchmark_quick(tmp_path):
    from benchmarks import loader as bench

    res_path = tmp_path / "loader_quick.json"
    assert bench.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(res_path), "--region-decode",
                       "on", "--schedule", "balanced", "static", "--schedule-model", "2", "4"]) == 0
    res = json.loads(res_path.read_text())
    assert res["config"]["quick"] is True and res["cpu"]["cores"] >= 1
    assert [(r["region_decode"], r["schedule"]) for r in res["results"]] == [(True, "balanced"), (True, "static")]
    run = res["results"][0]
    assert run["images_per_epoch"] == run["batches_per_epoch"] * res["config"]["batch_size"] > 0
    assert len(run["epoch_seconds"]) == res["config"]["epochs"]
    assert run["images_per_sec"] > 0 and res["decode_only"]["images_per_sec"] > 0
    assert res["config"]["interpolations"] == ["bicubic"] and res["config"]["device"] == "cpu"  # the loaders'
    assert res["resize_only"][0]["pil"]["images_per_sec"] > 0  # PIL on the same crops, the same pixels
    assert "PIL's crop and resize" in res["table"]
    model = res["schedule_model"]
    assert model["images"] == 64 and [r["threads"] for r in model["rows"]] == [2, 4]
    for r in model["rows"]:  # the queue in cost order never does worse than the equal shares on these batches
        assert 0 < r["efficiency_static"] <= r["efficiency_balanced"] + 1e-9 <= 1 + 1e-9
    assert "| 4 | 16 |" in res["table"] and "balanced" in res["table"]


def test_numba_dict_helpers_are_cached_and_a_read_only_machine_is_not_fatal(monkeypatch):
    """FFCV's import compiles numba's typed-dict helpers: cached on disk after the first start; where numba finds no
    writable cache location, enabling the cache fails and the import goes on compiling as before."""
    import numba.typed.typeddict as td

    from lomar_fast.data import numba_cache

    assert numba_cache.cache_typed_dict_helpers() is True  # done at import of lomar_fast.data
    assert type(td._setitem._cache).__name__ == "FunctionCache" and type(td._make_dict._cache).__name__ == "FunctionCache"
    monkeypatch.setattr(numba_cache, "_done", False)

    def no_locator():
        raise RuntimeError("cannot cache function '_make_dict': no locator available for file")

    monkeypatch.setattr(td._make_dict, "enable_caching", no_locator)
    assert numba_cache.cache_typed_dict_helpers() is False


def test_batches_reach_a_gpu_through_copies_that_finish_in_the_loader_thread():
    """FFCV decodes batch n + ring into the pinned host buffer of batch n once the step loop has taken batch n + 1,
    without waiting for n's copy to the GPU; only a copy that returns once done (non_blocking=False, waiting in
    the loader thread) keeps a GPU that lags the host from reading pixels of a later batch. Every pipeline of
    every loader, images and labels, on any device."""
    import torch
    from ffcv.transforms import ToDevice

    from lomar_fast.data.loaders import val_pipelines

    for device in ("cuda", "cuda:1", "cpu"):
        built = [pretrain_pipelines(32, device), finetune_pipelines(32, device), val_pipelines(32, device)]
        copies = [op for pipes in built for ops in pipes.values() if ops for op in ops if isinstance(op, ToDevice)]
        # the three image pipelines and two label pipelines end on a GPU; on the CPU without a copy
        assert len(copies) == (0 if device == "cpu" else 5)
        assert all(op.device == torch.device(device) and op.non_blocking is False for op in copies)


def test_a_cpu_batch_is_the_decoders_buffer_and_holds_until_the_next_is_taken(tiny):
    """On the CPU a batch is the decoder's output buffer itself (no copy at the end of the pipeline). FFCV's ring
    of batches_ahead + 2 buffers per stage keeps the batch a consumer holds intact while the loader decodes as far
    ahead as its queue allows; the buffer is reused only after the next batch is taken."""
    import time

    import torch

    _, out = tiny
    loader = build_pretrain_loader(out / "train.beton", batch_size=2, input_size=32, num_workers=1,
                                   order="sequential", batches_ahead=1)  # a ring of 3 buffers, 12 batches
    held, kept = [], []
    for x in loader:
        copy = x.clone()
        time.sleep(0.05)  # the loader thread fills its queue and decodes the batch after it meanwhile
        assert torch.equal(x, copy)
        held.append(x)
        kept.append(copy)
    assert len(held) == 12
    assert len({x.data_ptr() for x in held}) == 3  # the ring's buffers, not a copy per batch
    assert any(not torch.equal(x, c) for x, c in zip(held, kept))  # and reused: held too long, a batch changes


def test_loaders_leave_numbas_shared_array_types_as_they_were(tiny):
    """FFCV's page-cache reader set ``mutable = False`` on the type object ``numba.uint8[::1]`` returns, which numba
    shares with every writable uint8 array of the process: it turned them read-only and changed the hash of a key
    that compiled functions hold, so such a function could no longer list its signatures (a KeyError, printed by
    numba's finalizer when a freed loader's ``imdecode`` went). Two loaders later, the type is as it was."""
    import gc

    import numba

    from lomar_fast.data.ffcv_reader import _state_type

    _, out = tiny

    @numba.njit
    def total(a):
        return a.sum()

    writable = numba.uint8[::1]
    assert writable.mutable, "an earlier loader of this process turned numba's uint8 array type read-only"
    assert total(np.ones(3, np.uint8)) == 3  # a signature that holds the shared type
    key = hash(writable)
    for seed in (0, 1):
        loader = build_pretrain_loader(out / "train.beton", batch_size=4, input_size=32, num_workers=1, seed=seed)
        assert next(iter(loader)).shape == (4, 32, 32, 3)
        del loader
        gc.collect()
    assert numba.uint8[::1] is writable and writable.mutable and hash(writable) == key
    assert [tuple(s.args) for s in total.nopython_signatures] == [(writable,)]
    assert total(np.ones(4, np.uint8)) == 4
    # the reader's own state type: the stored bytes read-only, the tables writable (FFCV's signature)
    data, addresses, sizes = _state_type().types
    assert not data.mutable and data.dtype == numba.uint8 and addresses.mutable and sizes == addresses


def test_a_loader_hit_by_cpythons_ast_race_is_made_again(tiny, monkeypatch):
    """CPython <= 3.11.7 can fail FFCV's parse of a loader's pipeline with "AST constructor recursion depth
    mismatch" when another thread does AST work meanwhile (gh-106905): the loader is made again, with new
    pipelines, and works; any other SystemError, or the race every time, is raised."""
    import ast
    import types

    import ffcv.pipeline.graph as graph

    from lomar_fast.data import loaders
    from lomar_fast.data.shard import build_shard

    _, out = tiny
    calls = []

    def failing(fail, message=loaders.AST_RACE):
        def parse(source, *args, **kwargs):  # FFCV's parse of the pipeline's source
            calls.append(source)
            if len(calls) in fail:
                raise SystemError(f"{message} (before=150, after=172)")
            return ast.parse(source, *args, **kwargs)

        calls.clear()
        monkeypatch.setattr(graph, "ast", types.SimpleNamespace(**{**vars(ast), "parse": parse}))

    failing(fail=(1,))
    loader = build_pretrain_loader(out / "train.beton", batch_size=4, input_size=32, num_workers=1)
    assert sum(x.shape[0] for x in loader) == 24 and len(calls) > 1
    failing(fail=(1,))
    shard = build_shard(out / "val.beton", batch_size=4, input_size=32, device="cpu", rank=0, world=1)
    assert sum(int((y >= 0).sum()) for _, y in shard.batches()) == shard.n > 0 and len(calls) > 1
    failing(fail=(1,), message="other")
    with pytest.raises(SystemError, match="other"):
        build_pretrain_loader(out / "train.beton", batch_size=4, input_size=32, num_workers=1)
    failing(fail=range(1, 1000))
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        build_pretrain_loader(out / "train.beton", batch_size=4, input_size=32, num_workers=1)
    assert len(calls) == 3  # three attempts

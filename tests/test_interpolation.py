"""The bicubic resize of the crops (lomar_fast.data.resample) against PIL, and the --interpolation flag from the
config to the decoders. CPU only.

Exactness: every comparison with PIL below is exact (0 differing pixels) on random noise and on photos, shrinking
and enlarging, odd sizes, crop-then-resize and resize-with-box, for the pass order of the installed Pillow
(Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice the width; older ones always
run the horizontal pass first).
"""
from __future__ import annotations

import gc

import numpy as np
import PIL
import pytest
from PIL import Image

import ffcv  # noqa: F401  (a core dependency: fail, do not skip, without it)

from lomar_fast.data.resample import (ORDER_HORIZONTAL_FIRST, ORDER_PIL13, horizontal_first, resize_bicubic,
                                      resize_crop_bicubic)

PIL_ORDER = ORDER_PIL13 if int(PIL.__version__.split(".")[0]) >= 13 else ORDER_HORIZONTAL_FIRST


def pil_box(img: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """PIL's resize of ``box`` (left, top, right, bottom) to ``size`` (W, H), reading the pixels around the box."""
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC, box=box))


def pil_crop(img: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """PIL's crop to ``box``, then resize to ``size``: torchvision's and timm's RandomResizedCrop."""
    return np.asarray(Image.fromarray(img).crop(box).resize(size, Image.BICUBIC))


def ours_box(img, size, box, order=PIL_ORDER):
    (w, h), (l, t, r, b) = size, box
    dst = np.empty((h, w, 3), np.uint8)
    resize_bicubic(img, t, b, l, r, dst, order)
    return dst


def ours_crop(img, size, box, order=PIL_ORDER):
    (w, h), (l, t, r, b) = size, box
    dst = np.empty((h, w, 3), np.uint8)
    resize_crop_bicubic(img, t, b, l, r, dst, order)
    return dst


def random_box(rng, h, w):
    t = int(rng.integers(0, h))
    l = int(rng.integers(0, w))
    return l, t, int(rng.integers(l + 1, w + 1)), int(rng.integers(t + 1, h + 1))


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Four natural photos (scikit-image's), at ImageNet-like sizes, one of them portrait."""
    from data_prep.make_demo import available_photos

    out = []
    for k, path in enumerate(sorted(available_photos().values())[:4]):
        with Image.open(path) as im:
            im = im.convert("RGB")
            size = (375, 500) if k == 1 else (500, 375) if k != 3 else (333, 271)
            out.append(np.array(im.resize(size, Image.LANCZOS)))  # writable, as the decoders' buffers are
    return out


def test_resampler_equals_pil_on_random_noise():
    """Noise makes every rounding visible (no smooth neighbourhood hides an off-by-one weight)."""
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(1, 90, size=2))
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        box = random_box(rng, h, w)
        size = tuple(int(v) for v in rng.integers(1, 80, size=2))  # shrinking, enlarging, or mixed per axis
        np.testing.assert_array_equal(ours_box(img, size, box), pil_box(img, size, box), err_msg=f"{img.shape} {box}")
        np.testing.assert_array_equal(ours_crop(img, size, box), pil_crop(img, size, box),
                                      err_msg=f"{img.shape} {box}")
        cases += 1
    # non-contiguous input (a view) is read the same
    img = rng.integers(0, 256, size=(61, 90, 3), dtype=np.uint8)[:, ::2]
    np.testing.assert_array_equal(ours_box(img, (17, 23), (3, 5, 40, 58)),
                                  pil_box(np.ascontiguousarray(img), (17, 23), (3, 5, 40, 58)))
    assert cases == 120


def test_the_mirrored_resize_is_pils_resize_then_flip():
    """``flip=True`` gives the unmirrored resize flipped left to right, in both pass orders, shrinking and
    enlarging, on noise; in the installed Pillow's order, that is PIL's crop-then-resize (and box resize)
    followed by ``FLIP_LEFT_RIGHT``."""
    rng = np.random.default_rng(3)
    for k in range(80):
        h, w = (int(v) for v in rng.integers(1, 90, size=2))
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        box = random_box(rng, h, w)
        size = tuple(int(v) for v in rng.integers(1, 80, size=2))
        order = (PIL_ORDER, ORDER_HORIZONTAL_FIRST)[k % 2]
        for resize, ours, pil in ((resize_crop_bicubic, ours_crop, pil_crop), (resize_bicubic, ours_box, pil_box)):
            (l, t, r, b), (ow, oh) = box, size
            dst = np.empty((oh, ow, 3), np.uint8)
            resize(img, t, b, l, r, dst, order, True)
            np.testing.assert_array_equal(dst, np.flip(ours(img, size, box, order), axis=1), err_msg=f"{box} {size}")
            if order == PIL_ORDER:
                mirrored = Image.fromarray(pil(img, size, box)).transpose(Image.FLIP_LEFT_RIGHT)
                np.testing.assert_array_equal(dst, np.asarray(mirrored), err_msg=f"{img.shape} {box} {size}")


def test_the_passes_transpose_moves_each_pixel_once_whole():
    """The transpose between the passes (four source rows at a time as 32-bit words, the last column and the
    leftover rows byte by byte) against NumPy's, for boxes of any offset and size, one pixel and one row included;
    the bytes around the output are not touched."""
    from lomar_fast.data.resample import _transpose

    rng = np.random.default_rng(5)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        src = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        rows, cols = int(rng.integers(1, h - r0 + 1)), int(rng.integers(1, w - c0 + 1))
        guard = np.full(cols * rows * 3 + 8, 7, np.uint8)
        out = guard[4:4 + cols * rows * 3].reshape(cols, rows, 3)
        _transpose(src, r0, c0, out)
        np.testing.assert_array_equal(out, src[r0:r0 + rows, c0:c0 + cols].transpose(1, 0, 2))
        assert (guard[:4] == 7).all() and (guard[-4:] == 7).all()


def test_resampler_equals_pil_on_photos(photos):
    """RandomResizedCrop-like boxes of photos to 224 and 160 (the demo), the whole image, thin crops, and
    enlargements; odd output sizes too."""
    rng = np.random.default_rng(1)
    for img in photos:
        h, w = img.shape[:2]
        boxes = [(0, 0, w, h), (1, 2, w - 3, h - 1), (w // 3, 0, w // 3 + 41, h)]  # whole, inset, tall and thin
        for _ in range(6):
            area = h * w * rng.uniform(0.08, 1.0)
            ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = min(w, int(round(np.sqrt(area * ar)))), min(h, int(round(np.sqrt(area / ar))))
            t, l = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            boxes.append((l, t, l + cw, t + ch))
        for box in boxes:
            for size in ((224, 224), (160, 160), (97, 131), (600, 451)):
                np.testing.assert_array_equal(ours_crop(img, size, box), pil_crop(img, size, box), err_msg=str(box))
                np.testing.assert_array_equal(ours_box(img, size, box), pil_box(img, size, box), err_msg=str(box))


def test_pass_order_is_pils():
    """The pass order changes pixels (the intermediate is rounded to uint8), and the installed PIL's order is
    the one that matches it."""
    assert horizontal_first(300, 300, 224, 224) and horizontal_first(500, 300, 224, 224, ORDER_HORIZONTAL_FIRST)
    assert not horizontal_first(500, 300, 224, 224)  # 276 > 2 * 76: height shrinks much more
    assert horizontal_first(350, 300, 224, 224)  # 126 > 2 * 76 is false
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(500, 300, 3), dtype=np.uint8)
    box, size = (0, 0, 300, 500), (224, 224)
    hv = ours_box(img, size, box, ORDER_HORIZONTAL_FIRST)
    rule = ours_box(img, size, box, ORDER_PIL13)
    assert (hv != rule).any()  # the uint8 intermediate is rounded and clipped differently
    np.testing.assert_array_equal(ours_box(img, size, box), pil_box(img, size, box))


def test_bicubic_and_area_differ_on_photos(photos):
    """The two resizes of one crop differ on a photo, by about one grey level on average (a shrink by 1.34)."""
    from ffcv.libffcv import resize_crop

    img = photos[0]
    area = np.empty((224, 224, 3), np.uint8)
    resize_crop(img, 10, 310, 20, 320, area)  # rows 10..310, columns 20..320
    bicubic = ours_crop(img, (224, 224), (20, 10, 320, 310))
    np.testing.assert_array_equal(bicubic, pil_crop(img, (224, 224), (20, 10, 320, 310)))
    diff = np.abs(area.astype(int) - bicubic)
    assert diff.max() > 0 and 0.2 < diff.mean() < 4, diff.mean()


# ------------------------------------------------------------------------------------- the decoders in loaders

@pytest.fixture(scope="module")
def betons(tmp_path_factory, photos):
    """The photos as a JPEG .beton and a raw one (two classes), 8 images each: random views of the 4 photos."""
    from data_prep.write_beton import WriteOptions, write_dataset

    root = tmp_path_factory.mktemp("interp")
    rng = np.random.default_rng(3)
    for k in range(8):
        img = photos[k % 4]
        h, w = img.shape[:2]
        l, t = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        d = root / "src" / "train" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[t:, l:]).save(d / f"{k}.png")
    out = {}
    for mode in ("jpg", "raw"):
        write_dataset(root / "src", root / mode, ("train",), WriteOptions(write_mode=mode, workers=1, progress=False))
        out[mode] = root / mode / "train.beton"
    return out


def stored_images(beton) -> list[np.ndarray]:
    """Every image of a .beton decoded as FFCV's decoders see it (libjpeg-turbo for JPEG), in file order."""
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    r = Reader(str(beton))
    meta = r.metadata[r.metadata.dtype.names[r.field_names.index("image")]]
    sizes = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    mm = np.memmap(beton, dtype=np.uint8, mode="r")
    out = []
    for m in meta:
        h, w, p = int(m["height"]), int(m["width"]), int(m["data_ptr"])
        data = np.array(mm[p:p + sizes[p]])
        if m["mode"] == 0:
            img = np.empty((h, w, 3), np.uint8)
            imdecode(data, img, h, w, h, w, 0, 0, 1, 1, False, False)
        else:
            img = data[:h * w * 3].reshape(h, w, 3)
        out.append(img)
    return out


def loader_images(loader) -> np.ndarray:
    import torch

    return torch.cat([x.clone() for x, _ in loader]).numpy()


def images_within(loader, seconds: float = 120) -> np.ndarray:
    """loader_images, or a failure when no epoch's end comes in time (a loader thread that died leaves its
    reader waiting forever)."""
    import threading

    out = []
    reader = threading.Thread(target=lambda: out.append(loader_images(loader)), daemon=True)
    reader.start()
    reader.join(seconds)
    assert out, f"the loader gave no epoch within {seconds} s"
    return out[0]


def test_training_crop_bicubic_equals_pil_with_the_same_draws(betons):
    """The fine-tuning decoder with 'bicubic' yields PIL's crop-then-resize of the box it drew, flipped when it drew
    a flip; with 'area' it yields FFCV's resize of the same box with the same flip: same draws, another resize.
    Two decode threads share the JPEG decode buffers, one each (ThreadScratch); the JPEGs are decoded by their
    crops' regions (lomar_fast/data/jpeg_region.py), and the reference from whole images."""
    from ffcv.libffcv import resize_crop

    from lomar_fast.data import FINETUNE_SCALE, RATIO, build_finetune_loader
    from lomar_fast.data.seeded_crop import compile_draws

    images = stored_images(betons["jpg"])
    draw = compile_draws()
    scale, ratio = np.array(FINETUNE_SCALE, np.float64), np.array(RATIO, np.float64)
    loaders, got = {}, {}
    for interp in ("area", "bicubic"):
        loaders[interp] = build_finetune_loader(betons["jpg"], batch_size=4, input_size=64, num_workers=2, seed=7,
                                                order="sequential", start_epoch=1, interpolation=interp)
        assert loaders[interp].seeded_ops[0].interpolation == interp
        got[interp] = loader_images(loaders[interp])
    flips = 0
    for ix, img in enumerate(images):
        t, l, h, w, flip = draw(7, 1, ix, np.uint32(img.shape[0]), np.uint32(img.shape[1]), scale, ratio, 0.5)
        ref = pil_crop(img, (64, 64), (l, t, l + w, t + h))
        area = np.empty((64, 64, 3), np.uint8)
        resize_crop(img, t, t + h, l, l + w, area)
        if flip:
            ref, area = ref[:, ::-1], area[:, ::-1]
        flips += bool(flip)
        np.testing.assert_array_equal(got["bicubic"][ix], ref, err_msg=f"image {ix}")
        np.testing.assert_array_equal(got["area"][ix], area, err_msg=f"image {ix}")
    assert 0 < flips < len(images)  # both branches were exercised
    assert (got["area"] != got["bicubic"]).any()
    # the writer's restart markers: most of these images were decoded by their crop's region alone
    assert all(loaders[i].seeded_ops[0].region_decodes >= len(images) // 2 for i in loaders)
    # FFCV's pure-Python mode (its debugging switch) runs the same decode loop uncompiled, to the same pixels
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    try:
        pure = build_finetune_loader(betons["jpg"], batch_size=4, input_size=64, num_workers=1, seed=7,
                                     order="sequential", start_epoch=1, interpolation="bicubic")
        np.testing.assert_array_equal(images_within(pure), got["bicubic"])
    finally:
        Compiler.set_enabled(True)
    del loaders, pure
    gc.collect()  # free the compiled pipelines now, while numba compiles nothing else


def test_decoders_keep_one_decode_buffer_per_thread_and_ask_the_loader_for_their_output_alone(betons):
    """FFCV's crop decoders had the loader allocate, and pin, a decode buffer of the largest image's size for every
    image of every batch slot (1 GB per rank at batch 256 from 512-px images). Ours decode into one unpinned
    buffer per thread, made once: the loader holds only their output batches. The 'area' evaluation decoder,
    now ours too, gives FFCV's center crop to the pixel, with two decode threads."""
    import torch
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from lomar_fast.data import build_val_loader, eval_crop_pct

    size, batch, ahead = 40, 3, 2
    ours = build_val_loader(betons["jpg"], batch_size=batch, input_size=size, num_workers=2, batches_ahead=ahead,
                            interpolation="area")
    ffcv_own = Loader(str(betons["jpg"]), batch_size=batch, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                      pipelines={"image": [CenterCropRGBImageDecoder((size, size), eval_crop_pct(size)), ToTensor()],
                                 "label": None})
    got = torch.cat([x.clone() for x, _ in ours]).numpy()
    want = torch.cat([x.clone() for x, in ffcv_own]).numpy()
    assert got.shape == (8, size, size, 3) and (got == want).all()
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)  # FFCV's pure-Python mode: the same loop uncompiled, the same pixels
    try:
        pure = build_val_loader(betons["jpg"], batch_size=batch, input_size=size, num_workers=1, interpolation="area")
        assert (images_within(pure) == want).all()
    finally:
        Compiler.set_enabled(True)

    def buffers(loader):
        allocs = loader.graph.allocate_memory(batch, ahead + 2)["operation"].values()
        return [a for alloc in allocs if alloc is not None for a in (alloc if isinstance(alloc, tuple) else (alloc,))]

    import numba

    decoder = ours.pipeline_specs["image"].decoder
    heights, widths = decoder.metadata["height"].astype(int), decoder.metadata["width"].astype(int)
    slot_batch = (ahead + 2, batch, size, size, 3)
    assert [np.shape(b) for b in buffers(ffcv_own)] == [slot_batch, (ahead + 2, batch, 3 * heights.max() * widths.max())]
    # ours: the images, their copies (ToDevice), the labels and theirs; nothing bigger than a batch of images
    assert slot_batch in [np.shape(b) for b in buffers(ours)]
    assert max(np.prod(np.shape(b)) for b in buffers(ours)) == np.prod(slot_batch)
    assert decoder._scratch.shape == (numba.config.NUMBA_NUM_THREADS, 3 * int((heights * widths).max()))
    address = decoder._scratch.ctypes.data
    for _ in ours:  # a second epoch: the compiled code's buffers stay where they were
        pass
    assert decoder._scratch.ctypes.data == address
    # a decoder serves one loader: one over larger images would write past its buffers
    decoder.metadata = decoder.metadata.copy()
    decoder.metadata["height"] *= 2
    with pytest.raises(ValueError, match="give each loader its own decoder"):
        decoder.scratch()
    del ours, ffcv_own, pure
    gc.collect()


def mae_eval(img: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """MAE's evaluation transform with torchvision on a PIL image: Resize(int(size / crop_pct), BICUBIC) (short
    side to that, long side int(short * long / short_old)), then CenterCrop(size) at round((n - size) / 2)."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(int(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(tf(Image.fromarray(img)))


def test_val_center_crop_bicubic_equals_the_mae_transform(betons):
    """'bicubic' evaluation (here through build_shard, on raw-stored images) is MAE's eval transform, resize the
    short side to size / crop_pct then center crop, to within 1 grey level (float rounding of the box). FFCV's
    own center box (crop int(crop_pct * short side), then resize) sat up to 0.75 px off: 5-10 levels on average."""
    from lomar_fast.data import eval_crop_pct
    from lomar_fast.data.shard import build_shard

    images = stored_images(betons["raw"])
    shard = build_shard(betons["raw"], 5, 48, "cpu", 1, rank=0, world=1, interpolation="bicubic")
    assert shard.loader.pipeline_specs["image"].decoder.interpolation == "bicubic"
    got = np.concatenate([x.numpy().copy() for x, _ in shard.batches()])
    assert len(got) == len(images)
    worst_old = 0.0
    for ix, img in enumerate(images):
        want = mae_eval(img, 48, eval_crop_pct(48)).astype(int)
        assert np.abs(got[ix].astype(int) - want).max() <= 1, f"image {ix}"
        h, w = img.shape[:2]
        c = int(eval_crop_pct(48) * min(h, w))
        t, l = (h - c) // 2, (w - c) // 2
        worst_old = max(worst_old, np.abs(pil_box(img, (48, 48), (l, t, l + c, t + c)).astype(int) - want).mean())
    assert worst_old > 1.0  # the test tells the two boxes apart
    del shard
    gc.collect()


def test_eval_box_matches_the_resize_then_crop_on_odd_sizes():
    """The box stands for torchvision's resize-then-crop at any image shape and crop_pct, both pass orders."""
    from lomar_fast.data.seeded_crop import eval_box

    rng = np.random.default_rng(0)
    for k in range(24):
        h, w = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        if k % 6 == 0:
            h, w = 300, 41  # a tall image: PIL's whole-image resize runs the vertical pass first
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size, pct = int(rng.choice([24, 32, 40])), float(rng.choice([224 / 256, 1.0, 0.9]))
        top, bottom, left, right, order = eval_box(h, w, size, pct)
        dst = np.empty((size, size, 3), np.uint8)
        resize_bicubic(img, top, bottom, left, right, dst, order)
        diff = np.abs(dst.astype(int) - mae_eval(img, size, pct).astype(int))
        assert diff.max() <= 1, (h, w, size, pct, diff.max())


def test_a_part_of_the_image_around_the_box_resizes_to_the_whole_images_pixels():
    """resize_bicubic_part (the evaluation crop's region decode): a part holding the box plus bicubic_margin pixels
    on each side gives resize_bicubic's pixels of the whole image, in both pass orders, boxes at the image's edges
    included."""
    from lomar_fast.data.resample import ORDER_VERTICAL_FIRST, bicubic_margin, resize_bicubic_part

    rng = np.random.default_rng(3)
    for k in range(30):
        h, w = int(rng.integers(30, 200)), int(rng.integers(30, 200))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = int(rng.integers(8, 40))
        top, left = float(rng.uniform(0, h / 3)), float(rng.uniform(0, w / 3))
        bottom, right = float(rng.uniform(top + 1, h)), float(rng.uniform(left + 1, w))
        if k % 5 == 0:
            top, left, bottom, right = 0.0, 0.0, float(h), float(w)  # the whole image: no room around the box
        order = ORDER_HORIZONTAL_FIRST if k % 2 else ORDER_VERTICAL_FIRST
        want = np.empty((size, size, 3), np.uint8)
        resize_bicubic(img, top, bottom, left, right, want, order)
        my, mx = bicubic_margin(bottom - top, size), bicubic_margin(right - left, size)
        y0, y1 = max(int(top) - my, 0), min(int(bottom) + my, h)
        x0, x1 = max(int(left) - mx, 0), min(int(right) + mx, w)
        got = np.empty_like(want)
        resize_bicubic_part(np.ascontiguousarray(img[y0:y1, x0:x1]), y0, x0, h, w, top, bottom, left, right, got, order)
        np.testing.assert_array_equal(got, want, err_msg=str((h, w, size, top, bottom, left, right)))


def test_pretrain_pipeline_and_bad_values():
    from lomar_fast.data import finetune_pipelines, pretrain_pipelines, val_pipelines
    from lomar_fast.data.seeded_crop import INTERPOLATIONS, CenterCrop, SeededRandomResizedCrop

    for interp in INTERPOLATIONS:
        ops = [pipelines(32, interpolation=interp)["image"][0]
               for pipelines in (pretrain_pipelines, finetune_pipelines, val_pipelines)]
        assert [type(o) for o in ops] == [SeededRandomResizedCrop, SeededRandomResizedCrop, CenterCrop]
        assert all(o.interpolation == interp for o in ops)
    assert pretrain_pipelines(32)["image"][0].interpolation == "bicubic"  # the default: the reference recipe
    with pytest.raises(ValueError, match="interpolation must be one of area, bicubic"):
        finetune_pipelines(32, interpolation="bilinear")
    with pytest.raises(ValueError, match="interpolation"):
        val_pipelines(32, interpolation="nearest")


# ---------------------------------------------------------------------------------------- the flag, end to end

def test_config_flag(tmp_path):
    from lomar_fast.config import CHOICES, FinetuneConfig, PretrainConfig, parse_config
    from lomar_fast.data.seeded_crop import INTERPOLATIONS
    from lomar_fast.errors import ConfigError

    assert CHOICES["interpolation"] == INTERPOLATIONS
    assert parse_config([], PretrainConfig).interpolation == "bicubic"  # the reference recipe's resize
    assert parse_config(["--interpolation", "area"], FinetuneConfig).interpolation == "area"
    (tmp_path / "run.yaml").write_text("interpolation: area\n")
    assert parse_config(["--config", str(tmp_path / "run.yaml")], PretrainConfig).interpolation == "area"
    with pytest.raises(ConfigError, match="interpolation = 'cubic' must be one of area, bicubic"):
        parse_config(["--interpolation", "cubic"], FinetuneConfig)
    # --eval --finetune checkpoint-best.pth evaluates with the interpolation the checkpoint was trained with
    import torch

    torch.save({"model": {}, "args": {"interpolation": "area"}}, tmp_path / "best.pth")
    cfg = parse_config(["--eval"], FinetuneConfig)
    assert cfg.adopt_checkpoint_args(str(tmp_path / "best.pth")) == (["interpolation=area"], [])
    assert cfg.interpolation == "area"
    cfg = parse_config(["--eval", "--interpolation", "bicubic"], FinetuneConfig)  # ... unless the flag says otherwise
    assert cfg.adopt_checkpoint_args(str(tmp_path / "best.pth")) == ([], [
        f"--interpolation bicubic given: --finetune {tmp_path / 'best.pth'} was trained with interpolation area"])
    assert cfg.interpolation == "bicubic"


class _Reached(Exception):
    pass


def test_entry_points_pass_the_flag_to_the_loaders(betons, tmp_path, monkeypatch):
    """pretrain, finetune and the k-NN CLI hand --interpolation to every loader they build."""
    import torch

    import lomar_fast.data as data
    import lomar_fast.data.shard as shard
    import lomar_fast.knn as knn
    import lomar_fast.trainer as trainer
    from lomar_fast import finetune, pretrain

    monkeypatch.setattr(trainer, "init_distributed", lambda device: (0, 1, 0))
    seen = []

    def spy(name, stop):
        def fn(*a, **k):
            seen.append((name, k.get("interpolation")))
            if stop:
                raise _Reached
            return object()
        return fn

    beton = str(betons["jpg"])
    common = ["--deepspeed_config", "ds_configs/cpu.json", "--batch_size", "2", "--num_workers", "1"]
    for interp in ("bicubic", "area"):
        seen.clear()
        monkeypatch.setattr(data, "build_pretrain_loader", spy("pretrain", True))
        with pytest.raises(_Reached):
            pretrain.main(["--data_path", beton, "--model", "lomar_vit_tiny_patch16", "--input_size", "64",
                           "--window_size", "3", "--num_window", "2", "--output_dir", str(tmp_path / f"p{interp}"),
                           "--interpolation", interp, *common])
        monkeypatch.setattr(shard, "build_shard", spy("val", False))
        monkeypatch.setattr(data, "build_finetune_loader", spy("finetune", True))
        with pytest.raises(_Reached):
            finetune.main(["--data_path", beton, "--val_path", beton, "--model", "vit_tiny_patch16",
                           "--input_size", "64", "--output_dir", str(tmp_path / f"f{interp}"),
                           "--interpolation", interp, *common])
        monkeypatch.setattr(knn, "build_encoder", lambda *a, **k: torch.nn.Identity())
        monkeypatch.setattr(knn, "build_shard", spy("knn", True))
        with pytest.raises(_Reached):
            knn.main(["--checkpoint", beton, "--train", beton, "--val", beton, "--interpolation", interp,
                      "--device", "cpu"])
        assert seen == [("pretrain", interp), ("val", interp), ("finetune", interp), ("knn", interp)]


def test_resample_benchmark_times_the_tree_against_pil_and_a_revision(tmp_path):
    """benchmarks.resample: every implementation gives this tree's pixels, and each gets its time per crop and its
    ratio to this tree's (a revision from git where the tree is a checkout)."""
    import json
    from pathlib import Path

    from benchmarks import resample as bench

    root = Path(bench.__file__).resolve().parent.parent
    against = ["HEAD"] if (root / ".git").exists() else []
    out = tmp_path / "resample.json"
    assert bench.main(["--crops", "6", "--rounds", "2", "--size", "64", "--out", str(out), "--against", *against]) == 0
    res = json.loads(out.read_text())
    names = [r["implementation"] for r in res["results"]]
    assert names == ["this tree", *against, "PIL"]
    assert res["results"][0]["time_over_this_tree"] == 1.0
    assert all(r["us_per_crop"] > 0 and len(r["rounds_us"]) == 2 for r in res["results"])
    # mirrored crops: the resize that mirrors against the resize then the decoders' former flip pass (and PIL's)
    assert bench.main(["--crops", "4", "--rounds", "2", "--size", "48", "--out", str(out), "--flip"]) == 0
    res = json.loads(out.read_text())
    assert res["flip"] is True
    assert [r["implementation"] for r in res["results"]] == ["this tree", "this tree, then a flip pass", "PIL"]

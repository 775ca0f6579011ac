"""Decoding a crop's region of a JPEG through its restart markers (lomar_fast/data/jpeg_region.py), the writer that
puts the markers in (data_prep/write_beton.py) and the training-crop decoder that uses them."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from ffcv.libffcv import imdecode

from data_prep.write_beton import DataPrepError, WriteOptions, encode_jpeg, restart_interval
from lomar_fast.data import jpeg_region as jr

SAMPLINGS = {"420": (16, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420), "422": (16, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422),
             "411": (32, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411), "440": (8, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440),
             "444": (8, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), "gray": (8, None)}


def photo_like(rng, h: int, w: int) -> np.ndarray:
    """Smooth colour fields plus noise: every block holds AC coefficients, chroma varies across blocks."""
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    base = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(base + rng.integers(-24, 25, base.shape), 0, 255).astype(np.uint8)


def encode(img: np.ndarray, sampling: str, interval: int, quality: int = 90, progressive: bool = False) -> np.ndarray:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_RST_INTERVAL, interval]
    if progressive:
        params += [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    if sampling == "gray":
        return cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), params)[1].reshape(-1)
    return cv2.imencode(".jpg", img, params + [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, SAMPLINGS[sampling][1]])[1].reshape(-1)


def decode(data: np.ndarray, h: int, w: int) -> np.ndarray:
    """libjpeg-turbo through FFCV, as the loader's decoders call it."""
    out = np.empty((h, w, 3), np.uint8)
    assert imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False) == 0
    return out


def region_matches(data, whole, box, region=jr.jpeg_region) -> bool | None:
    """Whether the region JPEG of ``box`` (top, bottom, left, right) decodes to ``whole``'s pixels over the box
    (None: no region JPEG for it)."""
    t, b, l, r = box
    out = np.full(data.size + 2, 0xAB, np.uint8)
    size, y0, x0, rh, rw = region(data, t, b, l, r, out)
    if size == 0:
        return None
    assert 0 <= y0 <= t and 0 <= x0 <= l and b <= y0 + rh <= whole.shape[0] and r <= x0 + rw <= whole.shape[1]
    assert size <= data.size  # the region's JPEG is never longer than the image's
    got = decode(out[:size], int(rh), int(rw))
    return bool(np.array_equal(got[t - y0:b - y0, l - x0:r - x0], whole[t:b, l:r]))


def random_box(rng, h: int, w: int) -> tuple[int, int, int, int]:
    ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    t, l = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return t, t + ch, l, l + cw


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_the_region_jpeg_decodes_to_the_images_pixels(sampling):
    """Odd sizes, every chroma sampling libjpeg writes (MCUs 8 to 32 pixels wide), restart intervals of a few
    MCUs, of one MCU and of whole rows (2 rows, and longer than the image), crops anywhere including the image's
    edges and single pixels: wherever a region JPEG is made it decodes to the whole image's pixels over the crop."""
    rng = np.random.default_rng(list(SAMPLINGS).index(sampling))
    mcu_w = SAMPLINGS[sampling][0]
    made = 0
    for trial in range(24):
        h, w = int(rng.integers(1, 260)), int(rng.integers(1, 260))
        mcus_x = -(-w // mcu_w)
        interval = [restart_interval(w, mcu_width=mcu_w), 1, 2 * mcus_x, mcus_x][trial % 4]
        data = encode(photo_like(rng, h, w), sampling, interval, quality=int(rng.integers(40, 100)))
        whole = decode(data, h, w)
        boxes = [random_box(rng, h, w) for _ in range(8)] + [(0, 1, 0, 1), (h - 1, h, w - 1, w), (0, h, 0, 1)]
        for box in boxes:
            ok = region_matches(data, whole, box)
            assert ok is not False, (sampling, h, w, interval, box)
            made += ok is not None
    assert made >= 100, made  # most crops got a region JPEG


def test_the_margin_around_the_crop_is_what_keeps_the_pixels(monkeypatch):
    """Without the margin the chroma upsampling at the region's edges differs from the whole image's (the check
    above can fail); with one pixel it does not."""
    rng = np.random.default_rng(5)
    img = photo_like(rng, 96, 160)
    data = encode(img, "420", restart_interval(160))
    whole = decode(data, 96, 160)
    assert restart_interval(160) == 5  # segments 80 pixels wide, 16 high: boxes with edges on their edges
    boxes = [(16, 40, 80, 130), (20, 48, 10, 80), (16, 48, 80, 160), (0, 32, 0, 80), (32, 96, 5, 80)]

    def region(data, t, b, l, r, out):  # uncompiled: reads MARGIN when called
        return jr.region_into.py_func(jr._readonly(data), t, b, l, r, out.reshape(1, -1), 0)
    monkeypatch.setattr(jr, "MARGIN", 0)
    assert not all(region_matches(data, whole, box, region) for box in boxes)
    monkeypatch.setattr(jr, "MARGIN", 1)
    assert all(region_matches(data, whole, box, region) for box in boxes)


def test_jpegs_without_usable_restart_markers_are_decoded_whole():
    """0 (decode the whole image) for: no restart markers, progressive, an interval that does not tile the rows,
    a crop whose region is the whole image, a truncated or corrupt file, too small an output buffer."""
    rng = np.random.default_rng(2)
    img = photo_like(rng, 100, 112)  # 7 MCUs per row at 4:2:0
    out = np.empty(1 << 20, np.uint8)
    box = (10, 40, 20, 50)
    good = encode(img, "420", 7)
    assert jr.jpeg_region(good, *box, out)[0] > 0
    cases = {
        "no markers": encode(img, "420", 0),
        "progressive": encode(img, "420", 7, progressive=True),
        "interval 3 of 7 MCUs": encode(img, "420", 3),
        "truncated": good[:good.size // 2],
        "not a JPEG": rng.integers(0, 256, 4000, dtype=np.uint8),
        "empty": np.zeros(0, np.uint8),
    }
    for name, data in cases.items():
        assert jr.jpeg_region(data, *box, out)[0] == 0, name
    assert jr.jpeg_region(good, 0, 100, 0, 112, out)[0] == 0  # the whole image
    assert jr.jpeg_region(good, *box, np.empty(good.size + 1, np.uint8))[0] == 0  # out too small
    corrupt = good.copy()
    corrupt[corrupt.size - 200:corrupt.size - 2] = 0xFF  # markers where the last segments' data was
    corrupt[corrupt.size - 199] = 0xC4
    assert jr.jpeg_region(corrupt, 80, 100, 0, 112, out)[0] == 0


def test_the_writer_puts_markers_that_tile_the_rows_and_keeps_the_pixels():
    assert [restart_interval(w) for w in (16, 48, 64, 224, 500, 512, 1000, 272)] == [1, 3, 4, 2, 4, 4, 3, 17]
    rng = np.random.default_rng(4)
    for h, w in ((375, 500), (33, 47), (500, 272)):
        img = photo_like(rng, h, w)
        plain, marked = encode_jpeg(img, 90, restart_mcus=0), encode_jpeg(img, 90)
        np.testing.assert_array_equal(decode(plain, h, w), decode(marked, h, w))
        assert jr.jpeg_layout(plain)[0] == -1 and jr.jpeg_layout(marked)[6] == restart_interval(w)
        assert region_matches(marked, decode(plain, h, w), (h // 4, h // 2, w // 3, w // 2)) is True
    with pytest.raises(DataPrepError, match="--restart-mcus must be in 0..64"):
        WriteOptions(restart_mcus=65).validate()


def test_the_training_crop_decodes_regions_to_the_same_batches(tmp_path, monkeypatch):
    """A .beton written with restart markers (the default) and one without give the training loader the same
    batches, and so does the marked one with region decoding off (LOMAR_REGION_DECODE=0); the marked one is
    decoded by regions. A bad switch value is one error naming it."""
    from PIL import Image

    from data_prep.write_beton import write_dataset
    from lomar_fast.data import build_pretrain_loader

    rng = np.random.default_rng(6)
    for k in range(12):
        d = tmp_path / "src" / "train" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, int(rng.integers(150, 300)), int(rng.integers(150, 300)))).save(d / f"{k}.png")
    from data_prep import write_beton

    write_dataset(tmp_path / "src", tmp_path / "marked", ("train",), WriteOptions(workers=1, progress=False))
    assert write_beton.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "plain"), "--splits", "train",
                             "--quiet", "--workers", "1", "--restart-mcus", "0"]) == 0
    betons = {name: tmp_path / name / "train.beton" for name in ("marked", "plain")}
    batches, decoders = {}, {}
    for name, beton, region in (("marked", "marked", "1"), ("plain", "plain", "1"), ("off", "marked", "0")):
        monkeypatch.setenv("LOMAR_REGION_DECODE", region)
        # one decode thread: its loop compiles in a third of the parallel one's time; tests/test_interpolation.py
        # runs region decodes on two threads
        loader = build_pretrain_loader(betons[beton], batch_size=12, input_size=64, num_workers=1, seed=3,
                                       order="sequential")
        decoders[name] = loader.seeded_ops[0]
        assert decoders[name].region_decode == (region == "1")
        batches[name] = np.concatenate([np.asarray(b) for b in loader])
    np.testing.assert_array_equal(batches["marked"], batches["plain"])
    np.testing.assert_array_equal(batches["marked"], batches["off"])
    assert decoders["plain"].region_decodes == 0 and decoders["off"].region_decodes == 0
    assert decoders["marked"].region_decodes >= 6, decoders["marked"].region_decodes  # scale 0.2-1 crops
    monkeypatch.setenv("LOMAR_REGION_DECODE", "yes")
    with pytest.raises(ValueError, match="LOMAR_REGION_DECODE='yes' must be 1"):
        build_pretrain_loader(betons["marked"], batch_size=12, input_size=64, num_workers=1)


@pytest.mark.parametrize("interpolation", ["bicubic", "area"])
def test_the_evaluation_crop_decodes_regions_to_the_same_batches(tmp_path, monkeypatch, interpolation):
    """The evaluation loader's center crop decodes JPEGs with restart markers by region too: the crop's segments
    and, for the bicubic resize, the pixels its filter reads around the box. The batches equal those of the same
    .beton decoded whole and of one written without markers."""
    from PIL import Image

    from data_prep import write_beton
    from data_prep.write_beton import write_dataset
    from lomar_fast.data import build_val_loader

    rng = np.random.default_rng(7)
    for k in range(10):  # wide and tall images: the center crop leaves out much of the long side
        d = tmp_path / "src" / "val" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        short, long = int(rng.integers(120, 200)), int(rng.integers(300, 420))
        hw = (short, long) if k % 3 else (long, short)
        Image.fromarray(photo_like(rng, *hw)).save(d / f"{k}.png")
    write_dataset(tmp_path / "src", tmp_path / "marked", ("val",), WriteOptions(workers=1, progress=False))
    assert write_beton.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "plain"), "--splits", "val",
                             "--quiet", "--workers", "1", "--restart-mcus", "0"]) == 0
    batches, decoders = {}, {}
    for name, beton, region in (("marked", "marked", "1"), ("plain", "plain", "1"), ("off", "marked", "0")):
        monkeypatch.setenv("LOMAR_REGION_DECODE", region)
        loader = build_val_loader(tmp_path / beton / "val.beton", batch_size=5, input_size=64, num_workers=1,
                                  interpolation=interpolation)
        decoders[name] = loader.decoders[0]
        assert decoders[name].region_decode == (region == "1")
        batches[name] = np.concatenate([np.asarray(images) for images, _ in loader])
    assert batches["marked"].shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(batches["marked"], batches["plain"])
    np.testing.assert_array_equal(batches["marked"], batches["off"])
    assert decoders["plain"].region_decodes == 0 and decoders["off"].region_decodes == 0
    assert decoders["marked"].region_decodes >= 5, decoders["marked"].region_decodes

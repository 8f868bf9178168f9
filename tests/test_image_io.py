"""Images are read the way viewers show them (EXIF orientation, 16-bit, palette / alpha / CMYK / I / F modes,
first frame of an animation), or refused with a one-line reason; arrays are never converted by guesswork."""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from maskdino_lrp.model.image import ImageError, apply_orientation, read_image
from maskdino_lrp.model.maskdino import read_image as read_image_reexported

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)


def _png16(path: Path, array: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): color type 0 grey, 2 RGB, 4 grey+alpha,
    6 RGBA."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _scaled(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_the_model_module_reads_with_the_same_reader():
    assert read_image_reexported is read_image


# ----------------------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_viewers(tmp_path, orientation):
    img = Image.fromarray(RGB)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    img.save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    got = read_image(path)
    np.testing.assert_array_equal(got, expected)
    assert got.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))
    np.testing.assert_array_equal(apply_orientation(RGB, orientation), expected)


def test_sideways_jpeg_photo_is_explained_upright(tmp_path):
    """A phone photo stored landscape with orientation 6 (rotate 90° clockwise) is shown portrait."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red as stored → top half red as shown
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    img.save(path, exif=exif, quality=95)
    got = read_image(path)
    assert got.shape == (80, 40, 3)
    assert got[:30, :, 0].mean() > 200 and got[50:, :, 0].mean() < 50
    # a PIL image given directly is shown the same way
    with Image.open(path) as pil:
        np.testing.assert_array_equal(read_image(pil), got)


def test_broken_orientation_value_is_ignored_with_a_warning(tmp_path, caplog):
    img = Image.fromarray(RGB)
    exif = img.getexif()
    exif[0x0112] = 42
    path = tmp_path / "odd.png"
    img.save(path, exif=exif)
    with caplog.at_level(logging.WARNING, logger="maskdino_lrp"):
        np.testing.assert_array_equal(read_image(path), RGB)
    assert "EXIF orientation 42" in caplog.text


# ----------------------------------------------------------------------------- 16 bits
def test_16bit_grey_png_is_scaled_not_white(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (2, 4, 3)
    np.testing.assert_array_equal(got[..., 0], _scaled(values))
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    assert got.mean() < 200  # the old reader clipped to 255: all white


def test_dark_16bit_png_stays_dark(tmp_path):
    values = np.full((8, 8), 2000, np.uint16)  # 3 % grey: would be white when clipped, black when truncated
    path = _png16(tmp_path / "dark.png", values, 0)
    assert int(read_image(path)[0, 0, 0]) == round(2000 * 255 / 65535)


def test_16bit_rgb_and_rgba_png(tmp_path):
    rgb16 = RNG.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    got = read_image(_png16(tmp_path / "rgb16.png", rgb16, 2))
    assert np.abs(got.astype(int) - _scaled(rgb16)).max() <= 1  # Pillow keeps the high byte
    rgba16 = np.concatenate([rgb16, np.full((5, 7, 1), 65535, np.uint16)], axis=-1)
    got = read_image(_png16(tmp_path / "rgba16.png", rgba16, 6))
    assert np.abs(got.astype(int) - _scaled(rgb16)).max() <= 1


def test_16bit_pgm_and_tiff(tmp_path):
    values = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    pgm = tmp_path / "g.pgm"
    pgm.write_bytes(b"P5\n5 4\n65535\n" + values.astype(">u2").tobytes())
    np.testing.assert_array_equal(read_image(pgm)[..., 0], _scaled(values))
    tif = tmp_path / "g.tif"
    Image.fromarray(values).save(tif)
    np.testing.assert_array_equal(read_image(tif)[..., 0], _scaled(values))


# ----------------------------------------------------------------------------- other modes
def test_palette_grey_bilevel_cmyk_ycbcr_become_rgb(tmp_path):
    base = Image.fromarray(RGB)
    for mode in ("P", "L", "1", "CMYK"):
        path = tmp_path / f"m_{mode}.tif"
        base.convert(mode).save(path)
        expected = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(read_image(path), expected)
    got = read_image(base.convert("YCbCr"))
    assert np.abs(got.astype(int) - RGB.astype(int)).max() <= 3


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel; a half-transparent one; the rest fully transparent
    rgba[0, 1, 3] = 128
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = read_image(path)
    assert tuple(got[0, 0]) == (200, 0, 0)
    assert tuple(got[1, 1]) == (255, 255, 255)
    assert tuple(got[0, 1]) == tuple((np.array([200, 0, 0]) * 128 + 255 * 127 + 127) // 255)
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    assert tuple(read_image(la)[1, 1]) == (255, 255, 255)
    # palette with a transparent index
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    ppath = tmp_path / "pal.png"
    pal.save(ppath, transparency=0)
    got = read_image(ppath)
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (10, 20, 30)


def test_opaque_rgba_keeps_its_pixels():
    rgba = np.concatenate([RGB, np.full((6, 10, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(read_image(Image.fromarray(rgba, "RGBA")), RGB)


def test_int32_and_float_images(tmp_path):
    eight = RNG.integers(0, 256, (4, 5)).astype(np.int32)
    path = tmp_path / "i8.tif"
    Image.fromarray(eight).save(path)
    np.testing.assert_array_equal(read_image(path)[..., 0], eight.astype(np.uint8))
    unit = RNG.random((4, 5)).astype(np.float32)
    path = tmp_path / "f01.tif"
    Image.fromarray(unit).save(path)
    np.testing.assert_array_equal(read_image(path)[..., 0], np.round(unit * 255).astype(np.uint8))
    byte_range = (unit * 255).astype(np.float32)
    np.testing.assert_array_equal(read_image(Image.fromarray(byte_range))[..., 0],
                                  np.round(byte_range).astype(np.uint8))


@pytest.mark.parametrize("array,message", [
    (np.array([[0, 70000]], np.int32), r"32-bit integer image with values in \[0, 70000\]"),
    (np.array([[-5, 10]], np.int32), "32-bit integer image"),
    (np.array([[0.0, 300.0]], np.float32), "float image with values in"),
    (np.array([[-0.5, 0.5]], np.float32), "float image with values in"),
    (np.array([[np.nan, 0.5]], np.float32), "NaN or Inf"),
])
def test_images_without_a_faithful_8bit_reading_are_refused(tmp_path, array, message):
    path = tmp_path / "x.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(ImageError, match=message) as info:
        read_image(path)
    assert "\n" not in str(info.value) and "x.tif" in str(info.value)


def test_animated_gif_gives_the_first_frame_and_says_so(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(path).n_frames == 3
    with caplog.at_level(logging.DEBUG, logger="maskdino_lrp"):
        got = read_image(path)
    assert got[..., 0].mean() > 200 and got[..., 1].mean() < 50
    assert "3 frames; using the first" in caplog.text
    apng = tmp_path / "anim.png"
    frames[1].save(apng, save_all=True, append_images=[frames[2]])
    assert read_image(apng)[..., 1].mean() > 200


@pytest.mark.parametrize("content,message", [
    (b"not an image at all", "cannot read image"),
    (None, "cannot read image"),  # a truncated PNG
])
def test_unreadable_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is None:
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        read_image(path)
    assert "\n" not in str(info.value) and "bad.png" in str(info.value)


def test_arrays_are_never_converted_by_guesswork():
    with pytest.raises(ImageError, match="uint16"):
        read_image(np.zeros((8, 8, 3), np.uint16))
    np.testing.assert_array_equal(read_image(torch.from_numpy(RGB)), RGB)
    np.testing.assert_array_equal(read_image(RGB, "BGR"), RGB[..., ::-1])
    with pytest.raises(ImageError, match="channel_order"):
        read_image(RGB, "RGBA")


def test_predict_sees_the_upright_photo(tmp_path):
    from maskdino_lrp import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    stored = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 8
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    det = model.predict(path)
    assert det.image_size == (96, 64) and det.masks.shape[1:] == (96, 64)
    upright = np.ascontiguousarray(np.rot90(stored))
    assert torch.equal(det.scores, model.predict(upright).scores)

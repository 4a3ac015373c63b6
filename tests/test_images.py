"""ldmcli.images: every PIL mode converts to the RGB a viewer shows (16-bit scaled, never clipped), or is refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmcli.errors import LdmError
from ldmcli.images import ImageReadError, read_mask, read_rgb


def _png(path: Path, array: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): ``color_type`` 0 grey, 2 RGB, 6 RGBA."""
    h, w = array.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    big = array.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in big)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[200, 1000, 60000, 65535]], np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = read_rgb(path)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [1, 4, 233, 255]  # PIL's convert("RGB") gives [200, 255, 255, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()
    mask = read_mask(path)
    assert mask.dtype == np.float32 and mask[0, 0] == pytest.approx(200 / 65535) and mask[0, 3] == 1.0


def test_16_bit_grey_by_hand_and_16_bit_rgb_png(tmp_path):
    grey = _png(tmp_path / "g.png", np.array([[200, 60000]]), 0)
    assert read_rgb(grey)[0, :, 1].tolist() == [1, 233]
    rgb16 = _png(tmp_path / "rgb16.png", np.array([[[1000, 30000, 60000], [65535, 0, 257]]]), 2)
    out = read_rgb(rgb16)
    assert np.abs(out.astype(int) - np.array([[[4, 117, 233], [255, 0, 1]]])).max() <= 1
    rgba16 = _png(tmp_path / "rgba16.png", np.array([[[0, 0, 0, 0], [0, 0, 0, 65535]]]), 6)
    assert read_rgb(rgba16).tolist() == [[[255, 255, 255], [0, 0, 0]]]  # transparent black is white


def test_32_bit_integer_and_float(tmp_path):
    i32 = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 32768, 65535]], np.int32), mode="I").save(i32)
    assert Image.open(i32).mode == "I"
    assert read_rgb(i32)[0, :, 0].tolist() == [0, 128, 255]
    big = tmp_path / "big.tif"
    Image.fromarray(np.array([[0, 70000]], np.int32), mode="I").save(big)
    with pytest.raises(ImageReadError, match=r"big\.tif.*outside 0\.\.65535"):
        read_rgb(big)
    f = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F").save(f)
    assert read_rgb(f)[0, :, 0].tolist() == [0, 128, 255]
    assert read_mask(f).tolist() == [[0.0, 0.5, 1.0]]
    hot = tmp_path / "hot.tif"
    Image.fromarray(np.array([[0.0, 3.0]], np.float32), mode="F").save(hot)
    with pytest.raises(ImageReadError, match=r"hot\.tif.*outside \[0, 1\]"):
        read_mask(hot)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red
    rgba[0, 1] = (255, 0, 0, 0)        # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)        # half black over white: grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert read_rgb(tmp_path / "rgba.png").tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]]
    la = np.array([[[0, 255], [0, 0]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert read_rgb(tmp_path / "la.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert read_mask(tmp_path / "la.png").tolist() == [[0.0, 1.0]]


def test_palette_with_and_without_transparency_and_cmyk(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    assert read_rgb(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]
    p.save(tmp_path / "pt.png", transparency=0)
    assert read_rgb(tmp_path / "pt.png").tolist() == [[[255, 255, 255], [200, 100, 50]]]
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = read_rgb(tmp_path / "c.jpg")[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 100%, 100%, 0) is red
    Image.new("1", (2, 1), 1).save(tmp_path / "bw.png")
    assert read_rgb(tmp_path / "bw.png").tolist() == [[[255] * 3] * 2]
    Image.new("L", (1, 1), 51).save(tmp_path / "l.png")
    assert read_mask(tmp_path / "l.png").tolist() == [[pytest.approx(0.2)]]


def test_unreadable_and_unsupported_are_one_line_errors(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"junk\.png") as e:
        read_rgb(tmp_path / "junk.png")
    assert isinstance(e.value, LdmError) and "\n" not in str(e.value)
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_rgb(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_rgb(tmp_path / "missing.png")
    Image.new("LAB", (1, 1)).save(tmp_path / "lab.tif")
    with pytest.raises(ImageReadError, match=r"lab\.tif.*mode LAB"):
        read_rgb(tmp_path / "lab.tif")

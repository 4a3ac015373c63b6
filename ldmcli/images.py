"""Reading images the way a person expects to see them, whatever their pixel format.

PIL opens files in many modes, and ``Image.convert("RGB")`` is wrong for several of them: it clips 16-bit
greyscale (``I;16``, ``I``) to 0..255 instead of scaling it (a 16-bit black of 200/65535 turns white), and it drops
transparency onto black. :func:`read_rgb` and :func:`read_mask` convert every mode explicitly:

* 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``HSV``) through PIL's own conversions;
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer ``I`` as 0..65535, scaled
  (``v / 257``, rounded) to 0..255; ``I`` values outside 0..65535 are refused;
* 32-bit float ``F`` as 0..1 (``v * 255``, rounded); values outside [0, 1] or not finite are refused;
* 16-bit RGB(A) PNGs: PIL already keeps the high byte of each sample, which is the same scaling;
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or greyscale images with a
  transparent colour) is composited over white, as an image viewer shows it.

Anything else (``LAB``, an unreadable or truncated file) is refused with :class:`ImageReadError`, one line naming
the file. Nothing here clips or guesses silently.
"""

from __future__ import annotations

import os
import numpy as np
from PIL import Image, UnidentifiedImageError

from ldmcli.errors import LdmError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_VIA_RGB = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV", "RGBX")


class ImageReadError(LdmError):
    """An image file that cannot be read, or whose pixel format cannot be converted faithfully."""


def _fail(path: str | os.PathLike, why: str) -> ImageReadError:
    return ImageReadError(f"cannot read image {os.fspath(path)}: {why}")


def _high_depth(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """``I;16*``, ``I`` or ``F`` pixels as float64 in [0, 1]."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise _fail(path, "32-bit float pixels that are NaN or infinite")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise _fail(path, f"32-bit float pixels outside [0, 1] (range {arr.min():g}..{arr.max():g}); "
                              "save it as 8- or 16-bit")
        return arr
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise _fail(path, f"32-bit integer pixels outside 0..65535 (range {arr.min()}..{arr.max()}); "
                          "save it as 8- or 16-bit")
    return arr / 65535.0


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """``h w 4`` uint8 (straight alpha) → ``h w 3`` uint8 composited over white."""
    rgb = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    return np.clip(np.rint(rgb * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "it is a folder") from None
    except UnidentifiedImageError:
        raise _fail(path, "not an image file PIL can identify") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated data, bad chunks, decompression bombs
        raise _fail(path, f"{type(e).__name__}: {e}".strip()) from None
    except Image.DecompressionBombError as e:
        raise _fail(path, str(e)) from None
    return im


def image_to_rgb(im: Image.Image, path: str | os.PathLike = "<image>") -> np.ndarray:
    """An opened PIL image → ``h w 3`` uint8 RGB, with the conversions described in the module docstring."""
    mode = im.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _to_uint8(_high_depth(im, path))
        return np.repeat(grey[..., None], 3, axis=2)
    has_transparency = "transparency" in im.info and mode in ("P", "L", "RGB", "1")
    if mode in _ALPHA_MODES or has_transparency:
        try:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        except (ValueError, OSError) as e:
            raise _fail(path, f"cannot convert mode {mode} with transparency: {e}") from None
        return _over_white(rgba)
    if mode in _VIA_RGB:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise _fail(path, f"unsupported pixel format (PIL mode {mode}); save it as 8- or 16-bit RGB or greyscale")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as an ``h w 3`` uint8 RGB array (first frame of animations).

    16-bit and float images are scaled, never clipped; transparency is composited over white. Raises
    :class:`ImageReadError` (one line naming the file) for unreadable files and formats it cannot convert."""
    im = _open(path)
    try:
        return image_to_rgb(im, path)
    finally:
        im.close()


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as an ``h w`` float32 array in [0, 1] (1 = white).

    Greyscale keeps its full precision (16-bit: ``v / 65535``; float: as stored, which must lie in [0, 1]); colour
    images become luminance (ITU-R 601-2, as PIL's ``L``) after transparency is composited over white."""
    im = _open(path)
    try:
        if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
            return _high_depth(im, path).astype(np.float32)
        if im.mode == "L" and "transparency" not in im.info:
            return np.asarray(im, dtype=np.float32) / 255.0
        rgb = image_to_rgb(im, path).astype(np.float64)
    finally:
        im.close()
    lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(lum / 255.0, 0.0, 1.0).astype(np.float32)


def supported_mode(mode: str) -> bool:
    """Whether :func:`image_to_rgb` converts PIL mode ``mode`` (known from the file header, before decoding)."""
    return mode in SIXTEEN_BIT_MODES or mode in ("I", "F") or mode in _ALPHA_MODES or mode in _VIA_RGB

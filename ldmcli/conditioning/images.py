"""Opening user images with one-line errors (shared by the conditioning readers)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ldmcli.errors import UsageError


def open_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image at ``path`` (any PIL mode); a missing, unreadable or non-image file is a UsageError."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an image")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable image ({e})"
        raise UsageError(f"{path}: {reason}") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the header only (cheap checks before a model loads); errors as :func:`open_image`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "not an image" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable image ({e})"
        raise UsageError(f"{path}: {reason}") from None

"""Example image/mask pairs for inpainting (Rombach et al. 2022, Sec. 4.5), available offline.

The images are scikit-learn's two sample photographs (``sklearn.datasets.load_sample_images``: china, flower),
downscaled and shipped as package data (``ldmcli/assets/inpaint``, with their CC-BY 2.0 attribution); the masks are
drawn here from shapes given in relative coordinates, so they fit any size. White (255) marks the region to fill,
as upstream's ``scripts/inpaint.py`` expects.

* ``china``  (384x256, a multiple of inpainting_big's factor 32): the island in the lake is removed (a rectangle).
* ``flower`` (300x200, not a multiple: exercises padding): the small flower at the bottom is removed (an ellipse).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ldmcli.errors import UsageError
from ldmcli.fileio import atomic_path

MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Shape:
    """A mask shape in relative coordinates (fractions of width and height): a box or the ellipse inscribed in it."""

    kind: str  # "box" or "ellipse"
    left: float
    top: float
    right: float
    bottom: float


EXAMPLES: dict[str, tuple[Shape, ...]] = {
    "china": (Shape("box", 0.63, 0.49, 0.81, 0.60),),
    "flower": (Shape("ellipse", 0.42, 0.83, 0.74, 1.08),),
}


@dataclass(frozen=True)
class ExamplePair:
    """One example: its name, the image (``[h, w, 3]`` uint8) and the mask (``[h, w]`` uint8, 255 = fill)."""

    name: str
    image: np.ndarray
    mask: np.ndarray


def draw_mask(shapes: tuple[Shape, ...], width: int, height: int) -> np.ndarray:
    """Rasterise ``shapes`` into an ``[height, width]`` uint8 mask (255 inside, 0 outside), pixel centres sampled."""
    ys = (np.arange(height, dtype=np.float64) + 0.5) / height
    xs = (np.arange(width, dtype=np.float64) + 0.5) / width
    y, x = np.meshgrid(ys, xs, indexing="ij")
    inside = np.zeros((height, width), dtype=bool)
    for s in shapes:
        if s.kind == "box":
            inside |= (x >= s.left) & (x < s.right) & (y >= s.top) & (y < s.bottom)
        elif s.kind == "ellipse":
            cx, cy = (s.left + s.right) / 2, (s.top + s.bottom) / 2
            rx, ry = (s.right - s.left) / 2, (s.bottom - s.top) / 2
            inside |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
        else:
            raise ValueError(f"unknown mask shape {s.kind!r}")
    return np.where(inside, 255, 0).astype(np.uint8)


def _asset(name: str) -> Image.Image:
    with resources.files("ldmcli").joinpath("assets", "inpaint", f"{name}.png").open("rb") as f:
        image = Image.open(f)
        image.load()
    return image.convert("RGB")


def example_pairs(max_side: int | None = None) -> list[ExamplePair]:
    """The example pairs; ``max_side`` downscales each image (LANCZOS) so its longer side is at most that many
    pixels (tests use tiny, odd sizes), the masks are drawn at the final size."""
    if max_side is not None and max_side < 8:
        raise UsageError(f"example images need a size of at least 8 pixels, got {max_side}")
    pairs = []
    for name, shapes in EXAMPLES.items():
        image = _asset(name)
        if max_side is not None and max(image.size) > max_side:
            scale = max_side / max(image.size)
            size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
            image = image.resize(size, Image.LANCZOS)
        mask = draw_mask(shapes, image.width, image.height)
        pairs.append(ExamplePair(name, np.asarray(image, dtype=np.uint8).copy(), mask))
    return pairs


def write_examples(folder: str | os.PathLike, *, max_side: int | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``NAME.png`` and ``NAME_mask.png`` for every example into ``folder`` (created if needed), ready for
    ``ldm inpaint --indir folder``. Existing files are kept unless ``overwrite``. Returns the paths written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for pair in example_pairs(max_side):
        for path, array in ((folder / f"{pair.name}.png", pair.image),
                            (folder / f"{pair.name}{MASK_SUFFIX}.png", pair.mask)):
            if path.exists() and not overwrite:
                continue
            with atomic_path(path) as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
            written.append(path)
    return written

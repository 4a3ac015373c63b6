"""COCO-Stuff label maps for ``semantic_synthesis256`` / ``semantic_synthesis512`` (landscapes, map -> image).

The models were trained on taming-transformers' ``SegmentationBase`` (S-FLCKR): a mode-L PNG of class ids 0..181,
used as they are (no shift: 0 is "person", 181 is "wood"; the ids are COCO-Stuff's official label ids minus one,
including the 11 thing ids COCO never annotated, such as 11 "street sign"), one-hot to 182 channels
(``np.eye(182)[ids]``, then channels first, float32). The conditioner (``SpatialRescaler``: two bilinear halvings and
a learned 1x1 map 182 -> 3) is part of the model.

A map is read from

* a label-id PNG (mode ``L``, ``P`` or 16-bit): each pixel value (for ``P``, the palette *index*) is the class id;
* an RGB(A) PNG painted with the shipped palette (``ldmcli/assets/semantic/cocostuff182.tsv``): colours must match
  exactly (paint without antialiasing). The colour of id ``i`` is the PASCAL VOC colour map entry ``i``: bit ``k`` of
  ``i`` goes to bit ``7 - k // 3`` of red, green or blue for ``k % 3`` = 0, 1, 2 (all 182 colours differ).

Resizing is nearest-neighbour only (pixel centres: source index ``floor((i + 0.5) * in / out)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldmcli.conditioning.images import open_image
from ldmcli.errors import UsageError
from ldmcli.fileio import atomic_path

N_CLASSES = 182


@dataclass(frozen=True)
class StuffClass:
    id: int
    name: str
    rgb: tuple[int, int, int]

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.rgb)


def voc_colour(i: int) -> tuple[int, int, int]:
    """The PASCAL VOC colour map entry ``i`` (the palette's rule)."""
    r = g = b = 0
    for j in range(8):
        r |= ((i >> 0) & 1) << (7 - j)
        g |= ((i >> 1) & 1) << (7 - j)
        b |= ((i >> 2) & 1) << (7 - j)
        i >>= 3
    return r, g, b


@lru_cache(maxsize=1)
def list_classes() -> tuple[StuffClass, ...]:
    """The 182 classes in id order, with their palette colours (from the shipped table)."""
    text = resources.files("ldmcli").joinpath("assets/semantic/cocostuff182.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    classes = tuple(StuffClass(int(i), name, (int(r), int(g), int(b))) for i, name, r, g, b in rows)
    if [c.id for c in classes] != list(range(N_CLASSES)):
        raise RuntimeError("the shipped COCO-Stuff class table is damaged")
    return classes


def palette() -> np.ndarray:
    """``[182, 3]`` uint8: the colour of each id."""
    return np.array([c.rgb for c in list_classes()], dtype=np.uint8)


def _check_ids(ids: np.ndarray, where: str) -> None:
    bad = ids >= N_CLASSES
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0])
        value = int(ids[y, x])
        hint = " (255 is COCO-Stuff's 'unlabeled', which these models have no class for)" if value == 255 else ""
        raise UsageError(f"{where}: pixel (x={x}, y={y}) has class id {value}; COCO-Stuff ids are 0..181{hint}")


def labels_from_rgb(rgb: np.ndarray, where: str = "label map") -> np.ndarray:
    """Class ids ``[h, w]`` (uint8) of an ``[h, w, 3]`` uint8 image painted with the palette; a colour that is not a
    palette colour is a UsageError naming the first such pixel, its colour and the nearest palette class."""
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    pal = palette().astype(np.int64)
    pal_keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(pal_keys)
    sorted_keys = pal_keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, keys), 0, N_CLASSES - 1)
    found = sorted_keys[pos] == keys
    if not found.all():
        y, x = (int(v) for v in np.argwhere(~found)[0])
        colour = tuple(int(v) for v in rgb[y, x])
        nearest = list_classes()[int(np.argmin(((pal - np.array(colour)) ** 2).sum(1)))]
        count = int((~found).sum())
        raise UsageError(
            f"{where}: pixel (x={x}, y={y}) has colour #{colour[0]:02x}{colour[1]:02x}{colour[2]:02x} "
            f"{colour}, not a palette colour ({count} such pixels; nearest class: {nearest.id} {nearest.name!r} "
            f"{nearest.hex}); paint with exact palette colours and no antialiasing"
        )
    return order[pos].astype(np.uint8)


def labels_from_image(image: Image.Image, where: str = "label map") -> np.ndarray:
    """Class ids ``[h, w]`` uint8 from a decoded image (see the module docstring for the accepted forms)."""
    mode = image.mode
    if mode in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        ids = np.asarray(image).astype(np.int64)
        if (ids < 0).any():
            raise UsageError(f"{where}: negative class ids")
        _check_ids(ids, where)
        return ids.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        arr = np.asarray(image)
        if mode == "RGBA":
            if (arr[..., 3] < 255).any():
                y, x = (int(v) for v in np.argwhere(arr[..., 3] < 255)[0])
                raise UsageError(f"{where}: pixel (x={x}, y={y}) is transparent; a label map must be opaque")
            arr = arr[..., :3]
        return labels_from_rgb(np.ascontiguousarray(arr), where)
    raise UsageError(f"{where}: a {mode} image is not a label map (use a greyscale/indexed PNG of class ids or an "
                     "RGB PNG painted with the palette)")


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """The class ids ``[h, w]`` uint8 of the label map at ``path``; every error is a one-line UsageError."""
    return labels_from_image(open_image(path), str(path))


def resize_labels(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``height x width`` (pixel-centre sampling)."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize a label map to {width}x{height}")
    h, w = ids.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return ids[rows[:, None], cols[None, :]]


def one_hot(ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[1, 182, h, w]`` float32 one-hot of a ``[h, w]`` map (or ``[b, 182, h, w]`` of ``[b, h, w]``), as
    ``SegmentationBase`` builds it (``np.eye(182)[ids]``, channels moved first)."""
    ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if ids.dim() == 2:
        ids = ids.unsqueeze(0)
    if ids.numel() and (ids.min() < 0 or ids.max() >= N_CLASSES):
        raise ValueError(f"class ids must be in 0..{N_CLASSES - 1}")
    return torch.nn.functional.one_hot(ids, N_CLASSES).permute(0, 3, 1, 2).contiguous().float()


def colorize(ids: np.ndarray) -> np.ndarray:
    """``[h, w, 3]`` uint8: the palette colour of every pixel (the inverse of :func:`labels_from_rgb`)."""
    return palette()[np.asarray(ids, dtype=np.int64)]


def legend_image(ids: np.ndarray | None = None, *, columns: int | None = None) -> Image.Image:
    """A legend: a swatch and ``id name #rrggbb`` per class (only the classes present in ``ids`` when given)."""
    classes = list(list_classes())
    if ids is not None:
        present = set(np.unique(np.asarray(ids)).tolist())
        classes = [c for c in classes if c.id in present]
    font = ImageFont.load_default()
    row_h, swatch, col_w = 16, 12, 210
    columns = columns or (1 if len(classes) <= 24 else 4)
    rows = max(1, -(-len(classes) // columns))
    image = Image.new("RGB", (columns * col_w + 8, rows * row_h + 8), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for n, c in enumerate(classes):
        x, y = 4 + (n // rows) * col_w, 4 + (n % rows) * row_h
        draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=c.rgb, outline=(0, 0, 0))
        draw.text((x + swatch + 4, y + 1), f"{c.id:3d} {c.name} {c.hex}", fill=(0, 0, 0), font=font)
    return image


def legend_png(path: str | os.PathLike, ids: np.ndarray | None = None) -> Path:
    """Write :func:`legend_image` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        legend_image(ids).save(tmp, format="PNG")
    return Path(path)


def write_label_map(path: str | os.PathLike, ids: np.ndarray, *, painted: bool = False) -> Path:
    """Write ``ids`` as a mode-L label-id PNG, or (``painted``) as an RGB PNG in palette colours, atomically."""
    ids = np.asarray(ids)
    _check_ids(ids.astype(np.int64), str(path))
    image = Image.fromarray(colorize(ids)) if painted else Image.fromarray(ids.astype(np.uint8))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def segmentation_condition(path: str | os.PathLike, height: int | None = None,
                           width: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """The label map at ``path`` (resized nearest-neighbour to ``height x width`` when given) and its one-hot
    ``[1, 182, h, w]`` conditioning input."""
    ids = read_label_map(path)
    if height is not None and width is not None and ids.shape != (height, width):
        ids = resize_labels(ids, height, width)
    return ids, one_hot(ids)

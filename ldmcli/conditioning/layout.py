"""Bounding-box layouts as the token sequence ``layout2img-openimages256`` was trained on.

latent-diffusion never released its ``ldm.data.openimages``; the model's conditioner (a BERTEmbedder over a vocabulary
of 8192, 92 positions) reads taming-transformers' ``ObjectsBoundingBoxConditionalBuilder`` as configured in taming's
``configs/open_images_scene_images_transformer.yaml``, reproduced here:

* 8192 tokens, so a ``90 x 90`` coordinate grid (``int(sqrt(8192))``): the point ``(x, y)`` in [0, 1] is the token
  ``round(y * 89) * 90 + round(x * 89)`` (Python's ``round``, halves to even); token 8191 means "no object";
* at most 30 objects, 3 tokens each: the object representation ``category_no + 340 * modifier`` (modifier bits:
  1 group-of, 2 occluded, 4 depiction, 8 inside), the top-left and the bottom-right corner tokens; unused slots are
  ``(8191, 8191, 8191)``;
* 2 trailing crop tokens (``encode_crop``): always the full image here, tokens 0 and 8099;
* boxes clamped as taming's ``rescale_annotations`` does for a full crop: ``x0 = clamp(x)``, ``w = min(w, 1 - x0)``
  (same for y), boxes not overlapping the image dropped.

Categories: the names in taming's ``open_images_helper.top_300_classes_plus_coco_compatibility`` looked up in Open
Images' ``class-descriptions-boxable.csv`` (v6 names), minus the 12 ids that
``open_images_unify_categories_for_coco`` merges into others (Woman/Man/Girl/Boy into Person, ...), numbered by sorted
Open Images id with ``/m/01s55n`` (Suitcase) moved last, as ``AnnotatedObjectsDataset.setup_category_id_and_number``:
340 classes (``ldmcli/assets/layout/openimages340.tsv``). The 12 merged names are accepted and map to their target.

Taming shuffles the objects of every training example; :func:`layout_tokens` keeps the given order unless asked
(``shuffle=True`` with a ``seed``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import cycle
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from ldmcli.errors import UsageError

NO_TOKENS = 8192
NO_SECTIONS = int(math.sqrt(NO_TOKENS))  # 90
NONE_TOKEN = NO_TOKENS - 1
MAX_OBJECTS = 30
NO_CLASSES = 340
SEQUENCE_LENGTH = MAX_OBJECTS * 3 + 2  # 92
FULL_CROP = (0.0, 0.0, 1.0, 1.0)
FLAGS = ("group_of", "occluded", "depiction", "inside")
# taming's plot colours (seaborn tab10) and crop outline
COLOR_PALETTE = [(30, 118, 179), (255, 126, 13), (43, 159, 43), (213, 38, 39), (147, 102, 188),
                 (139, 85, 74), (226, 118, 193), (126, 126, 126), (187, 188, 33), (22, 189, 206)]
GRAY_75 = (63, 63, 63)


@dataclass(frozen=True)
class LayoutObject:
    """One object: its class (canonical name and number), relative box ``(x0, y0, w, h)`` and Open Images flags."""

    name: str
    category_no: int
    bbox: tuple[float, float, float, float]
    group_of: bool = False
    occluded: bool = False
    depiction: bool = False
    inside: bool = False

    @property
    def modifier(self) -> int:
        return 1 * self.group_of | 2 * self.occluded | 4 * self.depiction | 8 * self.inside


def _table(name: str) -> list[list[str]]:
    text = resources.files("ldmcli").joinpath(f"assets/layout/{name}").read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


@lru_cache(maxsize=1)
def list_classes() -> tuple[str, ...]:
    """The 340 class names, index = category number."""
    rows = _table("openimages340.tsv")
    if [int(r[0]) for r in rows] != list(range(NO_CLASSES)):
        raise RuntimeError("the shipped Open Images class table is damaged")
    return tuple(r[2] for r in rows)


@lru_cache(maxsize=1)
def _lookup() -> dict[str, tuple[int, str]]:
    """lower-case name -> (category number, canonical name), merged names included."""
    rows = _table("openimages340.tsv")
    by_id = {oid: (int(no), name) for no, oid, name in rows}
    table = {name.lower(): (no, name) for no, name in by_id.values()}
    for _oid, name, target in _table("openimages_merged.tsv"):
        table[name.lower()] = by_id[target]
    return table


def merged_classes() -> dict[str, str]:
    """The 12 names taming merges into another class (e.g. ``Woman`` -> ``Person``)."""
    return {name: _lookup()[name.lower()][1] for _oid, name, _t in _table("openimages_merged.tsv")}


def resolve_class(name: str, where: str = "layout") -> tuple[int, str]:
    """``(category number, canonical name)`` of a class name (case-insensitive); unknown -> UsageError with a
    did-you-mean."""
    hit = _lookup().get(name.strip().lower()) if isinstance(name, str) else None
    if hit is not None:
        return hit
    names = [*list_classes(), *merged_classes()]
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(lowered[c]) for c in close)}?" if close else ""
    raise UsageError(f"{where}: unknown class {name!r} (not one of the model's {NO_CLASSES} Open Images classes){hint}")


# ------------------------------------------------------------------------------------------------ parsing
def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where}: {value!r} is not a finite number")
    return float(value)


def _object(entry: Any, n: int, size: tuple[float, float] | None, where: str) -> LayoutObject:
    at = f"{where}: object {n}"
    if not isinstance(entry, Mapping):
        raise UsageError(f"{at}: expected {{\"class\": ..., \"bbox\": [x, y, w, h]}}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {"class", "bbox", *FLAGS})
    if unknown:
        raise UsageError(f"{at}: unknown key(s) {unknown}; an object has class, bbox and the flags {list(FLAGS)}")
    if "class" not in entry or "bbox" not in entry:
        raise UsageError(f"{at}: needs both \"class\" and \"bbox\"")
    number, name = resolve_class(entry["class"], at)
    box = entry["bbox"]
    if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
        raise UsageError(f"{at} ({name}): bbox must be [x, y, w, h], got {box!r}")
    x, y, w, h = (_number(v, f"{at} ({name}) bbox") for v in box)
    if size is not None:
        width, height = size
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise UsageError(f"{at} ({name}): bbox {list(box)} is not inside the {width:g}x{height:g} image "
                             "(boxes are [x, y, w, h] in pixels with \"image_size\")")
        x, y, w, h = x / width, y / height, w / width, h / height
    elif w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > 1 + 1e-9 or y + h > 1 + 1e-9:
        raise UsageError(f"{at} ({name}): bbox {list(box)} is outside [0, 1] or empty (boxes are [x, y, w, h] relative"
                         " to the image; give \"image_size\" for pixel boxes)")
    flags = {}
    for flag in FLAGS:
        value = entry.get(flag, False)
        if not isinstance(value, bool):
            raise UsageError(f"{at} ({name}): {flag} must be true or false, not {value!r}")
        flags[flag] = value
    return LayoutObject(name, number, (x, y, w, h), **flags)


def parse_layout(data: Any, where: str = "layout") -> list[LayoutObject]:
    """Objects from decoded LAYOUT.json: a list of ``{"class", "bbox": [x, y, w, h]}`` (relative to the image),
    or ``{"image_size": [width, height], "objects": [...]}`` with pixel boxes (``{"objects": [...]}`` alone is
    relative). Optional boolean flags per object: ``group_of``, ``occluded``, ``depiction``, ``inside``."""
    size = None
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"objects", "image_size"})
        if unknown or "objects" not in data:
            raise UsageError(f"{where}: expected a list of objects or {{\"image_size\": [w, h], \"objects\": [...]}}")
        if "image_size" in data:
            s = data["image_size"]
            if not isinstance(s, Sequence) or isinstance(s, str) or len(s) != 2:
                raise UsageError(f"{where}: image_size must be [width, height], got {s!r}")
            size = tuple(_number(v, f"{where}: image_size") for v in s)
            if min(size) <= 0:
                raise UsageError(f"{where}: image_size must be positive, got {list(s)}")
        data = data["objects"]
    if not isinstance(data, list):
        raise UsageError(f"{where}: expected a list of objects, got {type(data).__name__}")
    if not data:
        raise UsageError(f"{where}: the layout has no objects")
    if len(data) > MAX_OBJECTS:
        raise UsageError(f"{where}: the layout has {len(data)} objects; the model takes at most {MAX_OBJECTS}")
    return [_object(entry, n + 1, size, where) for n, entry in enumerate(data)]


def read_layout(path: str | os.PathLike) -> list[LayoutObject]:
    """:func:`parse_layout` of the JSON file at ``path``; every error is a one-line UsageError."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return parse_layout(data, str(path))


# ------------------------------------------------------------------------------------------------- tokens
def tokenize_coordinates(x: float, y: float) -> int:
    """The grid token of the point ``(x, y)`` in [0, 1]."""
    return int(round(y * (NO_SECTIONS - 1))) * NO_SECTIONS + int(round(x * (NO_SECTIONS - 1)))


def coordinates_from_token(token: int) -> tuple[float, float]:
    return (token % NO_SECTIONS) / (NO_SECTIONS - 1), (token // NO_SECTIONS) / (NO_SECTIONS - 1)


def _clamp(v: float) -> float:
    return max(min(v, 1.0), 0.0)


def _overlaps_image(bbox: tuple[float, float, float, float]) -> bool:
    x_overlap = max(0.0, min(bbox[0] + bbox[2], 1.0) - max(bbox[0], 0.0))
    y_overlap = max(0.0, min(bbox[1] + bbox[3], 1.0) - max(bbox[1], 0.0))
    return x_overlap * y_overlap > 0.0


def _objects(objects: Iterable[LayoutObject | Mapping[str, Any]]) -> list[LayoutObject]:
    objects = list(objects)
    if all(isinstance(o, LayoutObject) for o in objects):
        if len(objects) > MAX_OBJECTS:
            raise UsageError(f"layout: {len(objects)} objects; the model takes at most {MAX_OBJECTS}")
        return objects
    return parse_layout([o if isinstance(o, Mapping) else _as_dict(o) for o in objects])


def _as_dict(o: Any) -> dict[str, Any]:
    if not isinstance(o, LayoutObject):
        raise TypeError(f"a layout object is a dict or LayoutObject, not {type(o).__name__}")
    return {"class": o.name, "bbox": list(o.bbox), **{f: getattr(o, f) for f in FLAGS}}


def layout_tokens(
    objects: Iterable[LayoutObject | Mapping[str, Any]], *, shuffle: bool = False, seed: int | None = None
) -> torch.LongTensor:
    """The 92 conditioning tokens (``torch.LongTensor``) of a layout: dicts as in LAYOUT.json (relative boxes) or
    :class:`LayoutObject` s, full crop. Objects keep their order unless ``shuffle`` (taming's training did)."""
    objs = _objects(objects)
    if shuffle:
        random.Random(seed).shuffle(objs)
    tokens: list[int] = []
    for o in objs:
        if not _overlaps_image(o.bbox):
            continue
        x, y, w, h = o.bbox
        x0, y0 = _clamp(x), _clamp(y)
        w, h = min(w, 1 - x0), min(h, 1 - y0)
        tokens += [o.category_no + NO_CLASSES * o.modifier, tokenize_coordinates(x0, y0),
                   tokenize_coordinates(x0 + w, y0 + h)]
    tokens += [NONE_TOKEN] * (3 * MAX_OBJECTS - len(tokens))
    tokens += [tokenize_coordinates(FULL_CROP[0], FULL_CROP[1]),
               tokenize_coordinates(FULL_CROP[0] + FULL_CROP[2], FULL_CROP[1] + FULL_CROP[3])]
    assert len(tokens) == SEQUENCE_LENGTH and all(0 <= t < NO_TOKENS for t in tokens)
    return torch.LongTensor(tokens)


def objects_from_tokens(tokens: torch.Tensor | Sequence[int]) -> tuple[list[LayoutObject], tuple[float, ...]]:
    """The objects (boxes on the token grid) and the crop box a token sequence describes (taming's
    ``inverse_build``)."""
    values = [int(v) for v in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]
    if len(values) != SEQUENCE_LENGTH:
        raise ValueError(f"a layout token sequence has {SEQUENCE_LENGTH} tokens, not {len(values)}")

    def box(t1: int, t2: int) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = coordinates_from_token(t1), coordinates_from_token(t2)
        return x0, y0, x1 - x0, y1 - y0

    names = list_classes()
    objects = []
    for i in range(0, 3 * MAX_OBJECTS, 3):
        rep, t1, t2 = values[i : i + 3]
        if rep == NONE_TOKEN:
            continue
        number, modifier = rep % NO_CLASSES, rep // NO_CLASSES
        objects.append(LayoutObject(names[number], number, box(t1, t2), bool(modifier & 1), bool(modifier & 2),
                                    bool(modifier & 4), bool(modifier & 8)))
    return objects, box(values[-2], values[-1])


# --------------------------------------------------------------------------------------------------- plot
def _label(o: LayoutObject) -> str:
    short = [f[0] for f in FLAGS if getattr(o, f)]
    return o.name + (f" ({','.join(short)})" if short else "")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def plot_layout(
    objects: Iterable[LayoutObject | Mapping[str, Any]], size: tuple[int, int] = (256, 256), line_width: int = 3
) -> Image.Image:
    """The layout as the model sees it (boxes snapped to the token grid), drawn as taming's ``plot`` does: white
    background, tab10 outlines, labels with flag initials (g, o, d, i), the crop in grey. ``size`` is
    (width, height)."""
    objs, crop = objects_from_tokens(layout_tokens(objects))
    width, height = size
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(10 if max(size) < 256 else 12 if max(size) < 512 else 15)

    def absolute(b: Sequence[float]) -> tuple[int, int, int, int]:
        return int(b[0] * width), int(b[1] * height), int((b[0] + b[2]) * width), int((b[1] + b[3]) * height)

    for o, colour in zip(objs, cycle(COLOR_PALETTE)):
        box = absolute(o.bbox)
        draw.rectangle(box, outline=colour, width=line_width)
        draw.text((box[0] + line_width, box[1] + line_width), _label(o), fill=(0, 0, 0), font=font)
    draw.rectangle(absolute(crop), outline=GRAY_75, width=line_width)
    return image

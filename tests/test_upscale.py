"""``ldm upscale`` end to end on a tiny random-weight LDSR-like model (``sr`` family: VQ f4, identity concat
conditioning), its forms (one image, several, a folder; resumable), conversions, patch-wise progress, and every bad
input (a one-line error, exit 2, before any model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmcli.output import read_metadata
from tinymodels import install_tiny

FAST = ["--precision", "fp32", "--device", "cpu", "--steps", "2", "--seed", "3"]


def _image(path: Path, w: int, h: int, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    if mode == "RGB":
        Image.fromarray(arr[..., :3]).save(path)
    elif mode == "RGBA":
        arr[0, 0, 3] = 0
        Image.fromarray(arr).save(path)
    elif mode == "L":
        Image.fromarray(arr[..., 0]).save(path)
    elif mode == "I;16":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(path)
    return path


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_one_image_any_size(cli, monkeypatch, tmp_path):
    install_tiny("sr", monkeypatch)
    src = _image(tmp_path / "small.png", 13, 10)
    out = tmp_path / "big.png"
    r = cli("upscale", src, "-o", out, "--model", "tiny-sr", "--json", *FAST)
    assert r.exit_code == 0, r
    with Image.open(out) as image:
        assert image.size == (52, 40) and image.mode == "RGB"
    meta = read_metadata(out)
    assert meta["command"] == "upscale" and meta["model"] == "tiny-sr" and meta["sampler"] == "ddim"
    assert meta["eta"] == 1.0 and meta["steps"] == 2 and meta["seed"] == 3 and meta["patches"] == 1
    assert (meta["input_width"], meta["input_height"], meta["width"], meta["height"]) == (13, 10, 52, 40)
    from ldmcli.fileio import sha256_file

    assert meta["image_sha256"] == sha256_file(src)
    report = json.loads(r.stdout)
    assert report["written"][0]["path"] == str(out) and report["seed"] == 3 and not report["failed"]

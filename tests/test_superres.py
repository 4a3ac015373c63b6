"""LDSR inputs: upstream's conditioning, the latent shape, padding/cropping, pre-downsampling, conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldmcli.conditioning import superres as sr
from ldmcli.errors import UsageError


def test_lowres_condition_like_the_notebook():
    arr = np.array([[[0, 255, 51]]], dtype=np.uint8)
    c = sr.lowres_condition(arr)
    # ToTensor (x / 255) then 2c - 1: 0 -> -1, 255 -> 1, 51 -> 2 * 0.2 - 1
    assert c.shape == (1, 3, 1, 1) and c.dtype == torch.float32
    assert c.flatten().tolist() == pytest.approx([-1.0, 1.0, 2 * (51 / 255) - 1])
    with pytest.raises(TypeError):
        sr.lowres_condition(np.zeros((4, 4), np.uint8))


def test_plan_sizes_padding_and_split():
    plan = sr.plan_upscale(100, 61)
    assert plan.lowres_size == (100, 61) and plan.padded_size == (104, 64)  # next multiples of 8
    assert plan.latent_shape == (3, 104, 64)  # VQ f4 of the 4x image: the low-res size itself
    assert plan.output_size == (400, 244)
    assert plan.split_input_params["ks"] == (128, 128) and plan.split_input_params["stride"] == (64, 64)
    assert plan.patches == 1  # both sides under 128 latent pixels: one (shrunk) patch
    small = sr.plan_upscale(24, 40)
    assert small.split_input_params is None  # 4x side 96 < 128: whole image, as the notebook
    big = sr.plan_upscale(1024, 1024, patch_batch=4)
    assert big.patches == 15 * 15 and big.split_input_params["patch_batch"] == 4 and big.output_size == (4096, 4096)
    pre = sr.plan_upscale(1000, 600, pre_downsample_factor=4)
    assert pre.lowres_size == (250, 150) and pre.output_size == (1000, 600)
    with pytest.raises(UsageError, match="image too small: 7x7 px; LDSR needs at least 8"):
        sr.plan_upscale(7, 7)
    with pytest.raises(UsageError, match="after downsampling by 4"):
        sr.plan_upscale(28, 300, pre_downsample_factor=4)
    with pytest.raises(UsageError, match="one of"):
        sr.plan_upscale(64, 64, pre_downsample_factor=3)


def test_pad_and_crop():
    c = torch.arange(3 * 5 * 6, dtype=torch.float32).view(1, 3, 5, 6)
    padded = sr.pad_to_multiple(c, 4)
    assert padded.shape == (1, 3, 8, 8)
    assert torch.equal(padded[..., :5, :6], c) and torch.equal(padded[..., 7, :6], c[..., 4, :])  # edge repeated
    plan = sr.plan_upscale(10, 12)
    out = torch.zeros(1, 3, 4 * plan.padded_size[0], 4 * plan.padded_size[1])
    assert sr.crop_output(out, plan).shape == (1, 3, 40, 48)


def test_pre_downsample_and_conversions(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    assert sr.pre_downsample(rgb, 2).shape == (20, 15, 3) and sr.pre_downsample(rgb, 1) is rgb
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    arr, notes = sr.read_lowres(tmp_path / "rgb.png")
    assert np.array_equal(arr, rgb) and notes == []

    grey = Image.fromarray(rgb[..., 0])
    grey.save(tmp_path / "grey.png")
    arr, notes = sr.read_lowres(tmp_path / "grey.png")
    assert notes == ["greyscale converted to RGB"] and np.array_equal(arr[..., 1], rgb[..., 0])

    rgba = np.dstack([rgb, np.full((40, 30), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    arr, notes = sr.read_lowres(tmp_path / "rgba.png")
    assert notes == ["transparent pixels composited over white"] and arr[0, 0].tolist() == [255, 255, 255]

    deep = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    deep.save(tmp_path / "deep.png")
    arr, notes = sr.read_lowres(tmp_path / "deep.png")
    assert len(notes) == 2 and "8 bits" in notes[0] and np.array_equal(arr[..., 0], rgb[..., 0])
    with pytest.raises(UsageError, match="no such file"):
        sr.read_lowres(tmp_path / "missing.png")

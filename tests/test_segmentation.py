"""COCO-Stuff label maps for semantic_synthesis: one-hot as taming's SegmentationBase, the palette, errors."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from ldmcli.conditioning import segmentation as seg
from ldmcli.errors import UsageError


def test_classes_and_palette_rule():
    classes = seg.list_classes()
    assert len(classes) == 182
    assert (classes[0].name, classes[90].name, classes[91].name, classes[181].name) == (
        "person", "hair brush", "banner", "wood")  # COCO-Stuff official ids 1, 91, 92, 182 minus one
    assert classes[156].name == "sky-other" and classes[11].name == "street sign"
    assert [c.rgb for c in classes] == [seg.voc_colour(i) for i in range(182)]
    assert len({c.rgb for c in classes}) == 182
    # VOC colour map by hand: 1 -> red bit 7; 2 -> green bit 7; 9 = 0b001001 -> red bits 7 and 6
    assert seg.voc_colour(1) == (128, 0, 0) and seg.voc_colour(2) == (0, 128, 0) and seg.voc_colour(9) == (192, 0, 0)


def test_one_hot_like_segmentation_base():
    ids = np.array([[0, 181], [5, 5]], dtype=np.uint8)
    onehot = seg.one_hot(ids)
    reference = torch.from_numpy(np.eye(182)[ids]).permute(2, 0, 1).unsqueeze(0).float()  # SegmentationBase, b c h w
    assert onehot.dtype == torch.float32 and onehot.shape == (1, 182, 2, 2)
    assert torch.equal(onehot, reference)
    assert onehot[0, 181, 0, 1] == 1 and onehot[0, :, 0, 1].sum() == 1


def test_palette_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 182, size=(12, 17)).astype(np.uint8)
    seg.write_label_map(tmp_path / "painted.png", ids, painted=True)
    seg.write_label_map(tmp_path / "ids.png", ids)
    assert Image.open(tmp_path / "painted.png").mode == "RGB" and Image.open(tmp_path / "ids.png").mode == "L"
    assert np.array_equal(seg.read_label_map(tmp_path / "painted.png"), ids)
    assert np.array_equal(seg.read_label_map(tmp_path / "ids.png"), ids)
    indexed = Image.new("P", ids.shape[::-1])  # an indexed PNG: the palette index is the id
    indexed.putpalette(seg.palette().reshape(-1).tolist())
    indexed.putdata(ids.reshape(-1).tolist())
    indexed.save(tmp_path / "indexed.png")
    assert np.array_equal(seg.read_label_map(tmp_path / "indexed.png"), ids)


def test_errors(tmp_path):
    ids = np.zeros((4, 6), dtype=np.uint8)
    ids[2, 3] = 200
    Image.fromarray(ids).save(tmp_path / "bad_id.png")
    with pytest.raises(UsageError, match=r"pixel \(x=3, y=2\) has class id 200; COCO-Stuff ids are 0..181"):
        seg.read_label_map(tmp_path / "bad_id.png")
    ids[2, 3] = 255
    Image.fromarray(ids).save(tmp_path / "unlabeled.png")
    with pytest.raises(UsageError, match="unlabeled"):
        seg.read_label_map(tmp_path / "unlabeled.png")

    rgb = seg.colorize(np.full((4, 6), 156, np.uint8))
    rgb[1, 4] = (65, 96, 128)  # one off sky-other (64, 96, 128), as antialiasing would leave
    Image.fromarray(rgb).save(tmp_path / "off.png")
    with pytest.raises(UsageError, match=r"pixel \(x=4, y=1\) has colour #416080 \(65, 96, 128\), not a palette "
                                         r"colour \(1 such pixels; nearest class: 156 'sky-other'") as e:
        seg.read_label_map(tmp_path / "off.png")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        seg.read_label_map(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(UsageError, match="not an image"):
        seg.read_label_map(tmp_path / "text.png")
    rgba = np.zeros((2, 2, 4), np.uint8)
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    with pytest.raises(UsageError, match="transparent"):
        seg.read_label_map(tmp_path / "clear.png")


def test_nearest_resize_only_keeps_ids():
    ids = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    big = seg.resize_labels(ids, 4, 6)
    assert big.tolist() == [[1, 1, 1, 2, 2, 2]] * 2 + [[3, 3, 3, 4, 4, 4]] * 2
    assert seg.resize_labels(big, 2, 2).tolist() == ids.tolist()
    odd = seg.resize_labels(np.arange(9, dtype=np.uint8).reshape(3, 3), 5, 5)
    assert set(np.unique(odd)) <= set(range(9))


def test_condition_and_legend(tmp_path):
    path = resources.files("ldmcli").joinpath("assets/semantic/landscape.png")
    painted = resources.files("ldmcli").joinpath("assets/semantic/landscape_painted.png")
    ids, cond = seg.segmentation_condition(path, 128, 128)
    assert ids.shape == (128, 128) and cond.shape == (1, 182, 128, 128)
    assert torch.equal(cond.sum(1), torch.ones(1, 128, 128))
    assert np.array_equal(seg.read_label_map(painted), seg.read_label_map(path))
    out = seg.legend_png(tmp_path / "legend.png", ids)
    legend = Image.open(out)
    assert legend.mode == "RGB" and legend.height >= 16 * len(np.unique(ids))
    full = seg.legend_image()
    assert full.width > legend.width
    assert not list(tmp_path.glob(".*.tmp"))


def test_label_map_through_a_tiny_semantic_model(tmp_path):
    path = resources.files("ldmcli").joinpath("assets/semantic/landscape.png")
    _, onehot = seg.segmentation_condition(path, 32, 48)  # sizes other than the training size run convolutionally
    from tinymodels import build_tiny

    model = build_tiny("semantic", tmp_path).eval()
    with torch.no_grad():
        c = model.get_learned_conditioning(onehot)
        assert c.shape == (1, 3, 8, 12)  # two bilinear halvings: the latent's size for an f4 first stage
        eps = model.apply_model(torch.randn(1, 3, 8, 12), torch.tensor([10]), c)
    assert eps.shape == (1, 3, 8, 12) and torch.isfinite(eps).all()

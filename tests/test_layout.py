"""Layout tokens for layout2img-openimages256: taming's ObjectsBoundingBoxConditionalBuilder, written out by hand."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from ldmcli.conditioning import layout
from ldmcli.conditioning.layout import LayoutObject, layout_tokens, objects_from_tokens, plot_layout, read_layout
from ldmcli.errors import UsageError

NONE = 8191


def test_tokens_by_hand():
    tokens = layout_tokens([
        {"class": "Dog", "bbox": [0.1, 0.2, 0.3, 0.4]},
        {"class": "Woman", "bbox": [0.5, 0.5, 0.5, 0.5], "group_of": True, "occluded": True},
    ])
    # Dog is category 253. Corners on the 90x90 grid: round(0.1 * 89) = 9, round(0.2 * 89) = 18 -> 18 * 90 + 9;
    # (0.1 + 0.3) * 89 = 35.6 -> 36, (0.2 + 0.4) * 89 = 53.4 -> 53 -> 53 * 90 + 36.
    # Woman is merged into Person (37); modifier group_of 1 | occluded 2 = 3 -> 37 + 340 * 3.
    # 0.5 * 89 = 44.5 rounds half to even -> 44 -> 44 * 90 + 44; (1, 1) -> 89 * 90 + 89.
    # 28 empty triples of 8191, then the full-crop tokens (0, 0) -> 0 and (1, 1) -> 8099.
    expected = [253, 1629, 4806, 1057, 4004, 8099] + [NONE] * 84 + [0, 8099]
    assert isinstance(tokens, torch.LongTensor) and tokens.shape == (92,)
    assert tokens.tolist() == expected


def test_public_import_and_flags():
    from ldmcli import layout_tokens as public

    tokens = public([{"class": "car", "bbox": [0, 0, 1, 1], "depiction": True, "inside": True}])
    # Car is 327 (names are case-insensitive); depiction 4 | inside 8 = 12 -> 327 + 340 * 12 = 4407
    assert tokens[:3].tolist() == [4407, 0, 8099] and tokens[3:90].eq(NONE).all()


def test_category_table_follows_taming_numbering():
    names = layout.list_classes()
    assert len(names) == 340 and names[0] == "Tortoise" and names[-1] == "Suitcase"
    rows = layout._table("openimages340.tsv")
    ids = [r[1] for r in rows]
    assert ids[:-1] == sorted(ids[:-1]) and ids[-1] == "/m/01s55n"  # sorted by Open Images id, Suitcase last
    merged = layout.merged_classes()
    assert len(merged) == 12 and merged["Woman"] == "Person" and merged["Wall clock"] == "Clock"
    assert not set(merged) & set(names)


def test_clamping_and_inverse_build():
    obj = LayoutObject("Tree", 215, (0.8, 0.9, 0.5, 0.5))  # taming clamps w to 1 - x0 and h to 1 - y0
    tokens = layout_tokens([obj])
    assert tokens[:3].tolist() == [215, round(0.9 * 89) * 90 + round(0.8 * 89), 8099]
    objs, crop = objects_from_tokens(tokens)
    assert crop == (0.0, 0.0, 1.0, 1.0) and len(objs) == 1 and objs[0].name == "Tree"
    assert objs[0].bbox[0] == pytest.approx(71 / 89) and objs[0].bbox[2] == pytest.approx(18 / 89)


def test_shuffle_only_when_asked():
    names = ["Dog", "Cat", "Car", "Tree"]
    objs = [{"class": name, "bbox": [0.1 * i, 0.1 * i, 0.1, 0.1]} for i, name in enumerate(names)]
    assert layout_tokens(objs).tolist() == layout_tokens(objs).tolist()
    shuffled = layout_tokens(objs, shuffle=True, seed=3)
    assert shuffled.tolist() == layout_tokens(objs, shuffle=True, seed=3).tolist()
    assert sorted(shuffled[:12:3].tolist()) == sorted(layout_tokens(objs)[:12:3].tolist())


def test_pixel_boxes(tmp_path):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({"image_size": [200, 100], "objects": [{"class": "Dog", "bbox": [20, 20, 60, 40]}]}))
    objs = read_layout(path)
    assert objs[0].bbox == (0.1, 0.2, 0.3, 0.4)
    assert layout_tokens(objs)[:3].tolist() == [253, 1629, 4806]


@pytest.mark.parametrize("data, message", [
    ([{"class": "Dog", "bbox": [0, 0, 0.1, 0.1]}] * 31, "31 objects; the model takes at most 30"),
    ([{"class": "Dog", "bbox": [0.5, 0.5, 0.6, 0.1]}], "outside \\[0, 1\\]"),
    ([{"class": "Dog", "bbox": [-0.1, 0, 0.5, 0.5]}], "outside \\[0, 1\\]"),
    ([{"class": "Dgo", "bbox": [0, 0, 1, 1]}], "unknown class 'Dgo'.*did you mean 'Dog'"),
    ([{"class": "Dog", "bbox": [0, 0, 1]}], "bbox must be \\[x, y, w, h\\]"),
    ([{"class": "Dog", "bbox": [0, 0, 1, 1], "truncated": True}], "unknown key"),
    ([{"class": "Dog", "bbox": [0, 0, 1, 1], "occluded": "yes"}], "occluded must be true or false"),
    ({"image_size": [100, 100], "objects": [{"class": "Dog", "bbox": [50, 50, 60, 10]}]}, "not inside the 100x100"),
    ([], "no objects"),
])
def test_bad_layouts_are_one_line_usage_errors(tmp_path, data, message):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=message) as e:
        read_layout(path)
    assert "\n" not in str(e.value)


def test_unreadable_layout_file(tmp_path):
    path = tmp_path / "layout.json"
    path.write_text("[{\"class\": \"Dog\",}]")
    with pytest.raises(UsageError, match="not JSON .* line 1"):
        read_layout(path)
    with pytest.raises(UsageError, match="no such file"):
        read_layout(tmp_path / "missing.json")


def test_plot_layout_draws_the_boxes():
    image = plot_layout([{"class": "Dog", "bbox": [0.25, 0.25, 0.5, 0.5]}], size=(90, 90), line_width=2)
    assert image.size == (90, 90) and image.mode == "RGB"
    px = image.load()
    assert px[45, 23] == (30, 118, 179)  # top edge of the box in the first tab10 colour (y = int(0.2472 * 90) + 1)
    assert px[45, 45] == (255, 255, 255)  # inside stays white
    assert px[0, 45] == (63, 63, 63)  # the full-crop outline


def test_shipped_example_layout():
    from importlib import resources

    path = resources.files("ldmcli").joinpath("assets/layout/example.json")
    objs = read_layout(path)
    assert 2 <= len(objs) <= 30
    assert layout_tokens(objs).shape == (92,)


def test_tokens_through_a_tiny_layout_model(tmp_path):
    """layout2img in miniature: BERTEmbedder over 8192 token ids, 92 positions, cross-attention."""
    from tinymodels import build_tiny

    model = build_tiny("layout", tmp_path).eval()
    tokens = layout_tokens(read_layout(resources.files("ldmcli").joinpath("assets/layout/example.json")))
    with torch.no_grad():
        context = model.get_learned_conditioning(tokens[None])
        assert context.shape == (1, 92, 64)
        eps = model.apply_model(torch.randn(1, 3, 8, 8), torch.tensor([10]), context)
    assert eps.shape == (1, 3, 8, 8) and torch.isfinite(eps).all()

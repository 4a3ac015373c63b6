"""``ldm sample --segmentation`` and ``--layout`` end to end on tiny random-weight semantic-synthesis and
layout-to-image models (zoo entries), the class lists, legend, layout plot and examples, and every bad input (a
one-line error, exit 2, before any model loads)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmcli.conditioning import segmentation as seg
from ldmcli.fileio import sha256_file
from ldmcli.output import read_metadata
from tinymodels import CONFIGS, install_tiny

FAST = ["--precision", "fp32", "--device", "cpu", "-c", "2", "--seed", "4"]
LANDSCAPE = Path(str(resources.files("ldmcli").joinpath("assets/semantic/landscape.png")))
EXAMPLE_LAYOUT = Path(str(resources.files("ldmcli").joinpath("assets/layout/example.json")))


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _map(path: Path, h: int, w: int, painted: bool = False) -> Path:
    ids = seg.resize_labels(seg.read_label_map(LANDSCAPE), h, w)
    seg.write_label_map(path, ids, painted=painted)
    return path


def test_segmentation_through_a_tiny_semantic_model(cli, monkeypatch, tmp_path):
    from ldmcli.models.ddpm import LatentDiffusion

    install_tiny("semantic", monkeypatch)
    seen = []
    original = LatentDiffusion.get_learned_conditioning

    def spy(self, c):
        seen.append(c.clone())
        return original(self, c)

    monkeypatch.setattr(LatentDiffusion, "get_learned_conditioning", spy)
    label_map = _map(tmp_path / "map.png", 32, 48, painted=True)
    out = tmp_path / "out"
    r = cli("sample", "tiny-semantic", "--segmentation", label_map, "-n", "3", "--batch_size", "2", "--json",
            "--logdir", out, *FAST)
    assert r.exit_code == 0, r
    samples = [x for x in _records(r.stdout) if x["kind"] == "sample"]
    assert len(samples) == 3 and [x["seed"] for x in samples] == [4, 5, 6]
    with Image.open(samples[0]["path"]) as image:
        assert image.size == (48, 32)  # the map's size, convolutionally
    meta = read_metadata(samples[0]["path"])
    assert meta["segmentation"] == str(label_map) and meta["segmentation_sha256"] == sha256_file(label_map)
    assert (meta["height"], meta["width"]) == (32, 48)
    # the one-hot map went through the conditioner once (182 channels at image size), repeated to the batches
    assert len(seen) == 1 and seen[0].shape == (1, 182, 32, 48)
    assert torch.equal(seen[0], seg.one_hot(seg.read_label_map(label_map)))

    # --H/--W resize the map nearest-neighbour; the same seed gives the same image for the same map
    r = cli("sample", "tiny-semantic", "--segmentation", LANDSCAPE, "--H", "32", "--W", "32", "-n", "1", "--json",
            "--skip-grid", "--logdir", tmp_path / "resized", *FAST)
    assert r.exit_code == 0, r
    assert seen[-1].shape == (1, 182, 32, 32)
    assert torch.equal(seen[-1], seg.one_hot(seg.resize_labels(seg.read_label_map(LANDSCAPE), 32, 32)))


def test_layout_through_a_tiny_layout_model(cli, monkeypatch, tmp_path):
    from ldmcli.conditioning.layout import layout_tokens, read_layout
    from ldmcli.models.ddpm import LatentDiffusion

    install_tiny("layout", monkeypatch)
    seen = []
    original = LatentDiffusion.get_learned_conditioning
    monkeypatch.setattr(LatentDiffusion, "get_learned_conditioning",
                        lambda self, c: seen.append(c.clone()) or original(self, c))
    out = tmp_path / "out"
    r = cli("sample", "tiny-layout", "--layout", EXAMPLE_LAYOUT, "-n", "2", "--plot-layout", "--json", "--logdir", out,
            *FAST)
    assert r.exit_code == 0, r
    samples = [x for x in _records(r.stdout) if x["kind"] == "sample"]
    assert len(samples) == 2 and samples[0]["layout"] == str(EXAMPLE_LAYOUT)
    assert samples[0]["layout_sha256"] == sha256_file(EXAMPLE_LAYOUT)
    assert len(seen) == 1 and torch.equal(seen[0], layout_tokens(read_layout(EXAMPLE_LAYOUT))[None])
    with Image.open(out / "layout-0000.png") as plot, Image.open(samples[0]["path"]) as sample:
        assert plot.size == sample.size == (32, 32)  # the tiny model's training size
    assert read_metadata(out / "layout-0000.png")["layout"] == str(EXAMPLE_LAYOUT)


def test_list_classes_legend_and_examples(cli, monkeypatch, tmp_path):
    install_tiny("semantic", monkeypatch)
    install_tiny("layout", monkeypatch)
    r = cli("sample", "tiny-semantic", "--list-classes")
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    assert len(lines) == 182 and lines[0] == "0\tperson\t#000000" and lines[181].startswith("181\twood\t#")
    r = cli("sample", "tiny-layout", "--list-classes", "--json")
    assert r.exit_code == 0, r
    rows = _records(r.stdout)
    assert len(rows) == 340 and all(set(row) == {"id", "name"} for row in rows)

    r = cli("sample", "tiny-semantic", "--legend", tmp_path / "legend.png")
    assert r.exit_code == 0, r
    with Image.open(tmp_path / "legend.png") as legend:
        assert legend.mode == "RGB" and legend.height > 16 * 40
    r = cli("sample", "tiny-semantic", "--legend", tmp_path / "legend.png")
    assert r.exit_code == 2 and "exists" in r.stderr  # never overwritten

    r = cli("sample", "tiny-semantic", "--examples", tmp_path / "ex")
    assert r.exit_code == 0, r
    assert np.array_equal(seg.read_label_map(tmp_path / "ex" / "landscape_painted.png"),
                          seg.read_label_map(LANDSCAPE))
    r = cli("sample", "tiny-layout", "--examples", tmp_path / "ex")
    assert r.exit_code == 0, r
    assert (tmp_path / "ex" / "example.json").read_bytes() == EXAMPLE_LAYOUT.read_bytes()
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == [
        "README-layout.txt", "README-semantic.txt", "example.json", "landscape.png", "landscape_painted.png"]


def _bad_files(tmp: Path) -> dict[str, str]:
    ids = seg.resize_labels(seg.read_label_map(LANDSCAPE), 32, 32)
    ids[3, 5] = 182
    Image.fromarray(ids).save(tmp / "id182.png")
    _map(tmp / "odd.png", 30, 50)
    files = {
        "31": [{"class": "Dog", "bbox": [0.0, 0.0, 0.1, 0.1]}] * 31,
        "outside": [{"class": "Dog", "bbox": [0.5, 0.5, 0.6, 0.2]}],
        "unknown": [{"class": "Dgo", "bbox": [0.1, 0.1, 0.5, 0.5]}],
    }
    for name, data in files.items():
        (tmp / f"{name}.json").write_text(json.dumps(data))
    return {"{id182}": str(tmp / "id182.png"), "{odd}": str(tmp / "odd.png"), "{31}": str(tmp / "31.json"),
            "{outside}": str(tmp / "outside.json"), "{unknown}": str(tmp / "unknown.json"),
            "{map}": str(LANDSCAPE), "{layout}": str(EXAMPLE_LAYOUT), "{missing}": str(tmp / "missing.png")}


BAD = [
    (["tiny-semantic", "--segmentation", "{id182}"], "class id 182"),
    (["tiny-semantic", "--segmentation", "{missing}"], "no such file"),
    (["tiny-semantic", "--segmentation", "{odd}"], "nearest valid size 48x32"),
    (["tiny-semantic", "--segmentation", "{map}", "--H", "30", "--W", "32"], "multiples of 8"),
    (["tiny-semantic"], "--segmentation: tiny-semantic draws images from a label map"),
    (["tiny-semantic", "--segmentation", "{map}", "--scale", "2"], "guide"),
    (["tiny-semantic", "--segmentation", "{map}", "--class", "1"], "not classes"),
    (["tiny-semantic", "--layout", "{layout}"], "--segmentation"),
    (["tiny-semantic", "--segmentation", "{map}", "--layout", "{layout}"], "not both"),
    (["tiny-layout", "--layout", "{31}"], "31 objects; the model takes at most 30"),
    (["tiny-layout", "--layout", "{outside}"], "outside [0, 1]"),
    (["tiny-layout", "--layout", "{unknown}"], "did you mean 'Dog'"),
    (["tiny-layout"], "--layout: tiny-layout draws images from a bounding-box layout"),
    (["tiny-layout", "--plot-layout"], "--layout"),
    (["tiny-uncond", "--segmentation", "{map}"], "--segmentation: tiny-uncond does not take a label map"),
    (["tiny-uncond", "--list-classes"], "no class names"),
    (["tiny-uncond", "--examples", "{missing}"], "no example inputs"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_a_one_line_usage_error_before_loading(cli, monkeypatch, tmp_path, args, message):
    import ldmcli.loading
    from test_txt2img import register_config_only

    for family in ("semantic", "layout", "uncond"):
        (tmp_path / f"{family}.yaml").write_text(CONFIGS[family], encoding="utf-8")
        register_config_only(monkeypatch, tmp_path, family)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ldmcli.loading, "load", no_loading)
    subs = _bad_files(tmp_path)
    r = cli("sample", *[subs.get(a, a) for a in args], "--logdir", tmp_path / "out")
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ldm: error:"), r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()

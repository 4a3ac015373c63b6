"""ldm inpaint: input discovery and validation, upstream's arithmetic, any image size, resumable batches, the CLI.

Model tests use the tiny random-weight inpainting model of tests/tinymodels.py (VQ-f4 without attention as first
stage, ``__is_first_stage__`` concat conditioning, a 7-channel UNet), installed as a zoo entry so the command loads it
through the real zoo/store/loading path. Images are a few dozen pixels and samplers run 2 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldmcli import inpaint as ip
from ldmcli.pipelines.inpaint import SAMPLERS
from ldmcli.sampling import SamplerSettings
from ldmcli.errors import UsageError
from ldmcli.examples import EXAMPLES, draw_mask, example_pairs, write_examples
from tinymodels import install_tiny, write_tiny

TINY = "tiny-inpaint"


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _pair_arrays(h: int = 13, w: int = 21, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : h // 2 + 2, w // 3 : w // 3 + 6] = 255
    mask[0, 0] = 127  # just below upstream's 0.5 threshold: not filled
    mask[-1, -1] = 128  # just above: filled
    return image, mask


def _write_pair(folder: Path, name: str, h: int = 13, w: int = 21, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = _pair_arrays(h, w, seed)
    return _png(folder / f"{name}.png", image), _png(folder / f"{name}_mask.png", mask)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ldmcli.loading import load_model

    files = write_tiny("inpaint", tmp_path_factory.mktemp("tiny_inpaint"))
    return load_model(str(files.config), ckpt=files.ckpt)


# ------------------------------------------------------------------------------------------- inputs, no model


def test_find_pairs_reports_every_bad_pair(tmp_path):
    indir = tmp_path / "in"
    _write_pair(indir, "a")
    _write_pair(indir, "b")
    _png(indir / "nomask.png", _pair_arrays()[0])
    _png(indir / "orphan_mask.png", _pair_arrays()[1])
    (indir / "notes.txt").write_text("ignored")
    pairs, problems = ip.find_pairs(indir, tmp_path / "out")
    assert [(p.image.name, p.mask.name, p.output) for p in pairs] == [
        ("a.png", "a_mask.png", tmp_path / "out" / "a.png"),
        ("b.png", "b_mask.png", tmp_path / "out" / "b.png"),
    ]
    messages = sorted(p.message for p in problems)
    assert len(messages) == 2
    assert "nomask.png: no mask (expected nomask_mask.png)" in messages[0]
    assert "orphan_mask.png: mask without an image" in messages[1]


@pytest.mark.parametrize("case", ["empty", "missing", "same", "file"])
def test_find_pairs_folder_errors(tmp_path, case):
    indir = tmp_path / "in"
    indir.mkdir()
    outdir = tmp_path / "out"
    if case == "missing":
        indir = tmp_path / "nowhere"
    elif case == "same":
        _write_pair(indir, "a")
        outdir = indir / "." / ""
    elif case == "file":
        (tmp_path / "afile").write_text("x")
        indir = tmp_path / "afile"
    with pytest.raises(UsageError) as err:
        ip.find_pairs(indir, outdir)
    message = str(err.value)
    assert "\n" not in message
    assert str(indir if case != "same" else outdir) in message


def test_read_errors_name_the_file(tmp_path):
    image, mask = _pair_arrays()
    good = _png(tmp_path / "good.png", image)
    text = tmp_path / "text.png"
    text.write_text("not a png at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    small_mask = _png(tmp_path / "small_mask.png", mask[:-1])
    for path, words in [(text, "not an image"), (truncated, "cannot read image .*truncated"), (tmp_path / "gone.png", "no such")]:
        with pytest.raises(UsageError, match=words) as err:
            ip.load_pair(good, path)
        assert str(path) in str(err.value)
    with pytest.raises(UsageError, match="mask is 21x12 but its image good.png is 21x13") as err:
        ip.load_pair(good, small_mask)
    assert str(small_mask) in str(err.value)


def test_make_batch_is_upstreams_arithmetic():
    image, mask = _pair_arrays()
    batch = ip.make_batch(image, mask)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    m = (torch.from_numpy(mask)[None, None].float() / 255.0 >= 0.5).float()
    assert batch["mask"][0, 0, 0, 0] == -1 and batch["mask"][0, 0, -1, -1] == 1  # 127 -> keep, 128 -> fill
    torch.testing.assert_close(batch["image"], img * 2.0 - 1.0, rtol=0, atol=0)
    torch.testing.assert_close(batch["mask"], m * 2.0 - 1.0, rtol=0, atol=0)
    torch.testing.assert_close(batch["masked_image"], (1 - m) * img * 2.0 - 1.0, rtol=0, atol=0)
    assert set(batch["mask"].unique().tolist()) == {-1.0, 1.0}


def test_pad_to_multiple_reflects_and_keeps_the_original():
    a = np.arange(5 * 3).reshape(5, 3).astype(np.uint8)
    p = ip.pad_to_multiple(a, 8)
    assert p.shape == (8, 8)
    assert (p[:5, :3] == a).all()
    assert (p[5, :3] == a[3]).all() and (p[:5, 3] == a[:, 1]).all()  # reflection without repeating the edge
    assert ip.pad_to_multiple(np.zeros((16, 8, 3)), 8).shape == (16, 8, 3)
    assert ip.pad_to_multiple(np.zeros((1, 3, 3), np.uint8), 8).shape == (8, 8, 3)  # a 1-pixel side


def test_sampler_settings_are_checked_before_loading():
    from ldmcli.pipelines.inpaint import check_settings
    from ldmcli.sampling import SamplerSettings

    for args, words in [(("euler", 10, 0.0), "unknown sampler"), (("ddim", 0, 0.0), "steps"),
                        (("ddim", 1001, 0.0), "steps"), (("plms", 10, 0.5), "eta"),
                        (("ddim", 10, -1.0), "eta")]:
        with pytest.raises(UsageError, match=words):
            check_settings(SamplerSettings(*args, 1.0))
    check_settings(SamplerSettings("dpmpp", 20, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------- examples


def test_examples_are_pairs_with_masks(tmp_path):
    written = write_examples(tmp_path / "ex", max_side=40)
    expected = [f"{n}.png" for n in EXAMPLES] + [f"{n}_mask.png" for n in EXAMPLES]
    assert sorted(p.name for p in written) == sorted(expected)
    pairs, problems = ip.find_pairs(tmp_path / "ex", tmp_path / "out")
    assert len(pairs) == len(EXAMPLES) and problems == []
    for pair in pairs:
        image, mask = ip.load_pair(pair.image, pair.mask)
        assert max(image.shape[:2]) == 40
        assert 0.01 < (mask == 255).mean() < 0.3 and set(np.unique(mask)) == {0, 255}
    assert write_examples(tmp_path / "ex", max_side=40) == []  # existing files are kept
    full = {p.name: p.image.shape for p in example_pairs()}
    assert full == {"china": (256, 384, 3), "flower": (200, 300, 3)}


def test_example_images_are_scikit_learns_downscaled():
    datasets = pytest.importorskip("sklearn.datasets")
    for pair in example_pairs():
        original = Image.fromarray(datasets.load_sample_image(f"{pair.name}.jpg"))
        expected = np.asarray(original.resize(pair.image.shape[1::-1], Image.LANCZOS))
        assert (expected == pair.image).all()


def test_draw_mask_shapes():
    m = draw_mask(EXAMPLES["china"], 100, 50)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (63, 80, 24, 29)  # pixel centres inside the box


# ---------------------------------------------------------------------------------------------- the pipeline


def test_pipeline_matches_upstream_steps(tiny_model):
    """Upstream's script, step by step with the model's own parts and the upstream-API DDIMSampler, given x_T."""
    from ldmcli.sampling.compat import DDIMSampler

    model = tiny_model
    image, mask = _pair_arrays(16, 24)
    batch = ip.make_batch(image, mask)
    x_T = torch.randn((1, 3, 4, 6), generator=torch.Generator().manual_seed(3))
    ours = ip.inpaint_batch(model, batch, settings=SamplerSettings("ddim", 3, 0.0, 1.0), x_T=x_T)

    c = model.cond_stage_model.encode(batch["masked_image"])
    c = torch.cat((c, F.interpolate(batch["mask"], size=c.shape[-2:])), dim=1)
    samples, _ = DDIMSampler(model).sample(S=3, conditioning=c, batch_size=1, shape=(c.shape[1] - 1,) + c.shape[2:],
                                           verbose=False, x_T=x_T)
    x = model.decode_first_stage(samples)
    img = torch.clamp((batch["image"] + 1.0) / 2.0, min=0.0, max=1.0)
    m = torch.clamp((batch["mask"] + 1.0) / 2.0, min=0.0, max=1.0)
    expected = (1 - m) * img + m * torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(13, 21), (9, 16), (3, 30)])
def test_any_size_keeps_unmasked_pixels(tiny_model, size):
    image, mask = _pair_arrays(*size)
    calls = []
    out = ip.inpaint_array(tiny_model, image, mask, settings=SamplerSettings("ddim", 2, 0.0, 1.0), generator=torch.Generator().manual_seed(0),
                           callback=lambda i, n: calls.append((i, n)))
    fill = mask >= 128
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[~fill] == image[~fill]).all()
    assert (out[fill] != image[fill]).any()
    assert calls == [(1, 2), (2, 2)]


def test_nothing_to_fill_returns_the_image(tiny_model):
    image, _ = _pair_arrays()
    out = ip.inpaint_array(tiny_model, image, np.full(image.shape[:2], 127, np.uint8), settings=SamplerSettings("ddim", 2, 0.0, 1.0))
    assert (out == image).all()


def test_other_samplers_and_seeds(tiny_model):
    image, mask = _pair_arrays()
    runs = {name: ip.inpaint_array(tiny_model, image, mask, settings=SamplerSettings(name, 2, 0.0, 1.0),
                                   generator=torch.Generator().manual_seed(1)) for name in SAMPLERS}
    again = ip.inpaint_array(tiny_model, image, mask, settings=SamplerSettings("ddim", 2, 0.0, 1.0), generator=torch.Generator().manual_seed(1))
    other = ip.inpaint_array(tiny_model, image, mask, settings=SamplerSettings("ddim", 2, 0.0, 1.0), generator=torch.Generator().manual_seed(2))
    assert (runs["ddim"] == again).all() and (runs["ddim"] != other).any()
    assert (runs["ddim"] != runs["dpmpp"]).any()


def test_interrupted_batch_keeps_finished_outputs(tiny_model, tmp_path):
    for name in ("a", "b"):
        _write_pair(tmp_path / "in", name)
    pairs, _ = ip.find_pairs(tmp_path / "in", tmp_path / "out")

    from ldmcli.pipelines.events import ItemStep
    from ldmcli.pipelines.inpaint import inpaint_pairs

    def interrupt_second(event) -> None:
        if isinstance(event, ItemStep) and event.index == 1:
            raise KeyboardInterrupt

    settings = SamplerSettings("ddim", 2, 0.0, 1.0)
    with pytest.raises(KeyboardInterrupt):
        inpaint_pairs(tiny_model, pairs, settings, seed=0, on_event=interrupt_second)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]
    report = inpaint_pairs(tiny_model, pairs, settings, seed=0)
    assert [Path(r["path"]).name for r in report.written] == ["b.png"] and report.skipped == pairs[:1]


def test_rejects_a_model_that_does_not_inpaint(monkeypatch, tmp_path):
    from ldmcli.loading import load_model

    files = write_tiny("sr", tmp_path)
    with pytest.raises(UsageError, match="not an inpainting model"):
        ip.check_inpainting_model(load_model(str(files.config), ckpt=files.ckpt))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_single_pair(cli, monkeypatch, tmp_path):
    install_tiny("inpaint", monkeypatch)
    image, mask = _write_pair(tmp_path, "photo", 13, 21)
    out = tmp_path / "result" / "out.png"
    r = cli("inpaint", image, mask, "-o", out, "--model", TINY, "--sampler", "ddim", "--steps", "2",
            "--seed", "7", "--json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["written"][0]["path"] == str(out) and report["seed"] == 7 and report["failed"] == []
    original, m = ip.load_pair(image, mask)
    result = _read(out)
    assert (result[m < 128] == original[m < 128]).all()
    from ldmcli.output import read_metadata

    meta = read_metadata(out)
    assert meta["seed"] == 7 and meta["steps"] == 2 and meta["sampler"] == "ddim" and meta["image"] == "photo.png"
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no temporary files left

    r = cli("inpaint", image, mask, "-o", out, "--model", TINY, "--sampler", "ddim", "--steps", "2", "--seed", "7")
    assert r.exit_code == 2 and "exists" in r.stderr and str(out) in r.stderr
    out.unlink()
    r = cli("inpaint", image, mask, "-o", out, "--model", TINY, "--sampler", "ddim", "--steps", "2",
            "--seed", "7", "-q")
    assert r.exit_code == 0, r
    assert (_read(out) == result).all()  # the same seed gives the same image


@pytest.mark.parametrize("case", ["mask_not_given", "no_mask", "size", "not_image", "jpg_out", "no_output", "same_as_input",
                                  "sampler", "both_forms", "config_without_ckpt", "nothing"])
def test_cli_single_pair_errors(cli, tmp_path, case):
    image, mask = _write_pair(tmp_path, "photo")
    out = tmp_path / "out.png"
    args = [image, mask, "-o", out]
    expect = None
    if case == "mask_not_given":
        args, expect = [image, "-o", out], "no mask given"
    elif case == "no_mask":
        args, expect = [image, tmp_path / "photo_missing.png", "-o", out], "photo_missing.png: no such file"
    elif case == "size":
        _png(mask, np.zeros((5, 5), np.uint8))
        expect = "mask is 5x5 but its image photo.png is 21x13"
    elif case == "not_image":
        mask.write_bytes(b"\x00garbage")
        expect = f"{mask}: not an image"
    elif case == "jpg_out":
        args, expect = [image, mask, "-o", tmp_path / "out.jpg"], "must be a .png"
    elif case == "no_output":
        args, expect = [image, mask], "-o OUT.png"
    elif case == "same_as_input":
        args, expect = [image, mask, "-o", image, "--overwrite"], "overwrite an input"
    elif case == "sampler":
        args, expect = args + ["--sampler", "euler"], "unknown sampler"
    elif case == "both_forms":
        args, expect = args + ["--indir", tmp_path], "not both"
    elif case == "config_without_ckpt":
        args, expect = args + ["--config", tmp_path / "c.yaml"], "--config needs --ckpt"
    elif case == "nothing":
        args, expect = [], "nothing to inpaint"
    r = cli("inpaint", *args)
    assert r.exit_code == 2, r
    line = r.stderr.strip()
    assert "\n" not in line and expect in line, r
    assert not out.exists()


def test_cli_batch_resumes_and_reports_bad_pairs(cli, monkeypatch, tmp_path):
    install_tiny("inpaint", monkeypatch)
    indir, outdir = tmp_path / "in", tmp_path / "out"
    write_examples(indir, max_side=24)
    (indir / "broken.png").write_text("not a png")
    _png(indir / "broken_mask.png", np.zeros((4, 4), np.uint8))
    _png(indir / "lonely.png", _pair_arrays()[0])
    _write_pair(indir, "wrongsize")
    _png(indir / "wrongsize_mask.png", np.zeros((3, 3), np.uint8))
    args = ["inpaint", "--indir", indir, "--outdir", outdir, "--model", TINY, "--sampler", "ddim", "--steps", "2",
            "--seed", "1"]

    r = cli(*args, "--json")
    assert r.exit_code == 1, r
    report = json.loads(r.stdout)
    assert sorted(Path(w["path"]).name for w in report["written"]) == ["china.png", "flower.png"]
    failed = {Path(f["path"]).name: f["error"] for f in report["failed"]}
    assert set(failed) == {"broken.png", "lonely.png", "wrongsize.png"}
    for name in failed:
        assert name in r.stderr
    assert "3 of 5 pairs failed" in r.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in outdir.iterdir()) == ["china.png", "flower.png"]
    for name in ("china", "flower"):
        original, m = ip.load_pair(indir / f"{name}.png", indir / f"{name}_mask.png")
        assert (_read(outdir / f"{name}.png")[m < 128] == original[m < 128]).all()

    # resumable: existing outputs are skipped, a missing one is redone identically (seed per image)
    china = _read(outdir / "china.png")
    flower_mtime = (outdir / "flower.png").stat().st_mtime_ns
    (outdir / "china.png").unlink()
    for bad in ("broken", "lonely", "wrongsize"):
        (indir / f"{bad}.png").unlink()
    (indir / "broken_mask.png").unlink()
    (indir / "wrongsize_mask.png").unlink()
    r = cli(*args, "--json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert [Path(w["path"]).name for w in report["written"]] == ["china.png"]
    assert report["skipped"] == [str(outdir / "flower.png")]
    assert (_read(outdir / "china.png") == china).all()
    assert (outdir / "flower.png").stat().st_mtime_ns == flower_mtime

    r = cli(*args, "--overwrite", "--json")
    assert r.exit_code == 0, r
    assert len(json.loads(r.stdout)["written"]) == 2


@pytest.mark.parametrize("case", ["empty", "same", "no_outdir", "missing"])
def test_cli_batch_folder_errors(cli, tmp_path, case):
    indir = tmp_path / "in"
    indir.mkdir()
    args = ["--indir", indir, "--outdir", tmp_path / "out"]
    if case == "empty":
        expect = "no images found"
    elif case == "same":
        _write_pair(indir, "a")
        args, expect = ["--indir", indir, "--outdir", indir], "must differ from the input folder"
    elif case == "no_outdir":
        args, expect = ["--indir", indir], "--indir needs --outdir"
    else:
        args, expect = ["--indir", tmp_path / "gone", "--outdir", tmp_path / "out"], "gone: no such folder"
    r = cli("inpaint", *args)
    assert r.exit_code == 2, r
    assert expect in r.stderr and "\n" not in r.stderr.strip()


def test_cli_examples(cli, tmp_path):
    r = cli("inpaint", "--examples", tmp_path / "ex", "--json")
    assert r.exit_code == 0, r
    written = json.loads(r.stdout)["written"]
    assert sorted(Path(p).name for p in written) == ["china.png", "china_mask.png", "flower.png", "flower_mask.png"]
    r = cli("inpaint", "--examples", tmp_path / "ex", "--indir", tmp_path)
    assert r.exit_code == 2 and "give it alone" in r.stderr


def test_cli_rejects_a_model_that_does_not_inpaint(cli, monkeypatch, tmp_path):
    install_tiny("sr", monkeypatch)
    image, mask = _write_pair(tmp_path, "photo")
    r = cli("inpaint", image, mask, "-o", tmp_path / "out.png", "--model", "tiny-sr", "--steps", "2")
    assert r.exit_code == 2 and "not an inpainting model" in r.stderr, r
    assert not (tmp_path / "out.png").exists()

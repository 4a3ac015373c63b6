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
from tinymodels import CONFIGS, install_tiny

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


def test_folder_resumes_converts_and_reports_bad_files(cli, monkeypatch, tmp_path):
    import ldmcli.loading

    install_tiny("sr", monkeypatch)
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    _image(indir / "a.png", 12, 9)
    _image(indir / "b.png", 9, 11, "RGBA", seed=1)
    _image(indir / "c.png", 10, 8, "L", seed=2)
    _image(indir / "d.png", 8, 8, "I;16", seed=3)
    (indir / "bad.png").write_text("not an image")
    (indir / "notes.txt").write_text("ignored: not an image suffix")
    args = ["upscale", "--indir", indir, "--outdir", outdir, "--model", "tiny-sr", "--json", *FAST]
    r = cli(*args)
    assert r.exit_code == 1, r  # the good ones are written, the bad one reported, exit 1 at the end
    report = json.loads(r.stdout)
    assert [Path(w["path"]).name for w in report["written"]] == ["a.png", "b.png", "c.png", "d.png"]
    assert report["failed"] == [{"path": str(indir / "bad.png"), "error": f"{indir / 'bad.png'}: not an image"}]
    conversions = {Path(w["path"]).name: w.get("conversions") for w in report["written"]}
    assert conversions == {"a.png": None, "b.png": ["transparent pixels composited over white"],
                           "c.png": ["greyscale converted to RGB"],
                           "d.png": ["I;16 samples scaled to 8 bits", "greyscale converted to RGB"]}
    assert "b.png: transparent pixels composited over white" in r.stderr  # notes are shown, also in logs
    with Image.open(outdir / "b.png") as image:
        assert image.size == (36, 44)
    first = _pixels(outdir / "a.png")

    # resumable: everything written is skipped, without loading the model
    (indir / "bad.png").unlink()
    monkeypatch.setattr(ldmcli.loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    r = cli(*args)
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["skipped"] == [str(outdir / n) for n in ("a.png", "b.png", "c.png", "d.png")]
    monkeypatch.undo()
    install_tiny("sr", monkeypatch)
    (outdir / "b.png").unlink()
    r = cli(*args, "--overwrite")  # the same seed gives the same pixels (eta 1: seeded noise throughout)
    assert r.exit_code == 0, r
    assert np.array_equal(_pixels(outdir / "a.png"), first)
    assert not list(outdir.glob(".*.tmp"))


def test_patch_wise_progress_and_pre_downsample(monkeypatch, tmp_path):
    from ldmcli.conditioning import superres as sr
    from ldmcli.pipelines import events as ev
    from ldmcli.pipelines import upscale
    from ldmcli.sampling import SamplerSettings

    install_tiny("sr", monkeypatch)
    # the notebook's patches (128 latent pixels, stride 64) scaled down to the tiny model, so that a small input
    # takes several patches (the real numbers are tested in test_superres / test_patchwise)
    monkeypatch.setattr(sr, "NOTEBOOK_SPLIT", {**sr.NOTEBOOK_SPLIT, "ks": (24, 24), "stride": (16, 16)})
    big = _image(tmp_path / "big.png", 40, 36)
    small = _image(tmp_path / "small.png", 12, 10)
    seen: list = []
    request = upscale.UpscaleRequest(images=(big, small), outdir=tmp_path / "out", model="tiny-sr", seed=0,
                                     settings=SamplerSettings("ddim", 2, 1.0, 1.0), device="cpu", precision="fp32")
    report = upscale.run(request, seen.append)
    assert [(w["width"], w["height"], w["patches"]) for w in report.written] == [(160, 144, 4), (48, 40, 1)]
    patches = [(e.index, e.stage, e.done, e.patches) for e in seen if isinstance(e, ev.ItemPatches)]
    # 40 x 36 latent pixels: patches of 24 at 0 and 16 across, at 0 and 12 (flush with the far edge) down
    assert [p for p in patches if p[1] == "unet"] == [(0, "unet", k, 4) for k in range(1, 5)] * 2  # 2 steps
    assert [p for p in patches if p[1] == "decode"][-1] == (0, "decode", 4, 4)
    assert not [p for p in patches if p[0] == 1]  # 4 x 12 < 128: the whole image at once
    kinds = [type(e).__name__ for e in seen if not isinstance(e, (ev.Message, ev.ItemPatches))]
    assert kinds == ["ItemStarted", "ItemStep", "ItemStep", "ItemDone"] * 2

    request = upscale.UpscaleRequest(images=(big,), output=tmp_path / "x2.png", model="tiny-sr", seed=0,
                                     pre_downsample=2, settings=SamplerSettings("ddim", 1, 1.0, 1.0), device="cpu",
                                     precision="fp32")
    assert upscale.run(request).written[0]["width"] == 80  # 40 / 2 * 4: the output is 2x the input


BAD = [
    (["{small}", "-o", "{out}"], "image too small: 7x20 px; LDSR needs at least 8 px a side"),
    (["{ok}", "-o", "{out}", "--pre-downsample", "3"], "--pre-downsample must be 1, 2 or 4"),
    (["{ok}", "-o", "{out}", "--pre-downsample", "4"], "image too small: 4x3 px after downsampling by 4"),
    (["{text}", "-o", "{out}"], "not an image"),
    (["{missing}", "-o", "{out}"], "no such file"),
    (["{ok}", "-o", "{jpg}"], "must be a .png"),
    (["{ok}", "{ok2}", "-o", "{out}"], "one image"),
    (["{ok}", "{ok_dup}", "--outdir", "{outdir}"], "would both be written"),
    (["{ok}", "-o", "{ok}"], "would overwrite its input"),
    (["{ok}", "-o", "{exists}"], "exists (overwrite replaces it)"),
    (["--indir", "{indir}"], "--outdir"),
    (["--indir", "{empty}", "--outdir", "{outdir}"], "holds no images"),
    (["--indir", "{indir}", "--outdir", "{indir}"], "must differ"),
    (["{ok}", "--indir", "{indir}", "--outdir", "{outdir}"], "not both"),
    ([], "nothing to upscale"),
    (["{ok}", "-o", "{out}", "--sampler", "ddpm"], "1000-step"),
    (["{ok}", "-o", "{out}", "--steps", "0"], "--steps"),
    (["{ok}", "-o", "{out}", "--patch-batch", "0"], "--patch-batch"),
    (["{ok}", "-o", "{out}", "--model", "tiny-uncond"], "not a super-resolution model"),
    (["{ok}", "-o", "{out}", "--model", "no-such-model"], "no-such-model"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_input_is_a_one_line_usage_error_before_loading(cli, monkeypatch, tmp_path, args, message):
    import ldmcli.loading
    from test_txt2img import register_config_only

    for family in ("sr", "uncond"):
        (tmp_path / f"{family}.yaml").write_text(CONFIGS[family], encoding="utf-8")
        register_config_only(monkeypatch, tmp_path, family)
    monkeypatch.setattr(ldmcli.loading, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "indir").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "dup").mkdir()
    subs = {"{small}": _image(tmp_path / "small.png", 7, 20), "{ok}": _image(tmp_path / "indir" / "ok.png", 16, 12),
            "{ok2}": _image(tmp_path / "ok2.png", 16, 12), "{ok_dup}": _image(tmp_path / "dup" / "ok.jpg", 16, 12),
            "{text}": tmp_path / "text.png", "{missing}": tmp_path / "missing.png", "{out}": tmp_path / "res.png",
            "{jpg}": tmp_path / "res.jpg", "{exists}": _image(tmp_path / "exists.png", 8, 8),
            "{outdir}": tmp_path / "outdir", "{indir}": tmp_path / "indir", "{empty}": tmp_path / "empty"}
    subs["{text}"].write_text("not an image")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = cli("upscale", *[subs.get(a, a) for a in args], *([] if "--model" in args else ["--model", "tiny-sr"]))
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ldm: error:"), r.stderr
    assert message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("interactive", [True, False])
def test_renderer_shows_patches_and_steps(interactive):
    import io

    from rich.console import Console

    from ldmcli.commands.upscale import UpscaleRenderer
    from ldmcli.pipelines import events as ev

    renderer = UpscaleRenderer()
    renderer.interactive = interactive
    renderer.console = Console(file=io.StringIO(), force_terminal=interactive, width=120)
    with renderer:
        renderer(ev.ItemStarted(0, 2, "big.png"))
        for done in (1, 2, 3, 4):
            renderer(ev.ItemPatches(0, 2, "unet", done, 4))
        renderer(ev.ItemStep(0, 2, 1, 1))
        for done in (1, 2):
            renderer(ev.ItemPatches(0, 2, "decode", done, 2))
        renderer(ev.ItemDone(0, 2, Path("out/big.png"), 1.5))
        renderer(ev.ItemStarted(1, 2, "small.png"))
        renderer(ev.ItemStep(1, 2, 1, 1))  # not patch-wise: no step line in a log
        renderer(ev.ItemDone(1, 2, Path("out/small.png"), 0.5))
    text = renderer.console.file.getvalue()
    if interactive:
        assert "decode patches" in text and "small.png" in text
    else:
        assert text.splitlines() == ["ldm: [1/2] step 1/1", "ldm: [1/2] decode: 2 patches done",
                                     "ldm: [1/2] wrote out/big.png (1.5 s)", "ldm: [2/2] wrote out/small.png (0.5 s)"]


@pytest.mark.parametrize("size", [(10, 13), (36, 40)], ids=["whole", "patch-wise"])
def test_same_pixels_as_the_notebook_flow(monkeypatch, tmp_path, size):
    """upscale_array equals upstream's notebook flow written with the upstream-API DDIMSampler (eta 1, the same
    seeded generator, EMA weights, split_input_params set on the model, decode_first_stage, crop)."""
    import torch

    from ldmcli import DDIMSampler
    from ldmcli.conditioning import superres as sr
    from ldmcli.output import to_uint8
    from ldmcli.pipelines.upscale import upscale_array
    from ldmcli.sampling import SamplerSettings
    from tinymodels import build_tiny

    monkeypatch.setattr(sr, "NOTEBOOK_SPLIT", {**sr.NOTEBOOK_SPLIT, "ks": (24, 24), "stride": (16, 16)})
    m = build_tiny("sr", tmp_path).eval()
    h, w = size
    lowres = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    plan = sr.plan_upscale(h, w, multiple=2)
    assert (plan.split_input_params is None) == (h == 10)
    c = sr.pad_to_multiple(sr.lowres_condition(lowres), 2)
    with torch.no_grad(), m.ema_scope():
        m.split_input_params = plan.split_input_params
        z, _ = DDIMSampler(m).sample(S=3, batch_size=1, shape=plan.latent_shape, conditioning=c, eta=1.0,
                                     verbose=False, generator=torch.Generator().manual_seed(1))
        notebook = to_uint8(sr.crop_output(m.decode_first_stage(z), plan))[0]
        ours, ours_plan = upscale_array(m, lowres, SamplerSettings("ddim", 3, 1.0, 1.0), seed=1)
    assert ours_plan == plan and ours.shape == (4 * h, 4 * w, 3)
    assert np.array_equal(ours, notebook)
    # upscale_array puts the caller's split_input_params back
    assert (getattr(m, "split_input_params", None) is None) == (plan.split_input_params is None)
    del m.split_input_params
    upscale_array(m, lowres, SamplerSettings("ddim", 1, 1.0, 1.0))
    assert not hasattr(m, "split_input_params")

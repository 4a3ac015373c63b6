"""``ldm sample`` end to end on tiny random-weight unconditional and class-conditional models (zoo entries, -r run
folders laid out as ``ldm train-ldm`` writes them), and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmcli.output import read_metadata
from test_txt2img import config_dir, register_config_only  # noqa: F401 (config_dir is a fixture)
from tinymodels import install_tiny, write_tiny

FAST = ["--precision", "fp32", "--device", "cpu"]


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_unconditional_layout_defaults_and_seeds(cli, monkeypatch, tmp_path):
    install_tiny("uncond", monkeypatch)
    out = tmp_path / "out"
    args = ["sample", "tiny-uncond", "-n", "3", "--batch_size", "2", "--sampler", "ddim", "-c", "3", "--seed", "5",
            "--json", *FAST]
    r = cli(*args, "--logdir", out)
    assert r.exit_code == 0, r
    records = _records(r.stdout)
    assert [Path(x["path"]).relative_to(out).as_posix() for x in records] == [
        "samples/00000.png", "samples/00001.png", "samples/00002.png", "grid-0000.png"]
    meta = read_metadata(out / "samples" / "00002.png")
    assert meta["command"] == "sample" and meta["sampler"] == "ddim" and meta["eta"] == 1.0  # upstream's DDIM eta
    assert meta["seed"] == 7 and meta["steps"] == 3 and meta["height"] == 32 and meta["model"] == "tiny-uncond"
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # rows of batch_size (2) images
    # eta 1 is stochastic, yet the same seed gives the same pixels; numbering continues
    r = cli(*args, "--logdir", out)
    assert r.exit_code == 0, r
    assert [Path(x["path"]).name for x in _records(r.stdout)][:3] == ["00003.png", "00004.png", "00005.png"]
    for a, b in ((0, 3), (1, 4), (2, 5)):
        assert np.array_equal(_pixels(out / "samples" / f"{a:05d}.png"), _pixels(out / "samples" / f"{b:05d}.png"))


def test_class_conditional_with_guidance_uses_the_null_class(cli, monkeypatch, tmp_path):
    from ldmcli.models.ddpm import LatentDiffusion

    install_tiny("cin", monkeypatch)  # 11 classes: 0-9 and the null class 10
    labels: list[list[int]] = []
    original = LatentDiffusion.get_learned_conditioning

    def spy(self, c):
        labels.append(c[self.cond_stage_key].tolist())
        return original(self, c)

    monkeypatch.setattr(LatentDiffusion, "get_learned_conditioning", spy)
    r = cli("sample", "tiny-cin", "--class", "3", "--class", "7", "-n", "2", "--scale", "3.0", "-c", "2",
            "--sampler", "dpmpp", "--seed", "1", "--logdir", tmp_path / "out", "--json", *FAST)
    assert r.exit_code == 0, r
    samples = [x for x in _records(r.stdout) if x["kind"] == "sample"]
    assert [(x["class"], x["seed"]) for x in samples] == [(3, 1), (3, 2), (7, 3), (7, 4)]
    assert samples[0]["null_class"] == 10 and samples[0]["scale"] == 3.0 and samples[0]["eta"] == 0.0
    assert labels == [[3, 3, 7, 7], [10, 10, 10, 10]]
    with Image.open(tmp_path / "out" / "grid-0000.png") as grid:
        assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # one row per class


def test_resume_a_train_ldm_run_folder_or_checkpoint(cli, tmp_path, monkeypatch):
    run = tmp_path / "logs" / "2026-01-01T00-00-00_tiny"
    (run / "checkpoints").mkdir(parents=True)
    files = write_tiny("uncond", run, ckpt_name="checkpoints/last.ckpt")
    (run / "checkpoints" / "config.yaml").write_text(files.config.read_text())
    for target in (run, run / "checkpoints" / "last.ckpt"):
        r = cli("sample", "-r", target, "-n", "1", "-c", "2", "--skip-grid", "--logdir", tmp_path / "out", "--json",
                *FAST)
        assert r.exit_code == 0, r
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == ["00000.png", "00001.png"]
    monkeypatch.chdir(tmp_path)
    r = cli("sample", "-r", run, "-n", "1", "-c", "2", "--skip-grid", *FAST)
    assert r.exit_code == 0, r
    assert (tmp_path / "outputs" / f"{run.name}-samples" / "samples" / "00000.png").is_file()  # the default outdir


def test_default_sampler_is_auto(cli, monkeypatch, tmp_path):
    """No --sampler: the measured choice for the guidance scale (fewest calls at 50 DDIM steps' accuracy), recorded
    as what ran, with eta 0 (DDIM's eta 1 default belongs to --sampler ddim)."""
    from ldmcli.sampling.auto import auto_choice

    install_tiny("uncond", monkeypatch)
    r = cli("sample", "tiny-uncond", "-n", "1", "--seed", "0", "--json", "--logdir", tmp_path / "out", *FAST)
    assert r.exit_code == 0, r
    meta = _records(r.stdout)[0]
    sampler, steps, spacing = auto_choice(1.0)
    assert meta["sampler_requested"] == "auto" and meta["eta"] == 0.0
    assert (meta["sampler"], meta["steps"], meta["spacing"]) == (sampler, steps, spacing)


def test_vanilla_sample_runs_the_full_ddpm_chain(cli, monkeypatch, tmp_path):
    from dataclasses import replace

    from ldmcli.pipelines import generation as generate
    from ldmcli.sampling import SAMPLERS

    seen = {}

    def fake_ddpm(eps, x, schedule, grid, **kwargs):
        seen["steps"] = len(grid) - 1
        for i in range(3):
            kwargs["callback"](generate.SamplerStep(i, 1000, 999 - i, x, x))
        return x

    monkeypatch.setitem(SAMPLERS, "ddpm", replace(SAMPLERS["ddpm"], sample_fn=fake_ddpm))
    install_tiny("uncond", monkeypatch)
    r = cli("sample", "tiny-uncond", "-n", "1", "--vanilla_sample", "--logdir", tmp_path / "out", "--json", *FAST)
    assert r.exit_code == 0, r
    meta = _records(r.stdout)[0]
    assert seen["steps"] == 1000 and meta["sampler"] == "ddpm" and meta["steps"] == 1000 and meta["eta"] == 0.0


BAD = [
    (["tiny-cin", "--class", "10"], "out of range"),  # 10 is the null class
    (["tiny-cin", "--class", "-1"], "out of range"),
    (["tiny-cin", "--scale", "3"], "no class given"),  # no class: unconditional (null class), without guidance
    (["tiny-uncond", "--class", "1"], "unconditional"),
    (["tiny-uncond", "--scale", "2"], "unconditional"),
    (["cin256", "--class", "1", "--scale", "3"], "null class"),  # upstream cin256 has 1000 classes, none null
    (["cin256-v2", "--class", "1000"], "out of range"),
    (["cin256-v2", "--class", "999", "--null-class", "1001"], "--null-class"),
    (["txt2img-f8-large"], "ldm txt2img"),
    (["tiny-uncond", "-n", "0"], "--n_samples"),
    (["tiny-uncond", "--batch_size", "0"], "--batch_size"),
    (["tiny-uncond", "-c", "0"], "steps"),
    (["tiny-uncond", "-c", "5000"], "steps"),
    (["tiny-uncond", "-e", "-0.5"], "eta"),
    (["tiny-uncond", "--sampler", "plms", "-e", "0.5"], "eta"),
    (["tiny-uncond", "--sampler", "heun"], "unknown sampler"),
    (["tiny-uncond", "--vanilla_sample", "--sampler", "ddim"], "conflicts"),
    (["tiny-uncond", "--n_rows", "-1"], "--n_rows"),
    (["tiny-uncond", "-r", "{run}"], "not both"),
    ([], "MODEL"),
    (["-r", "{missing}"], "cannot find"),
    (["-r", "{empty}"], "model.ckpt"),
    (["no-such-model"], "no-such-model"),
    (["tiny-uncond", "--precision", "fp16"], "fp16"),
    (["tiny-uncond", "--seed", "-3"], "--seed"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_input_is_a_one_line_usage_error_before_loading(cli, config_dir, monkeypatch, tmp_path, args, message):
    import ldmcli.loading

    register_config_only(monkeypatch, config_dir, "cin")
    register_config_only(monkeypatch, config_dir, "uncond")

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ldmcli.loading, "load", no_loading)
    (tmp_path / "empty").mkdir()
    subs = {"{run}": str(tmp_path), "{missing}": str(tmp_path / "missing"), "{empty}": str(tmp_path / "empty")}
    r = cli("sample", *[subs.get(a, a) for a in args], "--logdir", tmp_path / "out")
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ldm: error:"), r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()

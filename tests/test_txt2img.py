"""``ldm txt2img`` end to end on a tiny random-weight text model served through the zoo (or --config/--ckpt):
layout, numbering, metadata, --json, seeds, conditioning once per prompt, Ctrl-C, torchrun, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmcli.output import read_metadata
from tinymodels import CONFIGS, install_bert_vocab, install_tiny, write_tiny

FAST = ["--H", "32", "--W", "32", "--sampler", "ddim", "--ddim_steps", "3", "--precision", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """Tiny configs only (no weights) for the tests that must fail before any loading."""
    folder = tmp_path_factory.mktemp("configs")
    for family in ("txt2img", "cin", "uncond"):
        (folder / f"{family}.yaml").write_text(CONFIGS[family], encoding="utf-8")
    return folder


def register_config_only(monkeypatch, config_dir: Path, family: str) -> Path:
    """A zoo entry ``tiny-<family>`` whose config is known but whose weights were never written: enough for every
    check that happens before loading (and loading it would fail)."""
    from ldmcli import zoo

    name = f"tiny-{family}"
    entry = zoo.ZooEntry(name=name, kind="ldm", dest=f"models/ldm/{name}",
                         files=(zoo.ZooFile(f"https://example.invalid/{name}/model.ckpt", "model.ckpt"),),
                         contents=("model.ckpt",), checkpoint="model.ckpt",
                         config_path=str(config_dir / f"{family}.yaml"), description=f"tiny {family} config for tests")
    monkeypatch.setitem(zoo.REGISTRY, name, entry)
    return config_dir / f"{family}.yaml"


@pytest.fixture
def tiny(monkeypatch):
    return install_tiny("txt2img", monkeypatch)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_layout_metadata_json_and_numbering_across_runs(cli, tiny, tmp_path):
    out = tmp_path / "out"
    r = cli("txt2img", "a red cube", "--model", "tiny-txt2img", "--n_samples", "2", "--seed", "7", "--outdir", out,
            "--json", *FAST)
    assert r.exit_code == 0, r
    records = _records(r.stdout)
    assert [Path(rec["path"]).relative_to(out).as_posix() for rec in records] == [
        "samples/00000.png", "samples/00001.png", "grid-0000.png"]
    assert [rec["kind"] for rec in records] == ["sample", "sample", "grid"]
    meta = read_metadata(out / "samples" / "00001.png")
    assert meta == {k: v for k, v in records[1].items() if k not in ("path", "kind")}
    assert meta["prompt"] == "a red cube" and meta["seed"] == 8 and meta["base_seed"] == 7
    assert meta["sampler"] == "ddim" and meta["steps"] == 3 and meta["scale"] == 5.0 and meta["eta"] == 0.0
    assert meta["height"] == 32 and meta["width"] == 32 and meta["model"] == "tiny-txt2img"
    assert meta["checkpoint_sha256"] == __import__("hashlib").sha256(tiny.ckpt.read_bytes()).hexdigest()
    assert meta["ldmcli_version"] == __import__("ldmcli").__version__ and meta["precision"] == "float32"
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (2 * 34 + 2, 34 + 2)  # one row of two 32 px images, torchvision's 2 px padding
    assert "wrote 2 images and 1 grid" in r.stderr  # the summary, and nothing else off a terminal
    assert len(r.stderr.strip().splitlines()) <= 2

    r = cli("txt2img", "--prompt", "a red cube", "--model", "tiny-txt2img", "--n_samples", "1", "--n_iter", "2",
            "--seed", "7", "--outdir", out, "--json", *FAST)
    assert r.exit_code == 0, r
    assert [Path(rec["path"]).name for rec in _records(r.stdout)] == ["00002.png", "00003.png", "grid-0001.png"]
    # same seed and prompt: image 0 of both runs is the same image; the second run's second image has seed 8
    assert np.array_equal(_pixels(out / "samples" / "00002.png"), _pixels(out / "samples" / "00000.png"))
    assert read_metadata(out / "samples" / "00003.png")["seed"] == 8
    # the same seed in a batch of one instead of two: equal up to the batch's float rounding
    diff = _pixels(out / "samples" / "00003.png").astype(int) - _pixels(out / "samples" / "00001.png")
    assert np.abs(diff).max() <= 2
    assert not list(out.rglob(".*"))


def test_seed_reproducibility_and_samplers(cli, tiny, tmp_path):
    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "2"]), ("plms", ["--sampler", "plms"]),
                        ("dpmpp", ["--sampler", "dpmpp"]), ("eta", ["--ddim_eta", "1.0"]), ("eta2", ["--eta", "1.0"])):
        seed = [] if "--seed" in extra else ["--seed", "1"]
        r = cli("txt2img", "a tree", "--model", "tiny-txt2img", "--n_samples", "1", "--skip-grid", "--outdir",
                tmp_path / name, *seed, *FAST, *extra)
        assert r.exit_code == 0, r
        assert sorted(p.name for p in (tmp_path / name).rglob("*.png")) == ["00000.png"]
        runs[name] = _pixels(tmp_path / name / "samples" / "00000.png")
        assert read_metadata(tmp_path / name / "samples" / "00000.png")["sampler"] == {
            "plms": "plms", "dpmpp": "dpmpp"}.get(name, "ddim")
    assert np.array_equal(runs["a"], runs["b"])
    assert np.array_equal(runs["eta"], runs["eta2"])  # stochastic DDIM: the noise comes from the seed too
    for other in ("c", "plms", "dpmpp", "eta"):
        assert not np.array_equal(runs["a"], runs[other]), other


def test_from_file_conditions_once_per_distinct_prompt(cli, tiny, tmp_path, monkeypatch):
    from ldmcli.models.ddpm import LatentDiffusion

    seen: list[list[str]] = []
    original = LatentDiffusion.get_learned_conditioning

    def spy(self, c):
        seen.append(list(c))
        return original(self, c)

    monkeypatch.setattr(LatentDiffusion, "get_learned_conditioning", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\na cat\na dog\n", encoding="utf-8")
    r = cli("txt2img", "--from-file", prompts, "--model", "tiny-txt2img", "--n_samples", "2", "--n_iter", "2",
            "--seed", "100", "--outdir", tmp_path / "out", "--json", *FAST)
    assert r.exit_code == 0, r
    samples = [rec for rec in _records(r.stdout) if rec["kind"] == "sample"]
    assert [(s["prompt"], s["prompt_index"], s["seed"]) for s in samples] == [
        ("a dog", 0, 100), ("a cat", 1, 101), ("a dog", 2, 102),
        ("a dog", 0, 103), ("a cat", 1, 104), ("a dog", 2, 105)]
    encoded = [p for call in seen for p in call]
    assert sorted(encoded) == ["", "a cat", "a dog"]  # each distinct prompt once, the empty prompt once per run


def test_config_and_ckpt_paths(cli, tmp_path):
    install_bert_vocab()
    files = write_tiny("txt2img", tmp_path / "m")
    r = cli("txt2img", "x", "--config", files.config, "--ckpt", files.ckpt, "--n_samples", "1", "--skip-grid",
            "--scale", "1", "--outdir", tmp_path / "out", "--json", *FAST)
    assert r.exit_code == 0, r
    (record,) = _records(r.stdout)
    assert record["model"] == str(files.ckpt) and record["scale"] == 1.0


def test_ctrl_c_keeps_finished_images(cli, tiny, tmp_path, monkeypatch):
    from ldmcli.pipelines import generation as generate

    calls = {"n": 0}
    original = generate.sample_latents

    def interrupt_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(generate, "sample_latents", interrupt_second_batch)
    out = tmp_path / "out"
    r = cli("txt2img", "a cat", "--model", "tiny-txt2img", "--n_samples", "2", "--n_iter", "3", "--outdir", out,
            *FAST)
    assert r.exit_code == 130, r
    assert sorted(p.name for p in out.rglob("*.png")) == ["00000.png", "00001.png"]  # batch 1 kept, no grid
    for p in out.rglob("*.png"):
        assert _pixels(p).shape == (32, 32, 3)
    assert not list(out.rglob(".*"))
    assert "interrupted: kept 2 images" in r.stderr


def test_progress_bar_on_a_terminal(cli, tiny, tmp_path, monkeypatch):
    """On a terminal: one bar over all steps of the run (2 batches x 3 steps) with images/s, on stderr."""
    import ldmcli.commands._render as command

    monkeypatch.setattr(command, "is_interactive", lambda: True)
    r = cli("txt2img", "a cat", "--model", "tiny-txt2img", "--n_samples", "1", "--n_iter", "2", "--outdir",
            tmp_path / "out", *FAST)
    assert r.exit_code == 0, r
    assert "sampling" in r.stderr and "6/6" in r.stderr and "images/s" in r.stderr, r.stderr
    assert r.stdout == ""


BAD_INPUTS = [
    (["a", "--H", "30"], "multiples of"),
    (["a", "--W", "36"], "multiples of"),
    (["a", "--H", "0"], "positive"),
    (["a", "--n_samples", "0"], "--n_samples"),
    (["a", "--n_samples", "-2"], "--n_samples"),
    (["a", "--n_iter", "0"], "--n_iter"),
    (["a", "--n_rows", "-1"], "--n_rows"),
    (["a", "--ddim_steps", "0"], "steps"),
    (["a", "--ddim_steps", "1001"], "steps"),
    (["--from-file", "{empty}"], "no prompts"),
    (["--from-file", "{missing}"], "cannot read"),
    (["a", "--plms", "--ddim_eta", "0.5"], "eta"),
    (["a", "--sampler", "dpmpp", "--ddim_eta", "0.3"], "eta"),
    (["a", "--ddim_eta", "-1"], "eta"),
    (["a", "--sampler", "euler"], "unknown sampler"),
    (["a", "--plms", "--sampler", "ddim"], "conflicts"),
    (["   "], "empty"),
    ([], "PROMPT"),
    (["a", "--prompt", "b"], "not PROMPT and --prompt"),
    (["a", "--from-file", "{empty}"], "not PROMPT and --from-file"),
    (["a", "--model", "no-such-model"], "no-such-model"),
    (["a", "--model", "tiny-cin"], "not a text-to-image model"),
    (["a", "--model", "kl-f8"], "not a diffusion model"),
    (["a", "--precision", "fp16"], "fp16"),
    (["a", "--precision", "fp64"], "precision"),
    (["a", "--device", "tpu"], "device"),
    (["a", "--config", "{missing}"], "--config"),
    (["a", "--config", "{config}"], "--ckpt"),
    (["a", "--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) or "no-prompt" for a, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_usage_error_before_loading(cli, config_dir, tmp_path, monkeypatch, args, message):
    import ldmcli.loading

    text_config = register_config_only(monkeypatch, config_dir, "txt2img")
    register_config_only(monkeypatch, config_dir, "cin")

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ldmcli.loading, "load", no_loading)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    subs = {"{empty}": str(tmp_path / "empty.txt"), "{missing}": str(tmp_path / "missing.txt"),
            "{config}": str(text_config)}
    args = [subs.get(a, a) for a in args]
    defaults = [] if "--H" in args or "--W" in args else ["--H", "32", "--W", "32"]
    model = [] if "--model" in args or "--config" in args else ["--model", "tiny-txt2img"]
    r = cli("txt2img", *args, *model, *defaults, "--outdir", tmp_path / "out")
    assert r.exit_code == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ldm: error:"), r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_images_of_one_rank(tmp_path):
    """2 processes (gloo on the CPU) split the --from-file prompts; every prompt gets the same image as in a 1-rank
    run, and the two ranks writing into one folder never take the same file name."""
    install_bert_vocab()
    files = write_tiny("txt2img", tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(5)) + "\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = ["txt2img", "--from-file", str(prompts), "--config", str(files.config), "--ckpt", str(files.ckpt),
              "--n_samples", "2", "--seed", "11", "--json", *FAST]

    def run(launcher: list[str], out: Path) -> list[dict]:
        proc = subprocess.run([*launcher, *common, "--outdir", str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _records(proc.stdout)

    one = run([sys.executable, "-m", "ldmcli"], tmp_path / "one")
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ldmcli"], tmp_path / "two")

    def by_prompt(records):
        return {(r["prompt_index"], r["seed"]): r["path"] for r in records if r["kind"] == "sample"}

    a, b = by_prompt(one), by_prompt(two)
    assert sorted(a) == sorted(b) == [(i, 11 + i) for i in range(5)]
    for key in a:
        assert np.array_equal(_pixels(Path(a[key])), _pixels(Path(b[key]))), key
    names = sorted(Path(p).name for p in b.values())
    assert names == [f"{i:05d}.png" for i in range(5)]  # 5 distinct names, no overwrites
    assert len([r for r in two if r["kind"] == "grid"]) == 2  # one grid per rank

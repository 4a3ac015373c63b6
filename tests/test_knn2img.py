"""``ldm knn2img`` end to end on a tiny random RDM and a tiny CLIP, and the RDM conditioning it builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_clip import save_tiny_clip
from test_retrieval import clustered, make_db
from tinymodels import install_tiny

from ldmcli import paths
from ldmcli.output import read_metadata
from ldmcli.retrieval import Retriever, exact_search

DIM = 64  # the tiny RDM's context width


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", dim=DIM)


@pytest.fixture
def rdm(monkeypatch):
    return install_tiny("rdm", monkeypatch)


def run(cli, clip_dir, outdir, *args):
    sampler = [] if "--plms" in args else ["--sampler", "ddim"]  # pinned DDIM numbers unless the test asks for PLMS
    return cli("knn2img", *args, "--model", "tiny-rdm", "--clip", clip_dir, "--H", "32", "--W", "32", *sampler,
               "--ddim_steps", "2", "--device", "cpu", "--outdir", outdir, "--quiet", "--json")


def test_rdm_conditioning_appends_normalised_neighbours():
    from ldmcli.retrieval.conditioning import rdm_conditioning

    x = clustered(300, dim=DIM)
    make_db(paths.databases_dir() / "c", x)
    retriever = Retriever.open("c")
    query = torch.nn.functional.normalize(torch.from_numpy(x[:2] + 0.1), dim=1)
    out = rdm_conditioning(query, retriever=retriever, knn=4, scale=5.0)
    assert out.cond.shape == (2, 5, DIM)
    torch.testing.assert_close(out.cond[:, 0], query)
    data = x / np.linalg.norm(x, axis=1, keepdims=True)
    nn_index = exact_search(data, query.numpy(), 4)
    np.testing.assert_array_equal(out.neighbours.indices, nn_index)
    torch.testing.assert_close(out.cond[:, 1:], torch.from_numpy(data[nn_index]))
    assert torch.equal(out.uncond, torch.zeros(2, 5, DIM))
    text_only = rdm_conditioning(query, scale=1.0)
    assert text_only.cond.shape == (2, 1, DIM) and text_only.uncond is None


def test_text_only_writes_samples_grid_and_settings_reproducibly(cli, clip_dir, rdm, tmp_path):
    out = tmp_path / "out"
    r = run(cli, clip_dir, out, "a painting of the sea", "--n_samples", "2", "--seed", "7")
    assert r.exit_code == 0, r
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["kind"] for rec in records] == ["sample", "sample", "grid"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    meta = read_metadata(out / "samples" / "00001.png")
    assert meta["prompt"] == "a painting of the sea" and meta["seed"] == 8 and meta["knn"] == 0
    assert meta["model"] == "tiny-rdm" and meta["scale"] == 5.0 and meta["sampler"] == "ddim"
    assert (meta["height"], meta["width"], meta["base_seed"], meta["command"]) == (32, 32, 7, "knn2img")
    # same seed again: the same pixels, under new names (nothing overwritten)
    r = run(cli, clip_dir, out, "a painting of the sea", "--n_samples", "2", "--seed", "7", "--skip_grid")
    assert r.exit_code == 0, r
    from PIL import Image

    first = np.asarray(Image.open(out / "samples" / "00000.png"))
    again = np.asarray(Image.open(out / "samples" / "00002.png"))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (32, 32, 3)
    assert not (out / "grid-0001.png").exists()


def test_neighbours_from_a_small_database_and_a_built_searcher(cli, clip_dir, rdm, tmp_path):
    make_db(paths.databases_dir() / "tiny-db", clustered(300, dim=DIM))  # searcher fitted on the fly
    out = tmp_path / "out"
    r = run(cli, clip_dir, out, "a cat", "--use-neighbors", "--knn", "3", "--database", "tiny-db", "--n_samples",
            "1", "--seed", "0", "--plms")
    assert r.exit_code == 0, r
    meta = read_metadata(out / "samples" / "00000.png")
    assert meta["database"] == "tiny-db" and meta["knn"] == 3 and len(meta["neighbors"]) == 3
    assert meta["sampler"] == "plms"
    without = run(cli, clip_dir, out, "a cat", "--n_samples", "1", "--seed", "0", "--plms")
    assert without.exit_code == 0, without
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(out / "samples" / "00000.png")),
                              np.asarray(Image.open(out / "samples" / "00001.png")))
    # a database with a saved (tree) searcher, built through the CLI with lowered thresholds
    make_db(paths.databases_dir() / "tree-db", clustered(2500, dim=DIM), shards=2)
    r = cli("build-index", "tree-db", "--brute-force-below", "1000", "--tree-from", "2000", "--queries", "100", "-q")
    assert r.exit_code == 0, r
    r = run(cli, clip_dir, out, "--from-file", _prompts(tmp_path, ["one", "two", "three"]), "--use_neighbors",
            "--knn", "20", "--database", "tree-db", "--n_samples", "2", "--skip_grid")
    assert r.exit_code == 0, r
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt"] for rec in records] == ["one", "two", "three"]
    assert all(len(rec["neighbors"]) == 20 for rec in records)


def _prompts(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_image_variations(cli, clip_dir, rdm, tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "q.png")
    r = run(cli, clip_dir, tmp_path / "out", "--image", tmp_path / "q.png", "--n_samples", "2", "--n_iter", "2",
            "--seed", "3", "--scale", "1.0")
    assert r.exit_code == 0, r
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["kind"] for rec in records] == ["sample", "sample", "sample", "sample", "grid"]
    assert records[0]["image"] == str(tmp_path / "q.png") and records[0]["prompt"] is None
    assert [rec["seed"] for rec in records if rec["kind"] == "sample"] == [3, 4, 5, 6]


BAD = [
    (["--knn", "0", "--use-neighbors", "x"], "--knn must be between 1 and 20"),
    (["--knn", "21", "--use-neighbors", "x"], "--knn must be between 1 and 20"),
    (["--use-neighbors", "--database", "nope", "x"], "unknown database 'nope'"),
    (["--use-neighbors", "--database", "small", "--knn", "20", "x"], "larger than database 'small'"),
    (["--use-neighbors", "--database", "wrongdim", "x"], "32-d embeddings but the CLIP model gives 64-d"),
    (["--use-neighbors", "--database", "broken", "x"], "not a readable .npz"),
    (["--use-neighbors", "--database", "big", "x"], "ldm build-index big"),
    ([], "give a PROMPT"),
    (["x", "--image", "q.png"], "not PROMPT and --image"),
    (["--image", "missing.png"], "cannot read image"),
    (["--from-file", "missing.txt"], "--from-file: cannot read"),
    (["x", "--plms", "--ddim_eta", "0.5"], "eta applies to DDIM only"),
    (["x", "--H", "36"], "multiples of"),
    (["x", "--H", "65536", "--W", "65536"], "65536x65536 images need at least"),
    (["x", "--model", "tiny-cin"], "not a retrieval-augmented model"),
    (["x", "--model", "no-such-model"], "no-such-model"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_fails_before_loading_the_model(cli, clip_dir, rdm, tmp_path, monkeypatch, args, message):
    install_tiny("cin", monkeypatch)
    import ldmcli.loading

    def no_loading(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(ldmcli.loading, "load", no_loading)
    monkeypatch.chdir(tmp_path)
    make_db(paths.databases_dir() / "small", clustered(10, dim=DIM))
    make_db(paths.databases_dir() / "wrongdim", clustered(10, dim=32))
    (paths.databases_dir() / "broken").mkdir()
    (paths.databases_dir() / "broken" / "a.npz").write_bytes(b"garbage")
    if "big" in args:
        make_db(paths.databases_dir() / "big", np.zeros((20_000, DIM), dtype=np.float32) + 1)
    if args[:1] == ["x"] and "q.png" in args:
        (tmp_path / "q.png").write_bytes(b"")
    argv = ["knn2img", *args, "--clip", clip_dir, "--device", "cpu"]
    if "--model" not in args:
        argv += ["--model", "tiny-rdm"]
    if "--H" not in args:
        argv += ["--H", "32", "--W", "32"]
    r = cli(*argv)
    assert r.exit_code in (1, 2), r
    assert len(r.stderr.strip().splitlines()) == 1, r
    assert message in r.stderr, r
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_prompts(clip_dir, tmp_path):
    """2 processes (gloo on the CPU) split the --from-file prompts, each with its own searcher over the database;
    every prompt gets the same image and neighbours as in a 1-rank run, and no file name is taken twice."""
    import os
    import subprocess
    import sys

    from PIL import Image
    from tinymodels import write_tiny

    files = write_tiny("rdm", tmp_path / "m")
    make_db(paths.databases_dir() / "tiny-db", clustered(300, dim=DIM))
    prompts = _prompts(tmp_path, [f"prompt number {i}" for i in range(5)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = ["knn2img", "--from-file", str(prompts), "--config", str(files.config), "--ckpt", str(files.ckpt),
              "--clip", str(clip_dir), "--use-neighbors", "--knn", "3", "--database", "tiny-db", "--n_samples", "2",
              "--seed", "11", "--H", "32", "--W", "32", "--sampler", "ddim", "--ddim_steps", "2", "--device", "cpu",
              "--json", "--quiet"]

    def run(launcher: list[str], out: Path) -> list[dict]:
        proc = subprocess.run([*launcher, *common, "--outdir", str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    one = run([sys.executable, "-m", "ldmcli"], tmp_path / "one")
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ldmcli"], tmp_path / "two")

    def by_prompt(records):
        return {(r["prompt_index"], r["seed"]): r for r in records if r["kind"] == "sample"}

    a, b = by_prompt(one), by_prompt(two)
    assert sorted(a) == sorted(b) == [(i, 11 + i) for i in range(5)]
    for key in a:
        assert a[key]["neighbors"] == b[key]["neighbors"], key
        assert np.array_equal(np.asarray(Image.open(a[key]["path"])), np.asarray(Image.open(b[key]["path"]))), key
    assert sorted(Path(r["path"]).name for r in b.values()) == [f"{i:05d}.png" for i in range(5)]

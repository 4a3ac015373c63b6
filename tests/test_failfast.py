"""Fail fast, fail clearly (issue 14, items 1, 4 and 6 for the generation commands): every PIL pixel format through
``ldm inpaint`` gives the right image or one line, output folders are checked before any model is loaded, OS errors
name their path, sizes that cannot fit in memory are refused up front, small images get a size check, ``--help``
shows flags as flags and ``-q`` silences transformers.

Faults are real where the test can make them (a read-only or a full tmpfs when ``mount`` works, as root in a
sandbox), injected otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tinymodels import install_tiny

from ldmcli.images import read_mask, read_rgb

TINY_INPAINT = "tiny-inpaint"


@pytest.fixture
def no_loading(monkeypatch):
    """Any model loading fails the test: the errors under test must come before it."""
    import ldmcli.loading

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(ldmcli.loading, "load", fail)


def one_line(r, code: int) -> str:
    assert r.exit_code == code, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r
    return lines[0]


# ---------------------------------------------------------------------------------------- 1. every pixel format


def _png16_rgb(path: Path, array: np.ndarray) -> Path:
    """A 16-bit RGB PNG (PIL cannot write one): ``array`` ``[h, w, 3]`` uint16."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


H, W = 12, 20


def _box() -> np.ndarray:
    fill = np.zeros((H, W), bool)
    fill[3:8, 5:12] = True
    return fill


def _images(folder: Path) -> dict[str, Path]:
    """One input image per PIL mode (values chosen so that clipping or dropping alpha would show)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey16 = np.where(rng.random((H, W)) < 0.5, 1000, 60000).astype(np.uint16)
    made = {
        "i16": (Image.fromarray(grey16), "png"),
        "i32": (Image.fromarray(grey16.astype(np.int32), mode="I"), "tif"),
        "float": (Image.fromarray(rng.random((H, W)).astype(np.float32), mode="F"), "tif"),
        "la": (Image.fromarray(np.stack([rgb[..., 0], rgb[..., 1]], axis=2), mode="LA"), "png"),
        "rgba": (Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=2), mode="RGBA"), "png"),
        "p": (Image.fromarray(rgb).quantize(16), "png"),
        "cmyk": (Image.fromarray(rgb).convert("CMYK"), "tif"),
    }
    paths = {}
    for name, (im, ext) in made.items():
        paths[name] = folder / f"{name}.{ext}"
        im.save(paths[name])
    paths["rgb16"] = _png16_rgb(folder / "rgb16.png", rng.integers(0, 65536, (H, W, 3)).astype(np.uint16))
    return paths


def _masks(folder: Path, fill: np.ndarray) -> dict[str, Path]:
    """The same fill region in every mask mode; "black" is never pure 0 where the format allows less than white."""
    grey8 = np.where(fill, 255, 3).astype(np.uint8)
    made = {
        "i16": (Image.fromarray(np.where(fill, 65535, 200).astype(np.uint16)), "png"),  # issue 14's 16-bit mask
        "i32": (Image.fromarray(np.where(fill, 65535, 200).astype(np.int32), mode="I"), "tif"),
        "float": (Image.fromarray(np.where(fill, 1.0, 0.01).astype(np.float32), mode="F"), "tif"),
        "one": (Image.fromarray(fill), "png"),
        "l": (Image.fromarray(grey8), "png"),
        "la": (Image.fromarray(np.stack([grey8, np.full_like(grey8, 255)], axis=2), mode="LA"), "png"),
        "rgba": (Image.fromarray(np.stack([grey8] * 3 + [np.full_like(grey8, 255)], axis=2), mode="RGBA"), "png"),
        "p": (Image.fromarray(np.stack([grey8] * 3, axis=2)).quantize(4), "png"),
    }
    paths = {}
    for name, (im, ext) in made.items():
        paths[name] = folder / f"{name}.{ext}"
        im.save(paths[name])
    return paths


def test_every_pixel_format_through_inpaint_is_right_or_refused(cli, monkeypatch, tmp_path):
    """One batch: each image mode with an L mask, each mask mode with an RGB image; unmasked pixels are the
    faithful conversion byte for byte and the fill region is the mask's (>= 0.5). Unconvertible files: one line
    each, the others are written."""
    install_tiny("inpaint", monkeypatch)
    src, indir, out = tmp_path / "src", tmp_path / "in", tmp_path / "out"
    for folder in (src, indir):
        folder.mkdir()
    fill = _box()
    grey_mask = np.where(fill, 255, 0).astype(np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, path in _images(src).items():
        target = indir / f"img_{name}{path.suffix}"
        path.rename(target)
        Image.fromarray(grey_mask).save(indir / f"img_{name}_mask.png")
        expected[f"img_{name}"] = (read_rgb(target), fill)
    for name, path in _masks(src, fill).items():
        Image.fromarray(rgb).save(indir / f"mask_{name}.png")
        path.rename(indir / f"mask_{name}_mask{path.suffix}")
        assert ((read_mask(indir / f"mask_{name}_mask{path.suffix}") >= 0.5) == fill).all(), name
        expected[f"mask_{name}"] = (rgb, fill)
    # unconvertible: float pixels outside [0, 1], 32-bit integers above 65535, a LAB image
    Image.fromarray(np.full((H, W), 3.5, np.float32), mode="F").save(indir / "bad_float.tif")
    Image.fromarray(np.full((H, W), 70000, np.int32), mode="I").save(indir / "bad_i32.tif")
    for name in ("bad_float", "bad_i32"):
        Image.fromarray(grey_mask).save(indir / f"{name}_mask.png")

    r = cli("inpaint", "--indir", indir, "--outdir", out, "--model", TINY_INPAINT, "--steps", "2", "--seed", "3",
            "--json")
    assert r.exit_code == 1, r
    report = json.loads(r.stdout)
    failed = {Path(f["path"]).stem: f["error"] for f in report["failed"]}
    assert set(failed) == {"bad_float", "bad_i32"}, failed
    assert "outside [0, 1]" in failed["bad_float"] and "outside 0..65535" in failed["bad_i32"]
    for message in failed.values():
        assert "\n" not in message and message in r.stderr
    assert sorted(Path(w["path"]).stem for w in report["written"]) == sorted(expected)
    for stem, (image, region) in expected.items():
        with Image.open(out / f"{stem}.png") as im:
            result = np.asarray(im.convert("RGB"))
        assert (result[~region] == image[~region]).all(), stem
        assert (result[region] != image[region]).any(), stem
    # issue 14's 16-bit image (1000 and 60000) is grey 4 and 233 outside the mask, not white
    with Image.open(out / "img_i16.png") as im:
        assert set(np.unique(np.asarray(im)[~fill])) == {4, 233}


def test_a_pixel_format_that_cannot_be_converted_fails_before_loading(cli, monkeypatch, tmp_path, no_loading):
    install_tiny("inpaint", monkeypatch)
    Image.new("LAB", (W, H)).save(tmp_path / "lab.tif")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "mask.png")
    r = cli("inpaint", tmp_path / "lab.tif", tmp_path / "mask.png", "-o", tmp_path / "out.png", "--model",
            TINY_INPAINT)
    line = one_line(r, 2)
    assert str(tmp_path / "lab.tif") in line and "LAB" in line
    assert not (tmp_path / "out.png").exists()


def test_knn2img_image_reads_16_bit_and_alpha(tmp_path):
    from ldmcli.errors import UsageError
    from ldmcli.models.clip import load_image

    Image.fromarray(np.full((4, 5), 60000, np.uint16)).save(tmp_path / "grey16.png")
    x = load_image(tmp_path / "grey16.png")
    assert x.shape == (3, 4, 5)
    assert np.allclose(x.numpy(), round(60000 / 257) / 127.5 - 1.0)  # scaled, not clipped to white
    Image.new("RGBA", (5, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 1.0).all()  # transparent = white, as a viewer shows it
    Image.fromarray(np.full((4, 5), 2.0, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(UsageError, match="outside"):
        load_image(tmp_path / "f.tif")


# ------------------------------------------------------------------------------------ 2. output before the work


def _mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs on ``folder`` (root in a sandbox that allows it); False where that is not possible."""
    if os.geteuid() != 0:
        return False
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=20)


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A folder nothing can be written into: chmod 0o555 for a normal user; as root (where chmod does not stop
    writes) a read-only tmpfs, or, where mounting is not allowed, EROFS injected into ``os.open`` for it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif _mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        _umount(folder)
    else:
        real_open = os.open

        def open_ro(path, flags, *args, **kwargs):
            if Path(path).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_ro)
        yield folder


@pytest.mark.parametrize("command", ["txt2img", "sample", "inpaint"])
def test_outdir_that_is_a_file_fails_before_loading(cli, monkeypatch, tmp_path, no_loading, command):
    (tmp_path / "taken").write_text("the user's file")
    for outdir, words in [(tmp_path / "taken", "exists and is not a folder"),
                          (tmp_path / "taken" / "sub", f"cannot be created: {tmp_path / 'taken'} is a file")]:
        r = _run_into(cli, monkeypatch, tmp_path, command, outdir)
        line = one_line(r, 2)
        assert str(outdir) in line and words in line, r
    assert (tmp_path / "taken").read_text() == "the user's file"


def _run_into(cli, monkeypatch, tmp_path, command, outdir, *extra):
    if command == "txt2img":
        install_tiny("txt2img", monkeypatch)
        return cli("txt2img", "a cat", "--model", "tiny-txt2img", "--H", "32", "--W", "32", "--ddim_steps", "2",
                   "--n_samples", "1", "--outdir", outdir, *extra)
    if command == "sample":
        install_tiny("uncond", monkeypatch)
        return cli("sample", "tiny-uncond", "--custom_steps", "2", "-n", "1", "--outdir", outdir, *extra)
    install_tiny("inpaint", monkeypatch)
    indir = tmp_path / "pairs"
    indir.mkdir(exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(indir / "a.png")
    Image.fromarray(np.where(_box(), 255, 0).astype(np.uint8)).save(indir / "a_mask.png")
    return cli("inpaint", "--indir", indir, "--outdir", outdir, "--model", TINY_INPAINT, "--steps", "2", *extra)


@pytest.mark.parametrize("command", ["txt2img", "inpaint"])
def test_read_only_outdir_fails_before_loading(cli, monkeypatch, tmp_path, readonly_dir, no_loading, command):
    for outdir in (readonly_dir, readonly_dir / "new"):
        r = _run_into(cli, monkeypatch, tmp_path, command, outdir)
        line = one_line(r, 1)
        assert str(outdir) in line, r
        assert "read-only file system" in line or "permission denied" in line, r
        assert "--debug" not in line
    assert os.listdir(readonly_dir) == []


def test_full_disk_names_the_file(cli, monkeypatch, tmp_path):
    """A file system with one free page: the probe fits, the first image does not. Where no tmpfs can be mounted,
    ENOSPC is injected into the image writer instead."""
    outdir = tmp_path / "full"
    outdir.mkdir()
    mounted = _mount_tmpfs(outdir, "size=64k")
    try:
        if mounted:
            filler = outdir / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)
            os.truncate(filler, filler.stat().st_size - 4096)  # one page free
        else:
            from ldmcli import output

            def full(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(output.NumberedWriter, "_write", full)
        r = _run_into(cli, monkeypatch, tmp_path, "txt2img", outdir, "--H", "64", "--W", "64", "--skip-grid")
        line = one_line(r, 1)
        assert line == f"ldm: error: no space left on device writing {outdir / 'samples' / '00000.png'}", r
        assert not (outdir / "samples").exists() or os.listdir(outdir / "samples") == []
    finally:
        if mounted:
            _umount(outdir)


def test_write_errors_name_the_path(tmp_path, monkeypatch):
    from ldmcli import output

    writer = output.NumberedWriter(tmp_path / "x")
    assert writer.write(b"a") == tmp_path / "x" / "00000.png"

    def denied(self, data):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(output.NumberedWriter, "_write", denied)
    with pytest.raises(output.OutputError, match=f"^permission denied writing {tmp_path / 'x' / '00001.png'}$"):
        writer.write(b"b")


# ------------------------------------------------------------------------------------------------------ memory


def test_huge_size_is_refused_before_loading_with_estimate_and_limit(cli, monkeypatch, tmp_path, no_loading):
    install_tiny("txt2img", monkeypatch)
    r = cli("txt2img", "a cat", "--model", "tiny-txt2img", "--H", "65536", "--W", "65536", "--outdir",
            tmp_path / "out")
    line = one_line(r, 2)
    assert "65536x65536 images need at least" in line and "GiB" in line, r
    assert "this machine has" in line or "memory limit" in line, r
    assert not (tmp_path / "out" / "samples").exists()


def test_memory_check_suggests_tiled_decoding_where_it_helps(tmp_path):
    from ldmcli.config import load_config
    from ldmcli.errors import RequestError
    from ldmcli.pipelines import generation as gen
    from tinymodels import CONFIGS

    (tmp_path / "c.yaml").write_text(CONFIGS["txt2img"])
    cfg = load_config(tmp_path / "c.yaml")
    needs = {n.part: n.bytes for n in gen.estimate_memory(cfg, 2048, 2048, 4, guidance=False, itemsize=4)}
    tiled = {n.part: n.bytes for n in gen.estimate_memory(cfg, 2048, 2048, 4, guidance=False, itemsize=4,
                                                            decode_tile=64)}
    assert needs["decoder"] > max(needs["UNet"], needs["decoded images"])
    assert tiled["decoder"] < needs["decoder"] and tiled["UNet"] == needs["UNet"]
    # the tiny decoder: 32 + 32 channels at full size, for 4 images of 2048 x 2048 in float32
    assert needs["decoder"] == 4 * 64 * 2048 * 2048 * 4
    limit = (max(tiled.values()) + needs["decoder"]) // 2
    args = dict(guidance=False, dtype=__import__("torch").float32, device="cpu", limit=(limit, "this machine has"))
    with pytest.raises(RequestError, match="--tile-decode"):
        gen.check_memory(cfg, 2048, 2048, 4, **args)
    gen.check_memory(cfg, 2048, 2048, 4, tile_decode=True, **args)  # fits in tiles
    with pytest.raises(RequestError, match="smaller size or fewer images") as err:
        gen.check_memory(cfg, 2048, 2048, 4, **{**args, "limit": (needs["UNet"] // 2, "this machine has")})
    assert "for the decoder" in str(err.value) or "for the UNet" in str(err.value)
    gen.check_memory(cfg, 256, 256, 4, guidance=True, dtype=args["dtype"], device="cpu")  # normal sizes pass


def test_memory_limit_is_known_here():
    from ldmcli.pipelines.generation import memory_limit

    found = memory_limit("cpu")
    assert found is not None and found[0] > 2**28


# -------------------------------------------------------------------------------------- 3. the smaller ones


def test_inpaint_image_too_small_for_the_model_is_refused_before_loading(cli, monkeypatch, tmp_path, no_loading):
    install_tiny("inpaint", monkeypatch)
    for size in (3, 8):
        Image.new("RGB", (size, size), (10, 20, 30)).save(tmp_path / "small.png")
        Image.new("L", (size, size), 255).save(tmp_path / "small_mask.png")
        r = cli("inpaint", tmp_path / "small.png", tmp_path / "small_mask.png", "-o", tmp_path / "out.png",
                "--model", TINY_INPAINT)
        line = one_line(r, 2)
        assert f"{tmp_path / 'small.png'}: {size}x{size} is too small for {TINY_INPAINT}" in line, r
        assert "at least one side of 9 pixels" in line, r


def test_minimum_size_is_computed_from_the_config(tmp_path):
    from ldmcli.config import load_config
    from ldmcli.errors import UsageError
    from ldmcli.inpaint import check_min_size
    from tinymodels import CONFIGS

    (tmp_path / "c.yaml").write_text(CONFIGS["inpaint"])
    cfg = load_config(tmp_path / "c.yaml")
    for h, w in [(1, 9), (9, 1), (3, 30), (13, 21)]:
        check_min_size(cfg, h, w, "x.png")
    for h, w in [(1, 1), (8, 8), (5, 3)]:
        with pytest.raises(UsageError, match="too small"):
            check_min_size(cfg, h, w, "x.png")
    # upstream's inpainting_big (UNet 256 x [1, 2, 3, 4], VQ-f4 128 x [1, 2, 4]) takes any size
    (tmp_path / "big.yaml").write_text(CONFIGS["inpaint"].replace("model_channels: 32", "model_channels: 256")
                                       .replace("channel_mult: [1, 2]", "channel_mult: [1, 2, 3, 4]"))
    check_min_size(load_config(tmp_path / "big.yaml"), 1, 1, "x.png")


def test_a_small_image_that_fits_is_inpainted(cli, monkeypatch, tmp_path):
    install_tiny("inpaint", monkeypatch)
    Image.new("RGB", (9, 2), (10, 20, 30)).save(tmp_path / "thin.png")
    Image.new("L", (9, 2), 255).save(tmp_path / "thin_mask.png")
    r = cli("inpaint", tmp_path / "thin.png", tmp_path / "thin_mask.png", "-o", tmp_path / "out.png", "--model",
            TINY_INPAINT, "--steps", "2", "-q")
    assert r.exit_code == 0, r
    assert Image.open(tmp_path / "out.png").size == (9, 2)


COMMANDS = ["download", "txt2img", "sample", "inpaint", "build-index", "knn2img", "train-ae", "train-ldm"]


def test_help_shows_flags_without_a_type(cli):
    for args in [["--help"], *[[c, "--help"] for c in COMMANDS]]:
        r = cli(*args, env={"COLUMNS": "200"})
        assert r.exit_code == 0, r
        assert "<bool>" not in r.stdout, args
        assert re.search(r"<(int|str|path|list\[str\])>", r.stdout), args  # other types are still shown
    r = cli("--help", env={"COLUMNS": "200"})
    assert "--offline" in r.stdout and "--data-dir" in r.stdout and "<path>" in r.stdout
    r = cli("--offline", "--version")
    assert r.exit_code == 0 and r.stdout.startswith("ldm ")


def test_help_texts(cli):
    r = cli("sample", "--help", env={"COLUMNS": "200"})
    assert "digits" in r.stdout
    r = cli("knn2img", "--help", env={"COLUMNS": "200"})
    row = next(line for line in r.stdout.splitlines() if "--n_rows" in line)
    assert "(default: n_samples)" in row and "[default: 0]" not in row


def test_quiet_silences_transformers(cli, monkeypatch, tmp_path):
    from test_clip import save_tiny_clip

    from ldmcli.pipelines.knn2img import quiet_transformers
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    with quiet_transformers(True):
        assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == level
    with quiet_transformers(False):
        assert hf_logging.is_progress_bar_enabled()

    clip = save_tiny_clip(tmp_path / "clip", dim=64)
    install_tiny("rdm", monkeypatch)
    args = ["knn2img", "a cat", "--model", "tiny-rdm", "--clip", clip, "--H", "32", "--W", "32", "--ddim_steps", "2",
            "--n_samples", "1", "--device", "cpu", "--outdir", tmp_path / "out", "--skip-grid"]
    loud = cli(*args)
    assert loud.exit_code == 0, loud
    assert "Loading weights" in loud.stderr  # what -q must remove
    r = cli(*args, "-q")
    assert r.exit_code == 0, r
    assert r.stderr == "", r


def test_inpaint_write_errors_name_the_file_and_a_full_disk_stops_the_batch(cli, monkeypatch, tmp_path):
    import ldmcli.pipelines.inpaint as pipeline

    install_tiny("inpaint", monkeypatch)
    indir, out = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    for name in ("a", "b"):
        Image.fromarray(rgb).save(indir / f"{name}.png")
        Image.fromarray(np.where(_box(), 255, 0).astype(np.uint8)).save(indir / f"{name}_mask.png")
    attempts = []

    def failing(code, text):
        def write(path, data, **kwargs):
            attempts.append(Path(path).name)
            raise OSError(code, text)
        return write

    args = ["inpaint", "--indir", indir, "--outdir", out, "--model", TINY_INPAINT, "--steps", "1", "--json"]
    monkeypatch.setattr(pipeline, "atomic_write_bytes", failing(errno.EACCES, "Permission denied"))
    r = cli(*args)
    assert r.exit_code == 1 and attempts == ["a.png", "b.png"], r  # one file refused: the others go on
    failed = [f["error"] for f in json.loads(r.stdout)["failed"]]
    assert failed == [f"permission denied writing {out / 'a.png'}", f"permission denied writing {out / 'b.png'}"]
    attempts.clear()
    monkeypatch.setattr(pipeline, "atomic_write_bytes", failing(errno.ENOSPC, "No space left on device"))
    r = cli(*args)
    assert attempts == ["a.png"], r  # a full disk stops the batch
    assert one_line(r, 1) == f"ldm: error: no space left on device writing {out / 'a.png'}"


def test_inpaint_image_too_big_for_memory_is_refused_before_loading(cli, monkeypatch, tmp_path):
    from ldmcli.pipelines import generation as gen

    install_tiny("inpaint", monkeypatch)
    monkeypatch.setattr(gen, "memory_limit", lambda device: (50 * 2**20, "this machine has"))
    indir = tmp_path / "in"
    indir.mkdir()
    for name, (h, w) in {"big": (1024, 1024), "small": (H, W)}.items():
        Image.new("RGB", (w, h), (10, 20, 30)).save(indir / f"{name}.png")
        Image.new("L", (w, h), 255).save(indir / f"{name}_mask.png")
    r = cli("inpaint", "--indir", indir, "--outdir", tmp_path / "out", "--model", TINY_INPAINT, "--steps", "1",
            "--precision", "fp32", "--json")
    assert r.exit_code == 1, r
    report = json.loads(r.stdout)
    assert [Path(w["path"]).name for w in report["written"]] == ["small.png"]
    (failed,) = report["failed"]
    assert failed["error"].startswith(f"{indir / 'big.png'}: 1024x1024 images need at least 256.0 MiB for the "
                                      "decoder (1 x 64 channels x 1024 x 1024 x 4 bytes) but this machine has 50.0 MiB: use a smaller size")
    assert "--tile-decode" not in failed["error"]  # inpaint cannot decode in tiles

    import ldmcli.loading

    monkeypatch.setattr(ldmcli.loading, "load", lambda *a, **k: pytest.fail("loaded"))
    r = cli("inpaint", indir / "big.png", indir / "big_mask.png", "-o", tmp_path / "one.png", "--model", TINY_INPAINT)
    assert "big.png: 1024x1024 images need at least" in one_line(r, 2)

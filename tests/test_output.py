"""Image output: upstream layout, numbering that continues and never overwrites, atomic claims under concurrency,
PNG metadata, grids."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldmcli.output import (
    ImageWriter,
    NumberedWriter,
    encode_png,
    make_grid,
    next_free_number,
    read_metadata,
    to_uint8,
)


def _image(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_to_uint8_is_upstreams_conversion():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    # clamp((x + 1) / 2, 0, 1) * 255, truncated
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_grid_matches_torchvision_layout():
    images = np.stack([_image(v, 4) for v in (10, 20, 30)])
    grid = make_grid(images, per_row=2)
    assert grid.shape == (2 * 6 + 2, 2 * 6 + 2, 3)  # 2 rows x 2 columns of 4 px + 2 px padding
    assert grid[2, 2, 0] == 10 and grid[2, 8, 0] == 20 and grid[8, 2, 0] == 30
    assert grid[0, 0, 0] == 0 and grid[8, 8, 0] == 0  # padding and the empty cell are black
    assert make_grid(images[:1], per_row=4).shape == (4, 4, 3)  # one image: no border, as torchvision


def test_layout_numbering_and_metadata(tmp_path):
    writer = ImageWriter(tmp_path / "out")
    meta = {"prompt": "a cat", "seed": 42, "sampler": "ddim"}
    first = [writer.write_sample(_image(i), {**meta, "seed": 42 + i}) for i in range(3)]
    grid = writer.write_grid(np.stack([_image(i) for i in range(3)]), 3, meta)
    assert [f.path.name for f in first] == ["00000.png", "00001.png", "00002.png"]
    assert all(f.path.parent == tmp_path / "out" / "samples" for f in first)
    assert grid.path == tmp_path / "out" / "grid-0000.png"
    assert read_metadata(first[1].path) == {**meta, "seed": 43}
    assert first[1].record() == {"path": str(first[1].path), "kind": "sample", **meta, "seed": 43}
    # a second run continues after the highest number, even with gaps and foreign files around
    (tmp_path / "out" / "samples" / "00007.png").write_bytes(encode_png(_image(0)))
    (tmp_path / "out" / "samples" / "notes.txt").write_text("x")
    again = ImageWriter(tmp_path / "out")
    assert again.write_sample(_image(9), meta).path.name == "00008.png"
    assert again.write_grid(np.stack([_image(1)]), 1, meta).path.name == "grid-0001.png"
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary files left behind


def test_a_name_taken_after_listing_is_never_overwritten(tmp_path):
    writer = NumberedWriter(tmp_path)
    assert writer.write(b"a").name == "00000.png"
    (tmp_path / "00001.png").write_bytes(b"someone else")  # appears behind the writer's back
    assert writer.write(b"b").name == "00002.png"
    assert (tmp_path / "00001.png").read_bytes() == b"someone else"


def test_fallback_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    writer = NumberedWriter(tmp_path)
    (tmp_path / "00000.png").write_bytes(b"old")
    assert writer.write(b"new").name == "00001.png"
    assert (tmp_path / "00000.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000.png", "00001.png"]
    assert not list(tmp_path.glob(".*.tmp"))


_WRITER = """
import sys, time
from pathlib import Path
from ldmcli.output import NumberedWriter
folder, tag, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
writer = NumberedWriter(folder)
while not go.exists():
    time.sleep(0.001)
for i in range(40):
    writer.write(f"{tag}-{i}".encode())
"""


def test_concurrent_writers_never_share_a_name(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), tag, str(go)]) for tag in "ab"]
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    contents = sorted(p.read_bytes().decode() for p in out.glob("*.png"))
    assert contents == sorted(f"{tag}-{i}" for tag in "ab" for i in range(40))  # 80 files, none overwritten
    assert next_free_number(out, "{:05d}.png") == 80


def test_interrupted_write_leaves_nothing_under_a_final_name(tmp_path, monkeypatch):
    real_link = os.link

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        NumberedWriter(tmp_path).write(b"data")
    monkeypatch.setattr(os, "link", real_link)
    assert list(tmp_path.iterdir()) == []


def test_png_is_a_normal_image(tmp_path):
    path = NumberedWriter(tmp_path).write(encode_png(_image(200, 5), {"prompt": "ünïcode ✓"}))
    with Image.open(path) as image:
        assert image.size == (5, 5) and image.mode == "RGB"
    assert read_metadata(path) == {"prompt": "ünïcode ✓"}

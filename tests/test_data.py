"""Training data: image folders (labels, captions, unreadable files), upstream layouts, the resumable sampler."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmcli.training import data as D


def _img(path: Path, size=(20, 12), value=128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_folder_labels_captions_and_unreadable(tmp_path):
    for cls in ("10", "2", "0"):
        for i in range(2):
            _img(tmp_path / cls / "sub" / f"{i}.png", value=int(cls) * 10)
    (tmp_path / "2" / "sub" / "0.txt").write_text("a two\n")
    (tmp_path / "0" / "broken.jpg").write_bytes(b"not an image")
    ds = D.ImageFolder(tmp_path, 16)
    assert ds.class_names == ["0", "2", "10"]  # numeric order
    assert len(ds) == 6 and len(ds.report.skipped) == 1 and "broken.jpg" in ds.report.skipped[0][0]
    assert ds.report.missing_captions == 5
    ex = ds[(2, 0)]
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() <= ex["image"].max() <= 1.0
    assert ex["class_label"] == 1 and ex["caption"] == "a two" and ex["human_label"] == "2"
    batch = D.collate([ds[0], ds[3]])
    assert tuple(batch["image"].shape) == (2, 16, 16, 3) and batch["class_label"].tolist() == [0, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(D.DataError, match="no usable images.*1 unreadable"):
        D.ImageFolder(tmp_path, 16)


def test_flat_folder_has_no_labels(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    ds = D.ImageFolder(tmp_path, 8)
    assert ds.labels is None and "class_label" not in ds[0]


def test_flip_follows_item_seed(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = D.ImageFolder(tmp_path, 8, flip_p=0.5)
    seeds = range(40)
    flips = [bool(ds[(0, s)]["image"][0, 0, 0] < 0) for s in seeds]
    assert any(flips) and not all(flips)
    assert flips == [bool(ds[(0, s)]["image"][0, 0, 0] < 0) for s in seeds]  # deterministic


def test_sampler_shards_disjoint_and_resumes():
    samplers = [D.ResumableSampler(10, seed=1, rank=r, world_size=2) for r in range(2)]
    shards = [[i for i, _ in s] for s in samplers]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(10))
    s = D.ResumableSampler(10, seed=1)
    full = list(s)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]  # reshuffled per epoch
    s.resume_at(0, 4)
    assert list(s) == full[4:]
    assert list(s) == full  # the skip applies once
    with pytest.raises(D.DataError):
        D.ResumableSampler(0, seed=1)


def test_lsun_and_faces_layouts(tmp_path):
    lsun = tmp_path / "data" / "lsun"
    for i in range(3):
        _img(lsun / "churches" / f"c{i}.webp")
    (lsun / "church_outdoor_train.txt").write_text("c0.webp\nc1.webp\n")
    ds = D.build_dataset("ldm.data.lsun.LSUNChurchesTrain", {"size": 8, "root": str(lsun)})
    assert len(ds) == 2 and ds[0]["image"].shape == (8, 8, 3)
    with pytest.raises(D.DataError, match="file list"):
        D.build_dataset("ldm.data.lsun.LSUNCatsTrain", {"size": 8, "root": str(lsun)})
    faces = tmp_path / "data"
    (faces / "celebahq").mkdir(parents=True)
    np.save(faces / "celebahq" / "x.npy", np.full((1, 3, 12, 12), 7, np.uint8))
    (faces / "celebahqtrain.txt").write_text("x.npy\n")
    ds = D.build_dataset("taming.data.faceshq.CelebAHQTrain", {"size": 8, "root": str(faces)})
    assert ds[0]["image"].shape == (8, 8, 3)
    with pytest.raises(Exception, match="unknown dataset"):
        D.build_dataset("ldm.data.nope.Nope", {})


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_imagenet_train_extraction_and_ready_marker(tmp_path):
    root = D.imagenet_root("train", tmp_path)
    root.mkdir(parents=True)
    with pytest.raises(D.DataError, match="ILSVRC2012_img_train.tar"):
        D.imagenet("train", size=8, data_root=str(tmp_path))
    subs = {f"{syn}.tar": _tar_bytes({f"{syn}_{i}.JPEG": _jpeg() for i in range(2)})
            for syn in ("n02", "n01")}
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(subs))
    ds = D.imagenet("train", size=8, data_root=str(tmp_path))
    assert (root / ".ready").exists() and len(ds) == 4
    assert (root / "filelist.txt").read_text().splitlines()[0] == "n01/n01_0.JPEG"
    assert ds.labels == [0, 0, 1, 1] and ds[3]["image"].shape == (8, 8, 3)
    (root / "ILSVRC2012_img_train.tar").unlink()  # prepared: the tar is not needed again
    assert len(D.imagenet("train", size=8, data_root=str(tmp_path))) == 4


def test_imagenet_validation_sorted_by_synset(tmp_path):
    root = D.imagenet_root("validation", tmp_path)
    root.mkdir(parents=True)
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes({"v1.JPEG": _jpeg(), "v2.JPEG": _jpeg()}))
    with pytest.raises(D.DataError, match="validation_synset.txt"):
        D.prepare_imagenet("validation", tmp_path)
    (root / "validation_synset.txt").write_text("v1.JPEG n05\nv2.JPEG n03\n")
    ds = D.build_dataset("ldm.data.imagenet.ImageNetValidation", {"data_root": str(tmp_path), "config": {"size": 8}})
    assert sorted(Path(p).parent.name for p in ds.paths) == ["n03", "n05"] and sorted(ds.labels) == [0, 1]


def test_folder_reads_16_bit_and_alpha_correctly_and_skips_unconvertible_modes(tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dark16.png")  # 16-bit near-black
    rgba = np.zeros((8, 8, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")  # fully transparent: white
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    ds = D.ImageFolder(tmp_path, 8)
    assert [Path(p).name for p in ds.paths] == ["clear.png", "dark16.png"]
    assert len(ds.report.skipped) == 1 and "lab.tif" in ds.report.skipped[0][0]
    assert "mode LAB" in ds.report.skipped[0][1]
    assert (ds[0]["image"] == 1.0).all()  # white, not black
    assert (ds[1]["image"] < -0.99).all()  # black, not white (PIL's convert clips 200 to 200/255)


def test_an_image_that_fails_to_convert_names_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 5.0, np.float32), mode="F").save(tmp_path / "hot.tif")
    ds = D.ImageFolder(tmp_path, 8)
    with pytest.raises(D.DataError, match=r"hot\.tif.*outside \[0, 1\]"):
        ds[1]


def test_hold_out_is_a_fixed_split_by_file_name(tmp_path):
    for i in range(20):
        _img(tmp_path / "a" / f"{i}.png", value=i)
    train, val = D.hold_out(D.ImageFolder(tmp_path / "a", 8), 0.2)
    assert len(train) == 16 and len(val) == 4 and set(train.paths).isdisjoint(val.paths)
    again_train, again_val = D.hold_out(D.ImageFolder(tmp_path / "a", 8), 0.2)
    assert again_val.paths == val.paths and val[1]["file_path_"] == val.paths[1]
    (tmp_path / "a").rename(tmp_path / "moved")  # the same files elsewhere: the same split
    _, moved = D.hold_out(D.ImageFolder(tmp_path / "moved", 8), 0.2)
    assert [Path(p).name for p in moved.paths] == [Path(p).name for p in val.paths]
    assert len(D.hold_out(D.ImageFolder(tmp_path / "moved", 8), 0.001)[1]) == 1  # at least one
    with pytest.raises(D.DataError, match="cannot hold out"):
        D.hold_out(D.ImageFolder(tmp_path / "moved", 8), 0.99)

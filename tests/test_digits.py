"""The built-in ``digits`` model (issue 8): the data export, the zoo entry that never downloads, the offline sample
command, and a smaller version of benchmarks/digits_quality.py (100 class-conditional samples, >= 85%)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from ldmcli import paths, store, zoo
from ldmcli.datasets import digits
from ldmcli.errors import LdmError, UsageError

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def model():
    from ldmcli.loading import load

    return load("digits")


@pytest.fixture(scope="module")
def classifier():
    return digits.fit_classifier()


def test_export_writes_class_folders_that_map_back_to_the_real_digits(tmp_path, classifier):
    n = digits.export_digits(tmp_path / "digits")
    files = sorted((tmp_path / "digits").rglob("*.png"))
    assert n == len(files) == 1797
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [str(k) for k in range(10)]
    assert not list((tmp_path / "digits").rglob(".*"))  # no temporary files left
    with Image.open(files[0]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([int(f.parent.name) for f in files])
    real, real_labels = digits.load_digits_8x8()
    order = [int(f.stem) for f in files]
    assert (real_labels[order] == labels).all()
    back = digits.to_digits_8x8(images)
    assert np.abs(back - real[order]).mean() < 1.0  # on the 0..16 scale
    assert (digits.classify(classifier, images) == labels).mean() > 0.98
    # the training data loader reads the export with the digit as the class label
    from ldmcli.training.data import ImageFolder

    ds = ImageFolder(tmp_path / "digits", 32)
    assert ds.class_names == [str(k) for k in range(10)] and sorted(set(ds.labels)) == list(range(10))


def test_export_rejects_a_file_as_the_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError):
        digits.export_digits(tmp_path / "f")


def test_to_digits_8x8_shapes():
    x = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    assert np.allclose(digits.to_digits_8x8(x), 16.0) and digits.to_digits_8x8(x).shape == (2, 8, 8)
    with pytest.raises(ValueError):
        digits.to_digits_8x8(np.zeros((2, 30, 30)))


def test_zoo_entry_is_packaged_and_never_downloads(monkeypatch, data_home):
    monkeypatch.setenv("LDM_OFFLINE", "1")
    entry = zoo.get("digits")
    assert entry.kind == "builtin" and entry.packaged and entry.files == ()
    folder = entry.local_dir()
    assert folder.parent.name == "assets" and folder.parent.parent.name == "ldmcli"
    assert store.ensure("digits") == folder and store.is_complete("digits")
    assert store.checkpoint_path("digits") == folder / "model.safetensors"
    assert 0 < entry.approx_size <= 10_000_000  # the shipped weights stay under 10 MB
    assert "digits" not in zoo.GROUPS["ldms"] and "digits" in zoo.GROUPS["all"]
    assert not any(data_home.iterdir())  # nothing was written to the data directory


def test_a_packaged_entry_with_missing_files_says_reinstall(tmp_path):
    broken = dataclasses.replace(zoo.get("digits"), name="digits-broken", dest="assets/no-such-folder")
    zoo.REGISTRY[broken.name] = broken
    try:
        with pytest.raises(LdmError, match="reinstall"):
            store.ensure(broken.name)
    finally:
        del zoo.REGISTRY[broken.name]


def test_download_list_shows_the_builtin_model(cli):
    r = cli("download", "--list")
    assert r.exit_code == 0, r
    row = next(line for line in r.stdout.splitlines() if line.startswith("digits"))
    assert "builtin" in row and " yes " in row
    r = cli("--offline", "download", "digits")
    assert r.exit_code == 0 and "already complete" in r.stderr, r


def test_load_model_offline(model):
    cfg = model.config
    assert cfg.ldm.cond_stage.params.n_classes == 11 and cfg.ldm.image_size == 8
    assert model.ckpt_path.name == "model.safetensors" and not model.model.training


def test_class_conditional_samples_are_the_digits_asked_for(model, classifier):
    """The smaller quality check: 10 samples per class with ldm sample's sampler (DDIM, 50 steps, eta 1)."""
    acc, per_class = digits.conditional_accuracy(model, classifier, 10, sampler="ddim", steps=50, eta=1.0, seed=1)
    assert acc >= 0.85, per_class


def test_sample_command_writes_a_grid_offline(cli, tmp_path, data_home):
    out = tmp_path / "out"
    r = cli("--offline", "sample", "digits", "--class", "7", "-n", "16", "--seed", "0", "--outdir", out)
    assert r.exit_code == 0, r
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 16 and len(list(out.glob("grid-*.png"))) == 1
    with Image.open(samples[0]) as im:
        assert im.size == (32, 32)
    clf = digits.fit_classifier()
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in samples])
    assert (digits.classify(clf, images) == 7).mean() >= 0.75
    assert not (paths.models_dir()).exists()  # nothing downloaded


def test_package_model_ships_the_ema_weights_with_use_ema_off(tmp_path, model):
    """A train-ldm run folder (config.yaml + model.ckpt with EMA shadows) becomes model.safetensors + config.yaml."""
    import torch
    import yaml

    from ldmcli import config as model_config
    from ldmcli.builtin import package_model
    from ldmcli.loading import _ema_map, load

    cfg = model.config
    with_ema = dataclasses.replace(cfg, model=dataclasses.replace(cfg.ldm, use_ema=True))
    net = model_config.build_model(with_ema)
    raw = {k: v.clone() for k, v in model.model.state_dict().items()}
    state = dict(net.state_dict())
    state.update(raw)
    for key, shadow in _ema_map(net, state).items():
        state[shadow] = raw[key] + 0.25
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(model_config.config_to_dict(with_ema), sort_keys=False))
    torch.save({"state_dict": state, "global_step": 7}, run / "model.ckpt")

    weights = package_model(run, tmp_path / "shipped")
    assert weights == tmp_path / "shipped" / "model.safetensors"
    shipped_cfg = yaml.safe_load((tmp_path / "shipped" / "config.yaml").read_text())
    assert shipped_cfg["diffusion"]["use_ema"] is False
    loaded = load(weights)  # the safetensors carries its config
    assert loaded.global_step == 7 and not loaded.config.use_ema
    again = loaded.model
    name = next(k for k in raw if k.startswith("model.diffusion_model.") and raw[k].is_floating_point())
    assert torch.equal(again.state_dict()[name], raw[name] + 0.25)  # the EMA weights, not the raw ones
    assert not any(k.startswith("model_ema.") for k in again.state_dict())
    with pytest.raises(UsageError):
        package_model(tmp_path / "nowhere", tmp_path / "x")

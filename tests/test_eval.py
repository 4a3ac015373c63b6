"""ldm eval: torch-fidelity's Inception (random weights saved in its format) and metric functions, end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from httpserver import file_server, mirror  # noqa: F401  (fixtures)
from tinymodels import install_tiny

from ldmcli import paths, zoo
from ldmcli.errors import LdmError
from ldmcli.eval import fidelity
from ldmcli.eval.metrics import EvalEvent, evaluate_samples

VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 with seeded random weights, saved as its weight file (convs
    scaled so activations neither vanish nor explode through the 40-odd layers)."""
    lib = fidelity.library()
    cls = lib["FeatureExtractorInceptionV3"]
    module = sys.modules[cls.__module__]
    original_load, original_url = cls.load_state_dict, module.load_state_dict_from_url
    cls.load_state_dict = lambda self, *a, **k: None  # build the layers only: nothing to load yet
    module.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = cls("random", list(fidelity.FEATURES))
    finally:
        cls.load_state_dict, module.load_state_dict_from_url = original_load, original_url
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(6 ** 0.5)
    path = tmp_path_factory.mktemp("inception") / fidelity.WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def install_inception(source: Path) -> Path:
    dest = zoo.get("inception").local_dir() / fidelity.WEIGHTS_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
    return dest


@pytest.fixture
def inception(inception_file, data_home) -> Path:
    return install_inception(inception_file)


def write_images(folder: Path, n: int, seed: int, size: int = 32, dark: bool = False) -> Path:
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
        if dark:
            img //= 4
        Image.fromarray(img).save(folder / f"{k:05d}.png")
    return folder


# ------------------------------------------------------------------------------ metrics = torch-fidelity's own


def test_metrics_equal_torch_fidelity_functions_on_the_same_features():
    fidelity.library()  # imports torch-fidelity (without torchvision where it is missing)
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 64, generator=g)
    b = torch.randn(30, 64, generator=g) * 1.3 + 0.2
    ours = fidelity.fid(fidelity.fid_statistics(a), fidelity.fid_statistics(b))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a.double()), fid_features_to_statistics(b.double()),
                                      False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-12) and ours > 1.0
    assert fidelity.fid(fidelity.fid_statistics(a), fidelity.fid_statistics(a)) == pytest.approx(0.0, abs=1e-6)
    kid = fidelity.kid(a, b, subsets=7, subset_size=20)
    ref = kid_features_to_metric(a, b, kid_subsets=7, kid_subset_size=20, rng_seed=2020, verbose=False)
    assert kid == (ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"]) and kid[0] > 0
    pr = fidelity.precision_recall(a, b, k=3)
    ref = prc_features_to_metric(a, b, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert pr == (ref["precision"], ref["recall"]) and 0.0 <= pr[0] <= 1.0
    logits = torch.randn(20, 1008, generator=g) * 3
    ref = isc_features_to_metric(logits, splits=10)
    assert fidelity.inception_score(logits) == (ref["inception_score_mean"], ref["inception_score_std"])


def test_torch_fidelity_loads_without_torchvision_and_hides_the_placeholders():
    fidelity.library()
    if fidelity._torchvision_installed():
        pytest.skip("torchvision is installed: torch-fidelity imports it for real")
    assert "torchvision" not in sys.modules  # nothing else sees a torchvision
    from torch_fidelity import datasets

    with pytest.raises(fidelity.EvalDependencyError, match="needs torchvision"):
        datasets.Cifar10_RGB("root", train=False)


# ----------------------------------------------------------------------------------------------- ldm eval samples


@pytest.mark.slow  # ~24 Inception passes at 299x299 on the CPU
def test_eval_samples_end_to_end_self_fid_is_zero_and_reference_is_cached(inception, tmp_path, monkeypatch):
    import torch.hub
    import urllib.request

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def no_network(*a, **k):
        raise AssertionError("a download behind the store's back")

    for target, name in ((torch.hub, "load_state_dict_from_url"), (torch.hub, "download_url_to_file"),
                         (tfi, "load_state_dict_from_url"), (urllib.request, "urlopen")):
        monkeypatch.setattr(target, name, no_network)
    a = write_images(tmp_path / "a", 4, seed=1)
    b = write_images(tmp_path / "b", 4, seed=2, dark=True)
    events: list[EvalEvent] = []
    same = evaluate_samples(a, a, batch_size=3, on_event=events.append)
    assert same.n_samples == same.n_reference == 4
    assert abs(same.fid) < 1e-3 and same.precision == same.recall == 1.0 and same.is_mean > 0.99
    assert [e.done for e in events if e.kind == "progress" and e.stage == "reference"] == [3, 4]
    cache = list((paths.cache_dir() / "eval").glob("*.npz"))
    assert len(cache) == 1 and same.reference_key and cache[0].stem == same.reference_key
    events.clear()
    other = evaluate_samples(b, a, batch_size=4, on_event=events.append)
    assert other.fid > 1.0 and other.kid_mean > 0 and other.precision is not None and other.n_samples == 4
    assert not [e for e in events if e.stage == "reference" and e.kind == "progress"]  # from the cache
    assert any("from the cache" in e.message for e in events)
    # ADM's reference batch layout: images (arr_0) for KID and precision/recall, mu/sigma of the whole dataset for
    # FID; the same pixels as folder a give the same features
    arr = np.stack([np.asarray(Image.open(p)) for p in sorted(a.glob("*.png"))])
    dataset = {"mu": np.full(2048, 0.05), "sigma": np.eye(2048) * 0.01}
    np.savez(tmp_path / "adm.npz", arr_0=arr, **dataset)
    adm = evaluate_samples(b, tmp_path / "adm.npz", batch_size=4)
    assert (adm.kid_mean, adm.precision, adm.recall, adm.n_reference) == \
        (other.kid_mean, other.precision, other.recall, 4)
    assert adm.fid != pytest.approx(other.fid, rel=1e-3)
    # statistics only: the same FID against the same statistics; KID / precision-recall said to be skipped
    np.savez(tmp_path / "stats.npz", **dataset)
    stats = evaluate_samples(b, tmp_path / "stats.npz", batch_size=4)
    assert stats.fid == pytest.approx(adm.fid, rel=1e-9) and stats.kid_mean is None and stats.n_reference is None
    assert set(stats.skipped) == {"kid", "precision_recall"}
    with np.load(cache[0]) as data:  # a cache file is a valid reference too
        assert data["features"].shape == (4, 2048)
    assert evaluate_samples(b, cache[0], batch_size=4).fid == pytest.approx(other.fid, rel=1e-9)


def test_cli_eval_samples_json_and_sample_folder_layout(cli, inception, tmp_path):
    out = tmp_path / "run"
    write_images(out / "samples", 4, seed=3)
    Image.fromarray(np.zeros((66, 66, 3), np.uint8)).save(out / "grid-0000.png")  # not a sample
    write_images(tmp_path / "ref", 4, seed=4)
    r = cli("eval", "samples", out, "--ref", tmp_path / "ref", "--json", "--batch-size", "4")
    assert r.exit_code == 0, r
    record = json.loads(r.stdout)
    assert record["n_samples"] == 4 and record["n_reference"] == 4 and record["fid"] > 0
    assert record["inception_sha256"] == hashlib.sha256(inception.read_bytes()).hexdigest()


def test_bad_input_and_weights_are_one_line_errors(cli, inception_file, tmp_path, monkeypatch):
    write_images(tmp_path / "a", 2, seed=1)
    r = cli("eval", "samples", tmp_path / "nope")
    assert r.exit_code == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("eval", "samples", tmp_path / "a", "--ref", tmp_path / "a" / "00000.png")
    assert r.exit_code == 2 and "neither a folder" in r.stderr
    r = cli("--offline", "eval", "samples", tmp_path / "a")  # weights missing, network off
    assert r.exit_code == 1 and "ldm download inception" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    weights = zoo.get("inception").local_dir() / fidelity.WEIGHTS_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(inception_file.read_bytes()[:100_000])  # truncated
    r = cli("eval", "samples", tmp_path / "a")
    assert r.exit_code == 1 and "ldm download inception --force" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1
    torch.save({"fc.weight": torch.zeros(2), "Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, weights)
    r = cli("eval", "samples", tmp_path / "a")
    assert r.exit_code == 1 and "ldm download inception --force" in r.stderr, r
    monkeypatch.setattr(fidelity, "_LIB", {})
    real_find = fidelity.importlib.util.find_spec
    monkeypatch.setattr(fidelity.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else real_find(name, *a))
    r = cli("eval", "samples", tmp_path / "a")
    assert r.exit_code == 1 and "pip install --no-deps 'torch-fidelity" in r.stderr, r


def test_weights_come_through_the_store_from_a_mirror(cli, mirror, inception_file, tmp_path, monkeypatch):
    data = inception_file.read_bytes()
    entry = zoo.get("inception")
    spec = entry.files[0]
    fake = zoo.ZooFile(spec.url, spec.filename, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    monkeypatch.setitem(zoo.REGISTRY, "inception", zoo.ZooEntry(**{**entry.__dict__, "files": (fake,)}))
    mirror.add("/toshas/torch-fidelity/releases/download/v0.2.0/" + fidelity.WEIGHTS_FILE, data)
    write_images(tmp_path / "a", 3, seed=1)
    r = cli("eval", "samples", tmp_path / "a", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["is_mean"] > 0 and [q.path for q in mirror.log if q.method == "GET"]
    manifest = json.loads((paths.data_dir() / "manifest.json").read_text())
    assert any(k.endswith(fidelity.WEIGHTS_FILE) for k in manifest["files"])


# ------------------------------------------------------------------- explicit weights (e.g. without logits layer)


@pytest.fixture(scope="session")
def pool_only_file(inception_file, tmp_path_factory) -> Path:
    """The random-weight file without its logits layer, as a conversion from a pool-features-only port writes it."""
    state = torch.load(inception_file, map_location="cpu", weights_only=True)
    for key in fidelity.LOGITS_LAYER:
        del state[key]
    path = tmp_path_factory.mktemp("pool") / "inception-pool.pth"
    torch.save(state, path)
    return path


def test_weights_without_logits_layer_give_the_same_pool_features_and_no_inception_score(
        inception_file, pool_only_file, tmp_path):
    images = np.random.RandomState(5).randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    full = fidelity.load_inception(path=inception_file)
    full_out = fidelity.inception_features(full, images)
    pool = fidelity.load_inception(path=pool_only_file)
    out = fidelity.inception_features(pool, images)
    assert fidelity.has_logits(full) and not fidelity.has_logits(pool)
    assert set(out) == {fidelity.POOL} and torch.equal(out[fidelity.POOL], full_out[fidelity.POOL])
    assert not [n for n, _ in pool.named_parameters() if n.startswith("fc.")]  # no untrained layer left behind
    a, b = write_images(tmp_path / "a", 4, seed=1), write_images(tmp_path / "b", 4, seed=2, dark=True)
    m = evaluate_samples(a, b, batch_size=4, inception_weights=pool_only_file)
    assert m.is_mean is None and m.is_std is None and "no logits layer" in m.skipped["is"]
    assert m.fid > 0 and m.kid_mean is not None and m.precision is not None and m.recall is not None
    assert m.inception_sha256 == hashlib.sha256(pool_only_file.read_bytes()).hexdigest()
    assert not zoo.get("inception").local_dir().exists()  # the store was neither read nor filled


def test_bad_explicit_weights_are_one_line_errors_before_any_work(inception_file, tmp_path):
    from ldmcli.errors import CheckpointError

    a = write_images(tmp_path / "a", 2, seed=1)
    state = torch.load(inception_file, map_location="cpu", weights_only=True)
    half = {k: v for k, v in state.items() if k != "fc.bias"}
    unexpected = {**{k: v for k, v in state.items() if not k.startswith("fc.")}, "extra.weight": torch.zeros(1)}
    wrong = {**state, "Conv2d_1a_3x3.conv.weight": torch.zeros(3, 3, 3, 3)}
    cases = {"missing.pth": (None, "missing"), "half.pth": (half, "half of the logits layer"),
             "extra.pth": (unexpected, "does not fit"), "wrong.pth": (wrong, "does not fit")}
    for name, (content, message) in cases.items():
        if content is not None:
            torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message) as e:
            evaluate_samples(a, a, batch_size=2, inception_weights=tmp_path / name)
        text = str(e.value)
        assert "\n" not in text and "ldm download inception" in text and "--force" not in text, text


def test_torchscript_conversion_maps_every_layer_of_torch_fidelity_s_inception(inception_file, pool_only_file):
    """benchmarks/inception_from_torchscript.py: fid-helper's TorchScript layout (built here from the random file by
    the inverse mapping) converts to exactly torch-fidelity's state dict without fc, and nothing is left over."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "inception_from_torchscript", Path(__file__).resolve().parents[1] / "benchmarks/inception_from_torchscript.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    state = torch.load(pool_only_file, map_location="cpu", weights_only=True)
    source = {f"{conv.SOURCE_PREFIX}{src}.{part}": state[f"{dst}.{name}"]
              for src, dst in conv.layer_names().items() for part, name in conv.SOURCE_TENSORS.items()}
    assert len(source) == 376  # the TorchScript's tensor count: 94 conv+BN layers
    out = conv.convert_state(source)
    assert set(out) == set(state)  # every tensor of torch-fidelity's Inception but fc
    assert all(torch.equal(out[k], v) for k, v in state.items())  # random file: BN scale 1, as the TF graph's
    # the semantics (same features as the real TorchScript) are the script's own proof, on the real file
    with pytest.raises(ValueError, match="no place"):
        conv.convert_state({**source, "net.layers.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has no net.layers.mixed_10.conv.weight"):
        conv.convert_state({k: v for k, v in source.items() if k != "net.layers.mixed_10.conv.weight"})


# ---------------------------------------------------------------------------------------------------- ldm eval ae


def install_lpips() -> None:
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for idx, cin, cout in VGG_CONVS:
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate((64, 128, 256, 512, 512))}
    folder = zoo.get("lpips").local_dir()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lin, folder / "vgg.pth")


def test_psnr_and_ssim_by_hand():
    from ldmcli.eval.reconstruction import center_crop, psnr, ssim

    a = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = np.clip(b[1].astype(int) + 5, 0, 255).astype(np.uint8)
    p = psnr(a, b)
    mse = ((a[1].astype(float) - b[1]) ** 2).mean()
    assert p[0] == 100.0 and p[1] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    s = ssim(a, b)
    assert s[0] == pytest.approx(1.0) and 0.5 < s[1] < 1.0
    assert center_crop(np.zeros((40, 60, 3), np.uint8), 32).shape == (32, 32, 3)


@pytest.mark.parametrize("family", ["churches", "uncond"])  # a KL and a VQ first stage
def test_cli_eval_ae_on_a_tiny_model(cli, inception, tmp_path, monkeypatch, family):
    install_tiny(family, monkeypatch)
    install_lpips()
    write_images(tmp_path / "data", 3, seed=5, size=40)  # resized and centre-cropped to 32
    full = family == "churches"  # the VQ one skips the slow parts
    extra = () if full else ("--no-rfid", "--no-lpips")
    r = cli("eval", "ae", f"tiny-{family}", "--data", tmp_path / "data", "--json", "--batch-size", "2", *extra)
    assert r.exit_code == 0, r
    rec = json.loads(r.stdout)
    assert rec["n_images"] == 3 and rec["resolution"] == 32
    assert 0 < rec["psnr"] < 60 and -1 <= rec["ssim"] <= 1
    if full:
        assert rec["lpips"] > 0 and rec["rfid"] > 0
    else:
        assert rec["lpips"] is None and rec["rfid"] is None


# ------------------------------------------------------------------------------------------------- ldm eval model


@pytest.mark.slow  # samples 9 images and runs Inception on 13
def test_cli_eval_model_sweep_table_plot_and_resume(cli, inception, tmp_path, monkeypatch):
    install_tiny("cin", monkeypatch)
    write_images(tmp_path / "ref", 4, seed=6)
    out = tmp_path / "ev"

    def run(n: int, scale: str, steps: str = "2"):
        return cli("eval", "model", "tiny-cin", "-n", n, "--ref", tmp_path / "ref", "--outdir", out, "--scale", scale,
                   "--steps", steps, "--json", "--sample-batch-size", "4")

    r = run(4, "1,3")
    assert r.exit_code == 0, r
    rows = json.loads(r.stdout)
    assert [row["scale"] for row in rows] == [1.0, 3.0] and all(row["fid"] > 0 for row in rows)
    assert all(row["n_samples"] == 4 and row["precision"] is not None for row in rows)
    assert {p.name for p in out.iterdir()} >= {"eval.json", "eval.csv", "eval.png", "ddim-2steps-scale1",
                                                "ddim-2steps-scale3"}
    assert (out / "eval.csv").read_text().splitlines()[0].startswith("sampler,steps,scale,n_samples,fid")
    assert json.loads((out / "eval.json").read_text()) == rows
    with Image.open(out / "eval.png") as png:
        assert png.size[0] > 400
    samples = out / "ddim-2steps-scale3" / "samples"
    before = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    assert len(before) == 4
    r = run(5, "3")  # one more image: the 4 are kept, not drawn again
    assert r.exit_code == 0, r
    after = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    assert len(after) == 5 and all(after[k] == v for k, v in before.items())
    assert json.loads(r.stdout)[0]["n_samples"] == 5 and len(json.loads((out / "eval.json").read_text())) == 1
    from ldmcli.output import read_metadata

    assert [read_metadata(samples / f"{k:05d}.png")["seed"] for k in range(5)] == [0, 1, 2, 3, 4]
    r = cli("eval", "model", "tiny-cin", "-n", "2", "--scale", "x")
    assert r.exit_code == 2 and "--scale" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resumed_samples_of_other_settings_are_refused(tmp_path, monkeypatch):
    from ldmcli.errors import UsageError
    from ldmcli.eval.sampling import load_for_eval, sample_images

    install_tiny("cin", monkeypatch)
    loaded = load_for_eval("tiny-cin")
    assert sample_images(loaded, 2, tmp_path, steps=2, seed=7, batch_size=2) == 2
    assert sample_images(loaded, 2, tmp_path, steps=2, seed=7, batch_size=2) == 0
    with pytest.raises(UsageError, match="other settings"):
        sample_images(loaded, 3, tmp_path, steps=3, seed=7)
    from ldmcli.config import load_config
    from ldmcli.eval.sampling import class_plan

    with pytest.raises(UsageError, match="eval ae"):
        class_plan(load_config("kl-f8"), 1.0)  # a first stage draws no samples
    with pytest.raises(UsageError, match="unconditional"):
        class_plan(load_config("celeba256"), 2.0)  # no guidance without conditioning

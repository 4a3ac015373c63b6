"""FID during training (issue 15 item 4): ldm train-ldm --eval-every N --eval-samples K, with the random-weight
Inception of test_eval saved in torch-fidelity's format (offline)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from httpserver import file_server, mirror  # noqa: F401  (fixtures)
from test_eval import inception_file, install_inception  # noqa: F401  (the random-weight Inception fixture)
from test_train import TINY_KL, TINY_LDM, _metrics, _one_line_error, _state, images  # noqa: F401  (fixture)

from ldmcli import zoo
from ldmcli.eval import fidelity


def _validation_folder(images: Path, dest: Path) -> Path:
    """Two images of each of classes 0 and 1: the FID reference by default."""
    for c in (0, 1):
        (dest / str(c)).mkdir(parents=True)
        for p in sorted((images / str(c)).glob("*.png"))[:2]:
            shutil.copy(p, dest / str(c) / p.name)
    return dest


def _autoencoder(images: Path, logdir: Path) -> Path:
    from ldmcli.training.run import train

    return train("autoencoder", TINY_KL, data_root=images, logdir=logdir,
                 overrides={"max_steps": 1, "log_images_every": 0}).run_dir


@pytest.mark.slow  # three runs, three FID evaluations (a 2048x2048 matrix square root each): 23 s on a loaded 2-core CPU
def test_fid_is_logged_at_its_steps_and_leaves_the_training_untouched(cli, images, inception_file, tmp_path):
    from ldmcli.output import read_metadata

    install_inception(inception_file)
    logs = tmp_path / "logs"
    val = _validation_folder(images, tmp_path / "val")
    # the first stage, with rFID of 3 validation images' reconstructions at its one step
    r = cli("train-ae", "--config", TINY_KL, "--data", images, "--val-data", val, "--max-steps", "1",
            "--log-images-every", "0", "--logdir", tmp_path / "ae", "--eval-every", "1", "--eval-samples", "3")
    assert r.exit_code == 0, r
    assert "rFID inputs: 3 images of the validation data" in r.stderr and "rFID at step 1: val/rfid " in r.stderr
    ae = Path(r.stdout.strip().splitlines()[-1])
    _, ae_rows = _metrics(ae)
    (rfid,) = [row for row in ae_rows if row.get("val/rfid")]
    assert rfid["step"] == "0" and float(rfid["val/rfid"]) > 0 and 0 < float(rfid["val/psnr"]) < 100
    assert len(list((ae / "eval" / "samples").glob("*.png"))) == 3
    common = ("--config", TINY_LDM, "--data", images, "--val-data", val, "--first-stage", ae, "--max-steps", "4",
              "--log-images-every", "0", "--logdir", logs)
    r = cli("train-ldm", *common, "--eval-every", "2", "--eval-samples", "4", "--eval-steps", "3")
    assert r.exit_code == 0, r
    assert "FID reference: 4 images of the validation data" in r.stderr
    assert "FID at step 2: val/fid " in r.stderr and "FID at step 4: val/fid " in r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    header, rows = _metrics(run_dir)
    fid_rows = [row for row in rows if row.get("val/fid")]
    train_steps = [int(row["step"]) for row in rows if row.get("train/loss_simple")]
    # Lightning logs optimizer step s's losses at step s - 1: FID after steps 2 and 4 sits beside their losses
    assert train_steps == [0, 1, 2, 3] and [int(row["step"]) for row in fid_rows] == [1, 3]
    for row in fid_rows:
        assert math.isfinite(float(row["val/fid"])) and float(row["val/fid"]) > 0
        assert math.isfinite(float(row["val/kid"]))  # 4 samples against 4 reference images: KID too
    samples = sorted((run_dir / "eval" / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    meta = [read_metadata(p) for p in samples]
    assert [m["seed"] for m in meta] == [0, 1, 2, 3] and [m["class"] for m in meta] == [0, 1, 2, 0]
    assert {m["step"] for m in meta} == {4} and {m["steps"] for m in meta} == {3}
    latest = json.loads((run_dir / "eval" / "latest.json").read_text())
    assert latest["step"] == 4 and latest["metrics"]["val/fid"] == pytest.approx(float(fid_rows[-1]["val/fid"]))
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["latest.json", "samples"]  # no staging left
    import yaml

    training = yaml.safe_load((run_dir / "train.yaml").read_text())["training"]
    assert (training["eval_every"], training["eval_samples"], training["eval_steps"]) == (2, 4, 3)  # --resume keeps

    r = cli("train-ldm", *common)  # the same run without FID
    assert r.exit_code == 0, r
    plain = Path(r.stdout.strip().splitlines()[-1])
    _, plain_rows = _metrics(plain)
    columns = ("train/loss_simple", "train/loss_vlb", "val/loss_simple", "val/loss_simple_ema")
    assert [[row.get(k) for k in columns] for row in rows if not row.get("val/fid")] == \
        [[row.get(k) for k in columns] for row in plain_rows]
    a, b = _state(run_dir / "checkpoints" / "last.ckpt"), _state(plain / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA included: weights untouched
    ca, cb = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (run_dir, plain))
    for key in ("torch_rng_state", "generator_state"):  # the global and the module's random streams too
        assert torch.equal(ca[key], cb[key]), key
    assert not (plain / "eval").exists()


def test_bad_fid_settings_fail_before_training(cli, images, inception_file, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    base = ("--config", TINY_LDM, "--data", images, "--logdir", logs)
    _one_line_error(cli("train-ldm", *base, "--eval-every", "2"), 2, "eval_every", "eval_samples")
    _one_line_error(cli("train-ldm", *base, "--eval-samples", "4"), 2, "eval_samples", "eval_every")
    _one_line_error(cli("train-ldm", *base, "--eval-every", "2", "--eval-samples", "1"), 2, "at least 2")
    _one_line_error(cli("train-ldm", *base, "--eval-every", "-1", "--eval-samples", "4"), 2, "eval_every")
    _one_line_error(cli("train-ldm", *base, "--eval-every", "2", "--eval-samples", "4", "--eval-steps", "0"), 2,
                    "eval_steps")
    ae = _autoencoder(images, tmp_path / "ae")
    fid = (*base, "--first-stage", ae, "--eval-every", "2", "--eval-samples", "4")
    _one_line_error(cli("train-ldm", *fid, "--eval-ref", tmp_path / "nowhere"), 2, "does not exist")
    _one_line_error(cli("train-ldm", *fid, "--eval-sampler", "nope"), 2, "unknown sampler")
    _one_line_error(cli("train-ldm", *fid, "--eval-steps", "500"), 2, "steps must be between 1 and 100")
    # no Inception weights and the network off: one line naming the download command, nothing trained or written
    _one_line_error(cli("--offline", "train-ldm", *fid), 1, "ldm download inception")
    weights = zoo.get("inception").local_dir() / fidelity.WEIGHTS_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(inception_file.read_bytes()[:100_000])  # truncated: found at startup, not at step 2
    _one_line_error(cli("train-ldm", *fid), 1, "ldm download inception --force")
    weights.unlink()
    install_inception(inception_file)
    from ldmcli.errors import UsageError
    from ldmcli.training.run import train

    with pytest.raises(UsageError, match="reconstructions with their inputs"):  # autoencoders: rFID, no reference
        train("autoencoder", TINY_KL, data_root=images, logdir=logs,
              overrides={"max_steps": 1, "eval_every": 1, "eval_samples": 2, "eval_ref": str(images)})
    assert not logs.exists()


def test_inception_weights_come_through_the_store_at_startup(cli, mirror, images, inception_file, tmp_path,
                                                             monkeypatch):
    import hashlib

    data = inception_file.read_bytes()
    entry = zoo.get("inception")
    fake = zoo.ZooFile(entry.files[0].url, entry.files[0].filename, sha256=hashlib.sha256(data).hexdigest(),
                       size=len(data))
    monkeypatch.setitem(zoo.REGISTRY, "inception", zoo.ZooEntry(**{**entry.__dict__, "files": (fake,)}))
    mirror.add("/toshas/torch-fidelity/releases/download/v0.2.0/" + fidelity.WEIGHTS_FILE, data)
    empty = tmp_path / "empty"
    empty.mkdir()
    # the weights are fetched before the data is scanned: the empty folder fails only after the download
    r = cli("train-ae", "--config", TINY_KL, "--data", empty, "--eval-every", "1", "--eval-samples", "2",
            "--logdir", tmp_path / "logs")
    _one_line_error(r, 1, "no usable images", after_start=True)
    assert f"downloading {fidelity.WEIGHTS_FILE}" in r.stderr and f"downloaded {fidelity.WEIGHTS_FILE}" in r.stderr
    assert [q for q in mirror.log if q.method == "GET"]
    assert (entry.local_dir() / fidelity.WEIGHTS_FILE).read_bytes() == data


def test_what_each_kind_of_model_samples_for_fid():
    from types import SimpleNamespace

    from ldmcli.config import load_config
    from ldmcli.errors import UsageError
    from ldmcli.training.config import load_train_config
    from ldmcli.training.quality import _conditioning

    cls = load_train_config(TINY_LDM).model  # n_classes 4
    data = SimpleNamespace(labels=[0, 1, 2, 2], captions=None)
    assert _conditioning(cls, data, None, 5, 1.0, 0.0) == ("class", [0, 1, 2, 0, 1], 3)  # the data's 3 classes
    full = SimpleNamespace(labels=[0, 3], captions=None)  # every id is a real class: none left to guide against
    assert _conditioning(cls, full, None, 2, 1.0, 0.0) == ("class", [0, 1], None)
    with pytest.raises(UsageError, match="no null class"):
        _conditioning(cls, full, None, 2, 2.0, 0.0)
    assert _conditioning(cls, full, None, 2, 2.0, 0.2)[2] == 3  # --cond-drop's null class
    txt = load_train_config(Path(__file__).parent / "fixtures" / "train" / "tiny-txt.yaml").model
    train_set, val_set = SimpleNamespace(captions=["a", "b", "c"]), SimpleNamespace(captions=["x", "y"])
    assert _conditioning(txt, train_set, val_set, 3, 1.0, 0.0) == ("text", ["x", "y", "x"], None)
    assert _conditioning(txt, train_set, None, 2, 1.0, 0.0) == ("text", ["a", "b"], None)
    with pytest.raises(UsageError, match="captions"):
        _conditioning(txt, SimpleNamespace(captions=None), None, 2, 1.0, 0.0)
    uncond = load_config("celeba256")
    assert _conditioning(uncond, [], None, 2, 1.0, 0.0) == ("unconditional", [None, None], None)
    with pytest.raises(UsageError, match="guidance scale"):
        _conditioning(uncond, [], None, 2, 2.0, 0.0)
    with pytest.raises(UsageError, match="conditioned on"):
        _conditioning(load_config("semantic_synthesis256"), [], None, 2, 1.0, 0.0)


def test_evaluation_mode_restores_mode_weights_and_random_state():
    import contextlib

    from ldmcli.training.quality import evaluation_mode

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        @contextlib.contextmanager
        def ema_scope(self):
            saved = self.w.detach().clone()
            with torch.no_grad():
                self.w.fill_(5.0)  # the "EMA" weights
            try:
                yield
            finally:
                with torch.no_grad():
                    self.w.copy_(saved)

    net = Net().train()
    state = torch.get_rng_state()
    with evaluation_mode(net, net):
        assert not net.training and not torch.is_grad_enabled() and float(net.w.detach()[0]) == 5.0
        torch.randn(4)
    assert net.training and torch.is_grad_enabled() and float(net.w.detach()[0]) == 1.0
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(RuntimeError), evaluation_mode(net.eval(), net):
        raise RuntimeError("a failed evaluation")
    assert not net.training and float(net.w.detach()[0]) == 1.0  # eval mode stays eval; the weights are put back


def test_samples_go_through_inception_a_batch_at_a_time(tmp_path, monkeypatch):
    import numpy as np

    from ldmcli.training import quality

    class Fake:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def extract_batches(self, batches, total, stage):
            (batch,) = list(batches)
            self.sizes.append(len(batch))
            values = torch.tensor(batch[:, 0, 0, 0], dtype=torch.float32)[:, None]
            return values.expand(-1, 2048), values.expand(-1, 1008)

    monkeypatch.setattr(quality, "INCEPTION_BATCH", 2)
    fake = Fake()
    writer = quality._MeasuringWriter(tmp_path, fake)
    for k in range(5):
        writer.write_sample(np.full((4, 4, 3), k, np.uint8), {"seed": k})
    feats, logits = writer.result()
    assert fake.sizes == [2, 2, 1] and feats[:, 0].tolist() == [0, 1, 2, 3, 4] and logits.shape == (5, 1008)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"{k:05d}.png" for k in range(5)]


@pytest.mark.slow  # a VQ first stage, a text LDM and one FID evaluation: 15 s of CPU, 33 s on the loaded machine
def test_text_model_is_prompted_with_the_data_captions_and_guided(images, inception_file, tmp_path, monkeypatch):
    from conftest import BERT_VOCAB

    from ldmcli import store
    from ldmcli.output import read_metadata
    from ldmcli.training.data import ImageFolder
    from ldmcli.training.run import train

    install_inception(inception_file)
    vocab = tmp_path / "bert"
    vocab.mkdir()
    (vocab / "vocab.txt").write_bytes(BERT_VOCAB.read_bytes())
    asset_path = store.asset_path
    monkeypatch.setattr(store, "asset_path", lambda name, **kw: vocab if name.startswith("bert") else
                        asset_path(name, **kw))
    for i, p in enumerate(sorted(images.rglob("*.png"))[:-1]):
        p.with_suffix(".txt").write_text(f"a picture number {i}")
    vq = train("autoencoder", Path(__file__).parent / "fixtures" / "train" / "tiny-vq.yaml", data_root=images,
               logdir=tmp_path / "logs", overrides={"max_steps": 1, "log_images_every": 0})
    ref = _validation_folder(images, tmp_path / "ref")
    events: list = []
    run = train("ldm", Path(__file__).parent / "fixtures" / "train" / "tiny-txt.yaml", data_root=images,
                first_stage=str(vq.checkpoint), logdir=tmp_path / "logs", callback=events.append,
                overrides={"max_steps": 1, "cond_drop": 0.5, "log_images_every": 0, "eval_every": 1,
                           "eval_samples": 3, "eval_steps": 2, "eval_scale": 2.0, "eval_ref": str(ref)})
    (evaluation,) = [e for e in events if e.kind == "evaluation"]
    assert evaluation.step == 1 and math.isfinite(evaluation.metrics["val/fid"])
    captions = ImageFolder(images, 16).captions
    meta = [read_metadata(p) for p in sorted((run.run_dir / "eval" / "samples").glob("*.png"))]
    assert [m["prompt"] for m in meta] == captions[:3] and {m["scale"] for m in meta} == {2.0}
    assert json.loads((run.run_dir / "eval" / "latest.json").read_text())["reference"] == str(ref.resolve())

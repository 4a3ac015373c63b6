"""ldm train-ae / train-ldm end to end on tiny configs, config validation, schedules, resume after SIGKILL, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFERENCE

FIXTURES = Path(__file__).parent / "fixtures" / "train"
TINY_KL = FIXTURES / "tiny-kl.yaml"
TINY_LDM = FIXTURES / "tiny-ldm.yaml"
TINY_VQ = FIXTURES / "tiny-vq.yaml"
TINY_TXT = FIXTURES / "tiny-txt.yaml"


@pytest.fixture
def images(tmp_path) -> Path:
    """3 classes (sub-folders) of 8 small coloured noise images, plus one unreadable file."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
            a[..., c] += 180
            Image.fromarray(a).save(root / str(c) / f"{i}.png")
    (root / "1" / "corrupt.png").write_bytes(b"\x89PNG broken")
    return root


def _one_line_error(r, code: int, *needles: str, after_start: bool = False) -> None:
    """A usage error is the only line; a failure after the run started is the last line."""
    assert r.exit_code == code, r
    lines = r.stderr.strip().splitlines()
    assert (after_start or len(lines) == 1) and lines[-1].startswith("ldm: error:"), r
    for n in needles:
        assert n in lines[-1], r


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_autoencoder_then_class_conditional_ldm_through_the_cli(cli, images, tmp_path):
    logs = tmp_path / "logs"
    r = cli("train-ae", "--config", TINY_KL, "--data", images, "--max-steps", "3", "--checkpoint-every", "2",
            "--log-images-every", "2", "--logdir", logs, "--accumulate", "2", "--scale-lr")
    assert r.exit_code == 0, r
    assert "skipped 1 unreadable image" in r.stderr and "corrupt.png" in r.stderr
    assert "lr 0.0008" in r.stderr  # --scale-lr: 2 (accumulate) x 1 (device) x 4 (batch) x 1e-4
    ae_dir = Path(r.stdout.strip().splitlines()[-1])
    assert ae_dir.parent == logs and ae_dir.name.endswith("_tiny-kl")
    ckpt = torch.load(ae_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and len(ckpt["optimizer_states"]) == 2
    ae_opt, disc_opt = ckpt["optimizer_states"]
    assert float(ae_opt["state"][0]["step"]) == 3  # 6 batches, 3 steps
    assert float(disc_opt["state"][0]["step"]) == 1  # the discriminator trains from disc_start (2) on
    assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])
    assert not any(k.startswith("net.") for k in ckpt["state_dict"])
    assert (ae_dir / "metrics.csv").is_file() and "aeloss" in (ae_dir / "metrics.csv").read_text().splitlines()[0]
    assert sorted(p.name.split("_gs")[0] for p in (ae_dir / "images" / "train").glob("*.png")) == [
        "inputs", "reconstructions"]

    r = cli("train-ldm", "--config", TINY_LDM, "--data", images, "--first-stage", ae_dir, "--cond-drop", "0.3",
            "--max-steps", "3", "--checkpoint-every", "3", "--log-images-every", "3", "--logdir", logs)
    assert r.exit_code == 0, r
    ldm_dir = Path(r.stdout.strip().splitlines()[-1])
    state = _state(ldm_dir / "checkpoints" / "last.ckpt")
    assert any(k.startswith("model_ema.") for k in state) and "scale_factor" in state
    assert float(state["scale_factor"]) != 1.0  # scale_by_std measured the latents
    # the frozen first stage is the train-ae one
    ae_state = _state(ae_dir / "model.ckpt")
    assert torch.equal(state["first_stage_model.decoder.conv_out.weight"], ae_state["decoder.conv_out.weight"])
    assert {p.name.split("_gs")[0] for p in (ldm_dir / "images" / "train").glob("*.png")} == {
        "inputs", "reconstruction", "samples"}

    from ldmcli.loading import load

    assert load(ldm_dir / "config.yaml", ckpt=ldm_dir / "model.ckpt").global_step == 3
    out = tmp_path / "samples"
    r = cli("sample", "-r", ldm_dir, "--class", "0", "--class", "2", "-n", "2", "--steps", "3", "--scale", "2",
            "--seed", "0", "--device", "cpu", "--logdir", out)  # guidance against the null class 3 of --cond-drop
    assert r.exit_code == 0, r
    pngs = sorted((out / "samples").glob("*.png"))
    assert len(pngs) == 4 and Image.open(pngs[0]).size == (16, 16)
    assert list(out.glob("grid-*.png"))
    r = cli("sample", "-r", ldm_dir / "checkpoints" / "last.ckpt", "--class", "1", "-n", "1", "--steps", "2",
            "--device", "cpu", "--logdir", tmp_path / "from-ckpt")  # upstream's -r <ckpt> form
    assert r.exit_code == 0, r


def test_bad_inputs_are_one_line_errors(cli, images, tmp_path):
    logs = tmp_path / "logs"
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", tmp_path / "nowhere", "--logdir", logs), 1,
                    "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", empty, "--logdir", logs), 1, "no usable images")
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_KL.read_text().replace("max_steps: 4", "max_stepz: 4"))
    _one_line_error(cli("train-ae", "--config", bad, "--data", images, "--logdir", logs), 2, "max_stepz")
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", images, "--precision", "8", "--logdir", logs), 2,
                    "precision")
    _one_line_error(cli("train-ae", "--config", TINY_LDM, "--data", images, "--logdir", logs), 2, "train-ldm")
    _one_line_error(cli("train-ldm", "--config", TINY_LDM, "--data", images, "--logdir", logs), 2, "--first-stage")
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", images, "--gpus", "0", "--devices", "1",
                        "--logdir", logs), 2, "--gpus")
    _one_line_error(cli("train-ae", "--resume", tmp_path / "nope", "--logdir", logs), 2, "cannot resume")
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", images, "--val-every", "0", "--logdir", logs), 2,
                    "val_every")
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", images, "--val-fraction", "1", "--logdir", logs),
                    2, "val_fraction")
    _one_line_error(cli("train-ae", "--config", TINY_KL, "--data", images, "--val-data", images, "--val-fraction",
                        "0.1", "--logdir", logs), 2, "validation data is given twice")
    assert not logs.exists()  # nothing was written for any of these


def test_upstream_training_configs_validate():
    from ldmcli.errors import UsageError
    from ldmcli.training.config import load_train_config

    cfg = load_train_config(REFERENCE / "configs" / "configs" / "autoencoder" / "autoencoder_kl_32x32x4.yaml")
    assert cfg.settings.accumulate == 2 and cfg.data.batch_size == 12
    assert cfg.data.train.target == "ldm.data.imagenet.ImageNetSRTrain" and cfg.settings.log_images_every == 1000
    cfg = load_train_config(REFERENCE / "configs" / "configs" / "latent-diffusion" / "lsun_churches-ldm-kl-8.yaml")
    assert cfg.model.ldm.scale_by_std and cfg.data.batch_size == 96
    from ldmcli.training.run import _first_stage_hint

    assert _first_stage_hint(cfg) == "kl-f8"  # ckpt_path models/first_stage_models/kl-f8/model.ckpt
    from ldmcli.training.config import parse_train_config

    doc = {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.autoencoder.AutoencoderKL",
                     "params": {"embed_dim": 2, "lossconfig": {"target": "torch.nn.Identity"},
                                "ddconfig": {"double_z": True, "z_channels": 2, "resolution": 16, "in_channels": 3,
                                             "out_ch": 3, "ch": 32, "ch_mult": [1], "num_res_blocks": 1,
                                             "attn_resolutions": []}}},
           "lightning": {"trainer": {"gpus": "0,1", "precision": 16, "accumulate_grad_batches": 3}}}
    s = parse_train_config(doc, "main.py style", "x").settings
    assert (s.accelerator, s.devices, s.precision, s.accumulate) == ("gpu", [0, 1], "16-mixed", 3)
    doc["lightning"]["trainer"] = {"gpus": "a,b"}
    with pytest.raises(UsageError, match="lightning.trainer.gpus"):
        parse_train_config(doc, "main.py style", "x")


def test_lambda_linear_scheduler_matches_upstream_formula():
    from ldmcli.training.lr_schedule import build_schedule

    f = build_schedule({"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                        "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [1e-6], "f_max": [1.0],
                                   "f_min": [0.5]}})
    assert f(0) == pytest.approx(1e-6) and f(5) == pytest.approx((1 - 1e-6) / 10 * 5 + 1e-6)
    assert f(10) == pytest.approx(0.5 + 0.5 * 90 / 100) and f(100) == pytest.approx(0.5)


def test_atomic_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    from ldmcli.training import callbacks as cb

    path = tmp_path / "last.ckpt"
    cb.atomic_torch_save({"a": torch.ones(2)}, path)

    def boom(obj, f):  # a crash in the middle of a write
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        cb.atomic_torch_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "ldmcli", *[str(a) for a in args]]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(cli, images, tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd("train-ae", "--config", TINY_KL, "--data", images, "--max-steps", "1000",
                                 "--checkpoint-every", "3", "--log-images-every", "0", "--logdir", logs),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not list(logs.glob("*/checkpoints/last.ckpt")):
            assert proc.poll() is None and time.time() < deadline, "training died before its first checkpoint"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (run_dir,) = logs.iterdir()
    killed_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at % 3 == 0 and killed_at < 1000
    target = killed_at + 3  # mid-epoch: 6 batches per epoch

    r = cli("train-ae", "--resume", run_dir, "--max-steps", target)
    assert r.exit_code == 0, r
    resumed = _state(run_dir / "checkpoints" / "last.ckpt")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == target

    r = cli("train-ae", "--config", TINY_KL, "--data", images, "--max-steps", target, "--checkpoint-every", "3",
            "--log-images-every", "0", "--logdir", tmp_path / "straight")
    assert r.exit_code == 0, r
    straight = _state(Path(r.stdout.strip().splitlines()[-1]) / "checkpoints" / "last.ckpt")
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


@pytest.mark.slow
def test_ddp_on_cpu_two_processes_see_disjoint_data(images, tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_cmd("train-ae", "--config", TINY_KL, "--data", images, "--max-steps", "2",
                            "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--record-examples",
                            "--log-images-every", "0", "--logdir", logs),
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = logs.iterdir()
    seen = [{int(line.split()[1]) for line in (run_dir / "examples" / f"rank{k}.txt").read_text().splitlines()}
            for k in range(2)]
    assert len(seen[0]) == len(seen[1]) == 8  # 2 steps x batch 4 each
    assert seen[0].isdisjoint(seen[1])
    from ldmcli.loading import load

    model = load(run_dir / "config.yaml", ckpt=run_dir / "model.ckpt")
    assert model.global_step == 2


def _fail_at_step(monkeypatch, step: int, make_error) -> None:
    """Make the autoencoder's loss misbehave from optimizer step ``step`` on."""
    from ldmcli.training.modules import AutoencoderModule

    original = AutoencoderModule._loss

    def loss(self, x, rec, aux, idx):
        value, logs = original(self, x, rec, aux, idx)
        if self.step >= step:
            return make_error(value), logs
        return value, logs

    monkeypatch.setattr(AutoencoderModule, "_loss", loss)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(cli, images, tmp_path, monkeypatch):
    _fail_at_step(monkeypatch, 3, lambda v: v * float("nan"))
    logs = tmp_path / "logs"
    r = cli("train-ae", "--config", TINY_KL, "--data", images, "--max-steps", "6", "--checkpoint-every", "2",
            "--log-images-every", "0", "--logdir", logs)
    _one_line_error(r, 1, "loss became nan at step 3", "last good checkpoint", after_start=True)
    (run_dir,) = logs.iterdir()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and not (run_dir / "model.ckpt").exists()
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_ctrl_c_saves_a_checkpoint_and_exits_130(cli, images, tmp_path, monkeypatch):
    def interrupt(v):
        raise KeyboardInterrupt

    _fail_at_step(monkeypatch, 3, interrupt)
    logs = tmp_path / "logs"
    before = signal.getsignal(signal.SIGINT)
    r = cli("train-ae", "--config", TINY_KL, "--data", images, "--max-steps", "6", "--checkpoint-every", "100",
            "--log-images-every", "0", "--logdir", logs)
    assert r.exit_code == 130, r
    assert "interrupted: saved" in r.stderr
    assert signal.getsignal(signal.SIGINT) == before  # Lightning's SIG_IGN does not outlive the run
    (run_dir,) = logs.iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_vq_first_stage_then_text_ldm_with_caption_drop_resumes_exactly(images, tmp_path, monkeypatch):
    from conftest import BERT_VOCAB
    from ldmcli import store
    from ldmcli.training.run import train

    vocab = tmp_path / "bert"
    vocab.mkdir()
    (vocab / "vocab.txt").write_bytes(BERT_VOCAB.read_bytes())
    monkeypatch.setattr(store, "asset_path", lambda name, **kw: vocab)
    for i, p in enumerate(sorted(images.rglob("*.png"))[:-1]):
        p.with_suffix(".txt").write_text(f"a picture number {i}")
    events: list[dict] = []
    vq = train("autoencoder", TINY_VQ, data_root=images, logdir=tmp_path / "logs", callback=events.append)
    assert vq.global_step == 2 and "quantize.embedding.weight" in _state(vq.checkpoint)
    assert any(e.kind == "warning" and "unreadable" in e.text for e in events)

    def run_txt(**kw):
        return train("ldm", TINY_TXT, data_root=images, first_stage=str(vq.checkpoint), logdir=tmp_path / "logs",
                     overrides={"cond_drop": 0.5, "checkpoint_every": 2, **kw.pop("overrides", {})}, **kw)

    first = run_txt()
    assert first.global_step == 2
    state = _state(first.checkpoint)
    assert any(k.startswith("cond_stage_model.transformer.") for k in state)  # the trainable BERT is trained
    assert any(p.name.startswith("samples_") for p in (first.run_dir / "images" / "train").iterdir())
    resumed = train("ldm", resume=first.run_dir, overrides={"max_steps": 4})
    straight = run_txt(overrides={"max_steps": 4})
    a, b = _state(resumed.checkpoint), _state(straight.checkpoint)
    assert resumed.global_step == straight.global_step == 4
    for k in b:  # UNet, EMA shadows, BERT, schedule: all equal to the uninterrupted run
        assert torch.equal(a[k], b[k]), k
    sched = torch.load(resumed.checkpoint, weights_only=True)["lr_schedulers"]
    assert sched == [] or sched[0]["last_epoch"] == 4


def test_unconditional_ldm_trains_and_refuses_cond_drop(images, tmp_path):
    import yaml

    from ldmcli.errors import UsageError
    from ldmcli.training.run import train

    ae = train("autoencoder", TINY_KL, data_root=images, logdir=tmp_path / "logs", overrides={"max_steps": 1})
    doc = yaml.safe_load(TINY_LDM.read_text())
    doc["cond_stage"] = "unconditional"
    doc["unet"].pop("context_dim")
    doc["unet"]["use_spatial_transformer"] = False  # plain self-attention blocks
    for key in ("cond_stage_key", "cond_stage_trainable", "conditioning_key"):
        doc["diffusion"].pop(key)
    config = tmp_path / "uncond.yaml"
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(UsageError, match="--cond-drop needs class or text conditioning"):
        train("ldm", config, data_root=images, first_stage=str(ae.run_dir), overrides={"cond_drop": 0.1})
    run = train("ldm", config, data_root=images, first_stage=str(ae.run_dir), logdir=tmp_path / "logs",
                overrides={"max_steps": 2, "log_images_every": 2})
    assert run.global_step == 2 and not any(k.startswith("cond_stage_model.") for k in _state(run.checkpoint))


def test_shipped_training_presets_validate():
    from ldmcli.training.config import load_train_config, preset_names

    assert {"digits-kl", "digits-ldm"} <= set(preset_names())
    for name in preset_names():
        cfg = load_train_config(name)
        assert cfg.data is not None and (cfg.settings.max_steps or cfg.settings.max_epochs), name
    assert load_train_config("digits-ldm").settings.cond_drop > 0


def test_first_stage_by_zoo_name_uses_the_store_checkpoint(images, tmp_path, monkeypatch):
    from ldmcli import store, zoo
    from ldmcli.training.run import train

    ae = train("autoencoder", TINY_KL, data_root=images, logdir=tmp_path / "logs", overrides={"max_steps": 1})
    entry = zoo.ZooEntry(name="tiny-fs", kind="first_stage", dest="models/first_stage_models/tiny-fs", files=(),
                         contents=("model.ckpt",), arch=str(ae.run_dir / "config.yaml"), checkpoint="model.ckpt")
    monkeypatch.setitem(zoo.REGISTRY, entry.name, entry)
    asked = []
    monkeypatch.setattr(store, "checkpoint_path", lambda name, **kw: asked.append(name) or ae.model_checkpoint)
    run = train("ldm", TINY_LDM, data_root=images, first_stage="tiny-fs", logdir=tmp_path / "logs",
                overrides={"max_steps": 1, "log_images_every": 0})
    assert asked == ["tiny-fs"]
    assert torch.equal(_state(run.checkpoint)["first_stage_model.encoder.conv_in.weight"],
                       _state(ae.model_checkpoint)["encoder.conv_in.weight"])


# ------------------------------------------------------------------ issue 14: nothing lost, nothing silently wrong

def test_run_folders_are_claimed_atomically(tmp_path):
    import datetime as dt
    from concurrent.futures import ThreadPoolExecutor

    from ldmcli.training.run import claim_run_dir

    now = dt.datetime(2026, 12, 1, 12, 0, 0)
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: claim_run_dir(tmp_path / "logs", "tiny kl", now=now), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() for d in dirs)  # every run its own folder
    assert sorted(d.name for d in dirs)[:2] == ["2026-12-01T12-00-00_tiny-kl", "2026-12-01T12-00-00_tiny-kl-10"]
    (tmp_path / "file").write_text("x")
    from ldmcli.errors import UsageError

    with pytest.raises(UsageError, match="cannot create the log folder"):
        claim_run_dir(tmp_path / "file" / "logs", "x")


def _metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    text = (run_dir / "metrics.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    return text.splitlines()[0].split(","), rows


def test_short_run_writes_metrics_and_resumes_append_to_them_exactly(images, tmp_path):
    from ldmcli.training.run import train

    logs = tmp_path / "logs"
    first = train("autoencoder", TINY_KL, data_root=images, logdir=logs,
                  overrides={"max_steps": 2, "log_every": 50, "log_images_every": 0})
    header, rows = _metrics(first.run_dir)
    assert "aeloss" in header and len(rows) == 1 and rows[0]["aeloss"]  # 2 steps < log_every: still written
    last = torch.load(first.checkpoint, weights_only=True)
    assert not any(k.startswith("loss.perceptual_loss.") for k in last["state_dict"])  # frozen VGG16 left out
    assert any(k.startswith("loss.discriminator.") for k in last["state_dict"])  # trained: kept for --resume
    assert first.checkpoint.stat().st_size < 10e6  # was 79 MB
    model = torch.load(first.model_checkpoint, weights_only=True)["state_dict"]
    assert not any(k.startswith("loss.") for k in model) and first.model_checkpoint.stat().st_size < 5e6

    from ldmcli.loading import load

    assert load(first.run_dir / "config.yaml", ckpt=first.model_checkpoint).global_step == 2

    train("autoencoder", resume=first.run_dir, overrides={"max_steps": 3, "log_every": 1})
    resumed = train("autoencoder", resume=first.run_dir, overrides={"max_steps": 5, "log_every": 1})
    header2, rows2 = _metrics(first.run_dir)
    text = (first.run_dir / "metrics.csv").read_text()
    assert text.count("aeloss") == 1 and header2[:len(header)] == header  # one header; the old columns first
    assert rows2[0] == {**{k: "" for k in header2}, **rows[0]}  # the first segment's row is still there
    assert len(rows2) == 1 + 1 + 2  # 2 steps (1 logged), then 1, then 2
    assert any(r.get("train/disc_loss") for r in rows2)  # a column that appeared later (disc_start 2)

    straight = train("autoencoder", TINY_KL, data_root=images, logdir=tmp_path / "straight",
                     overrides={"max_steps": 5, "log_images_every": 0})
    a, b = _state(resumed.checkpoint), _state(straight.checkpoint)
    assert a.keys() == b.keys()
    for k in b:  # two resumes without the LPIPS weights in the files: still the uninterrupted run's weights
        assert torch.equal(a[k], b[k]), k


def test_resume_with_nothing_left_to_train_says_so(cli, images, tmp_path):
    from ldmcli.training.run import train

    run = train("autoencoder", TINY_KL, data_root=images, logdir=tmp_path / "logs",
                overrides={"max_steps": 2, "log_images_every": 0})
    before = (run.checkpoint.stat().st_mtime_ns, (run.run_dir / "metrics.csv").read_text())
    for extra in ((), ("--max-steps", "1"), ("--max-steps", "2")):
        _one_line_error(cli("train-ae", "--resume", run.run_dir, *extra), 2, "nothing to train", "at step 2",
                        "above 2")
    assert before == (run.checkpoint.stat().st_mtime_ns, (run.run_dir / "metrics.csv").read_text())
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run.run_dir, broken)
    data = (broken / "checkpoints" / "last.ckpt").read_bytes()
    (broken / "checkpoints" / "last.ckpt").write_bytes(data[: len(data) // 2])
    _one_line_error(cli("train-ae", "--resume", broken, "--max-steps", "4"), 1, "not a checkpoint (truncated or corrupt)")


def test_config_errors_come_before_lightning_or_torch_is_imported(images, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_KL.read_text().replace("max_steps: 4", "max_stepz: 4"))
    probe = ("import sys, runpy\n"
             "sys.argv = ['ldm'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('ldmcli', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('EXIT', code, 'lightning' in sys.modules, 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for args in (["--config", str(bad), "--data", str(images)],
                 ["--config", str(TINY_KL), "--data", str(tmp_path / "missing")],
                 ["--config", str(TINY_KL), "--data", str(images), "--val-data", str(tmp_path / "missing")]):
        r = subprocess.run([sys.executable, "-c", probe, "train-ae", *args, "--logdir", str(tmp_path / "logs")],
                           env=env, capture_output=True, text=True, timeout=120)
        # neither Lightning nor torch was imported: the error comes in about a second, not 7-10
        assert r.stdout.strip().splitlines()[-1] in ("EXIT 2 False False", "EXIT 1 False False"), (r.stdout, r.stderr)
        assert r.stderr.strip().startswith("ldm: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "logs").exists()


def test_16_bit_precision_on_cpu_warns(monkeypatch):
    from ldmcli.training.run import _cpu_precision_warning

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for accelerator in ("cpu", "auto"):
        text = _cpu_precision_warning(accelerator, "16-mixed")
        assert text and "slower" in text and "--precision 32" in text and "\n" not in text
    assert _cpu_precision_warning("cpu", "32") is None and _cpu_precision_warning("gpu", "16-mixed") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cpu_precision_warning("auto", "16-mixed") is None


# --------------------------------------------------------------------------- issue 15 item 4: validation

def test_autoencoder_validation_on_a_held_out_fraction_keeps_the_best_checkpoint(cli, images, tmp_path):
    logs = tmp_path / "logs"
    r = cli("train-ae", "--config", TINY_KL, "--data", images, "--val-fraction", "0.25", "--val-every", "2",
            "--max-steps", "3", "--log-images-every", "0", "--logdir", logs)
    assert r.exit_code == 0, r
    assert "(18 examples, 6 for validation" in r.stderr  # 24 readable images, 0.25 of them held out
    assert "validation at step 2: val/rec_loss" in r.stderr and "validation at step 3" in r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    header, rows = _metrics(run_dir)
    val_rows = [row for row in rows if row.get("val/rec_loss")]
    assert len(val_rows) == 2 and {"val/total_loss", "val/disc_loss", "val/kl_loss"} <= set(header)
    best = run_dir / "checkpoints" / "best.ckpt"
    assert best.is_file()
    values = [float(row["val/rec_loss"]) for row in val_rows]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (val_state,) = [v for k, v in state["callbacks"].items() if "Validation" in k]
    assert val_state["best"] == pytest.approx(min(values)) and val_state["best_step"] == 2 + values.index(min(values))
    assert torch.load(best, weights_only=True)["global_step"] == val_state["best_step"]
    assert yaml_load(run_dir / "train.yaml")["training"]["val_fraction"] == 0.25  # --resume holds out the same


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_ldm_validation_logs_loss_simple_and_its_ema_twin(images, tmp_path):
    from ldmcli.training.run import train

    ae = train("autoencoder", TINY_KL, data_root=images, logdir=tmp_path / "logs", overrides={"max_steps": 1})
    val = tmp_path / "val"
    for c in (1, 2):  # some of the classes: they keep the training folder's ids
        (val / str(c)).mkdir(parents=True)
        for p in sorted((images / str(c)).glob("*.png"))[:2]:
            (val / str(c) / p.name).write_bytes(p.read_bytes())
    from ldmcli.training.data import ImageFolder
    from ldmcli.training.run import _same_classes

    val_set = ImageFolder(val, 16)
    _same_classes(ImageFolder(images, 16), val_set)
    assert val_set.labels == [1, 1, 2, 2]
    events: list = []
    run = train("ldm", TINY_LDM, data_root=images, val_data=val, first_stage=str(ae.run_dir),
                logdir=tmp_path / "logs", callback=events.append,
                overrides={"max_steps": 2, "val_every": 1, "log_images_every": 0})
    checks = [e for e in events if e.kind == "validation"]
    assert [e.step for e in checks] == [1, 2] and checks[0].monitor == "val/loss_simple_ema"
    assert {"val/loss_simple", "val/loss_simple_ema", "val/loss_vlb", "val/loss"} <= set(checks[0].metrics)
    # the first step's warm-up LR is 1e-6 x lr: only after the second do the EMA weights differ measurably
    assert checks[1].metrics["val/loss_simple"] != checks[1].metrics["val/loss_simple_ema"]
    assert run.best_checkpoint is not None and run.best_checkpoint.name == "best.ckpt"
    header, _ = _metrics(run.run_dir)
    assert "val/loss_simple_ema" in header
    assert yaml_load(run.run_dir / "train.yaml")["data"]["validation"]["params"]["root"] == str(val.resolve())

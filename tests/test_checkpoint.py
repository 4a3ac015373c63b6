"""Checkpoint reading without pickled code, the safetensors writer, and strict key matching."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldmcli.checkpoint import (
    Checkpoint,
    LightningModelCheckpointStub,
    load_checkpoint,
    match_state_dict,
    safetensors_sidecar,
    save_safetensors,
)
from ldmcli.errors import CheckpointError


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.weight": torch.randn(4, 8, generator=g),
        "model.diffusion_model.out.bias": torch.randn(4, generator=g),
        "betas": torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64).float(),
        "model_ema.num_updates": torch.tensor(7, dtype=torch.int32),
    }


@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in ``pytorch_lightning.callbacks.model_checkpoint`` module, only so the test can pickle its class."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mods[names[-1]].ModelCheckpoint = ModelCheckpoint
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return ModelCheckpoint


def test_lightning_checkpoint_with_callbacks_and_numpy_scheduler_state(tmp_path, fake_lightning):
    sd = _state_dict()
    ckpt = {
        "epoch": 3,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {fake_lightning: {"best_model_score": torch.tensor(0.5), "monitor": "val/loss"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": np.float64(1e-4), "betas": (0.9, 0.999)}]}],
        "lr_schedulers": [{"base_lrs": [np.float64(1e-6)], "last_epoch": np.int64(4), "scale": np.float32(1.0)}],
    }
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    sys.modules.pop("pytorch_lightning.callbacks.model_checkpoint")  # loading must not need Lightning
    loaded = load_checkpoint(path)
    assert loaded.format == "pickle"
    assert loaded.global_step == 470000
    assert set(loaded.state_dict) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict[k], v)
    assert loaded.state_dict["model_ema.num_updates"].dtype == torch.int32


def test_bare_state_dict_and_missing_global_step(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": _state_dict()}, path)
    assert load_checkpoint(path).global_step is None
    torch.save(_state_dict(), tmp_path / "bare.pt")
    assert set(load_checkpoint(tmp_path / "bare.pt").state_dict) == set(_state_dict())
    # torch < 1.6 wrote a tar-based format that cannot be memory-mapped: it is read normally
    torch.save({"state_dict": _state_dict(), "global_step": 5}, tmp_path / "old.ckpt",
               _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "old.ckpt").global_step == 5


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _state_dict(), "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message
    assert "system" in message  # names the global (posix.system / nt.system)


def test_plain_pickle_with_reduce_is_refused(tmp_path):
    """A non-zip pickle (what an attacker would hand-write) is refused too, before the payload runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_checkpoint(tmp_path / "odd.ckpt")


def test_safetensors_roundtrip_aliases_metadata_and_atomicity(tmp_path):
    sd = _state_dict()
    sd["bf16"] = torch.randn(3, 5).to(torch.bfloat16)
    sd["scalar"] = torch.tensor(0.9999)
    sd["strided"] = torch.randn(6, 4).t()  # non-contiguous
    shared = torch.randn(2, 3)
    sd["first_stage_model.w"] = shared
    sd["cond_stage_model.w"] = shared  # __is_first_stage__: the same tensor under two names
    path = tmp_path / "model.safetensors"
    save_safetensors(path, sd, metadata={"config": json.dumps({"a": 1})}, global_step=12)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    with safe_open(str(path), "pt") as f:  # the reference reader accepts our writer's output
        assert "cond_stage_model.w" not in f.keys()
        assert torch.equal(f.get_tensor("strided"), sd["strided"])
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint) and loaded.format == "safetensors"
    assert loaded.global_step == 12
    assert json.loads(loaded.metadata["config"]) == {"a": 1}
    assert set(loaded.state_dict) == set(sd)
    for k, v in sd.items():
        assert loaded.state_dict[k].dtype == v.dtype
        assert torch.equal(loaded.state_dict[k], v), k


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError):
        save_safetensors(path, {"a": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []
    assert safetensors_sidecar(tmp_path / "x" / "model.ckpt") == tmp_path / "x" / "model.safetensors"


def test_match_state_dict_rules():
    expected = {"model.w": torch.Size([2, 3]), "betas": (10,)}
    good = {"model.w": torch.zeros(2, 3), "betas": torch.zeros(10)}
    extras = {
        "model_ema.w": torch.zeros(2, 3),
        "model_ema.decay": torch.tensor(0.9999),
        "loss.logvar": torch.zeros(()),
        "ddim_sigmas": torch.zeros(50),
        "ddim_alphas_prev": torch.zeros(50),
    }
    assert set(match_state_dict(expected, {**good, **extras})) == set(expected)
    with pytest.raises(CheckpointError, match=r"lacks 1 .*betas.*different config"):
        match_state_dict(expected, {"model.w": torch.zeros(2, 3)})
    with pytest.raises(CheckpointError, match=r"cond_stage_model\.x"):
        match_state_dict(expected, {**good, "cond_stage_model.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"model\.w has shape \[3, 2\] but the config builds \[2, 3\]"):
        match_state_dict(expected, {**good, "model.w": torch.zeros(3, 2)})
    # a model that keeps its EMA must get EMA keys it lacks reported as missing, not dropped
    with pytest.raises(CheckpointError, match="model_ema.w"):
        match_state_dict({**expected, "model_ema.w": (2, 3)}, good)
    assert LightningModelCheckpointStub.__name__ == "LightningModelCheckpointStub"


def _corrupt_files(tmp_path):
    torch.save({"state_dict": _state_dict(), "global_step": 3}, tmp_path / "good.ckpt")
    good = (tmp_path / "good.ckpt").read_bytes()
    save_safetensors(tmp_path / "good.safetensors", _state_dict())
    good_st = (tmp_path / "good.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    return {
        "truncated-half.ckpt": good[: len(good) // 2],
        "truncated-tail.ckpt": good[:-60],  # the zip's central directory is gone
        "random.ckpt": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "html.ckpt": b"<html><body>404 Not Found</body></html>",
        "empty.ckpt": b"",
        "truncated.safetensors": good_st[: len(good_st) // 2],
        "random.safetensors": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "header-only.safetensors": good_st[:20],
    }


def test_truncated_or_random_files_are_one_line_not_a_checkpoint(tmp_path):
    for name, data in _corrupt_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(err.value) == f"{path}: not a checkpoint (truncated or corrupt)", name
    assert load_checkpoint(tmp_path / "good.ckpt").global_step == 3  # the intact files still load
    assert set(load_checkpoint(tmp_path / "good.safetensors").state_dict) == set(_state_dict())


def test_read_errors_are_not_called_corrupt(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _state_dict()}, path)
    for error, text in ((PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
                        (OSError(errno.EIO, "Input/output error"), "input/output error")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(torch, "load", fail)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(err.value).startswith(f"cannot read {path}: {text}") and "corrupt" not in str(err.value)

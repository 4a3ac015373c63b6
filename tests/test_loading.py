"""load_model end to end on tiny random-weight models of every family; devices and precision; peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from ldmcli import checkpoint as ckpt_io
from ldmcli.devices import cpu_flags, cpu_has_native_bf16, pick_device, resolve_precision
from ldmcli.errors import CheckpointError, UnknownModelError, UsageError
from ldmcli.fileio import sha256_file
from ldmcli.loading import load, load_model
from tinymodels import FAMILIES, install_bert_vocab, install_tiny, write_tiny

EMA_FAMILIES = [f for f in FAMILIES if f != "txt2img"]


def _saved(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_strictly_with_ema_weights(family, tmp_path):
    files = write_tiny(family, tmp_path, global_step=77)
    if family == "txt2img":
        install_bert_vocab()
    saved = _saved(files.ckpt)
    loaded = load(files.config, ckpt=files.ckpt)
    model = loaded.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert loaded.global_step == 77 and loaded.ckpt_path == files.ckpt and loaded.config is not None
    assert not hasattr(model, "ldm_config") and not hasattr(model, "ckpt_path")  # nothing hung on the module
    uses_ema = family in EMA_FAMILIES
    assert loaded.uses_ema_weights is uses_ema
    sd = model.state_dict()
    for key, value in sd.items():
        if uses_ema and key.startswith("model."):
            shadow = "model_ema." + key[len("model."):].replace(".", "")
            if shadow in saved:
                assert torch.equal(value, saved[shadow]), key
                assert not torch.equal(value, saved[key]), f"{key} still holds the raw weight"
                continue
        assert torch.equal(value, saved[key]), key
        assert value.dtype == saved[key].dtype
    assert not any(k.startswith("model_ema.") for k in sd)  # shadows dropped: ema_scope() cannot clone them
    with model.ema_scope():
        pass


def test_raw_weights_with_ema_false(tmp_path):
    files = write_tiny("cin", tmp_path)
    saved = _saved(files.ckpt)
    loaded = load(files.config, ckpt=files.ckpt, ema=False)
    model = loaded.model
    assert loaded.uses_ema_weights is False
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("model."))
    key = next(k for k in saved if k.startswith("model.diffusion_model.") and k.endswith("weight"))
    assert torch.equal(model.state_dict()[key], saved[key])
    shadow = "model_ema." + key[len("model."):].replace(".", "")
    with model.ema_scope():  # upstream behaviour is kept: the scope swaps the shadows in
        assert torch.equal(model.state_dict()[key], saved[shadow])
    assert torch.equal(model.state_dict()[key], saved[key])
    folder = load(files.folder, ema=False)  # upstream's layout: <dir>/config.yaml + <dir>/model.ckpt
    assert folder.ckpt_path == files.ckpt and torch.equal(folder.model.state_dict()[key], saved[key])


def test_checkpoint_without_ema_needs_ema_false(tmp_path):
    files = write_tiny("uncond", tmp_path)
    sd = {k: v for k, v in _saved(files.ckpt).items() if not k.startswith("model_ema.")}
    torch.save({"state_dict": sd}, tmp_path / "noema.ckpt")
    with pytest.raises(CheckpointError, match="ema=False"):
        load_model(files.config, ckpt=tmp_path / "noema.ckpt")
    loaded = load(files.config, ckpt=tmp_path / "noema.ckpt", ema=False)
    model = loaded.model
    assert loaded.global_step is None
    assert not hasattr(model, "model_ema")


def test_training_extras_are_dropped_but_unknown_keys_and_wrong_configs_fail(tmp_path):
    files = write_tiny("sr", tmp_path / "sr")
    sd = _saved(files.ckpt)
    extras = {"ddim_sigmas": torch.zeros(50), "ddim_alphas": torch.zeros(50), "ddim_alphas_prev": torch.zeros(50),
              "ddim_sqrt_one_minus_alphas": torch.zeros(50), "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": {**sd, **extras}}, tmp_path / "last.ckpt")  # like inpainting_big's last.ckpt
    load_model(files.config, ckpt=tmp_path / "last.ckpt")
    torch.save({"state_dict": {**sd, "model.diffusion_model.extra.weight": torch.zeros(1)}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.extra\.weight"):
        load_model(files.config, ckpt=tmp_path / "x.ckpt")
    other = write_tiny("uncond", tmp_path / "uncond")
    with pytest.raises(CheckpointError, match="different config"):
        load_model(other.config, ckpt=files.ckpt)  # concat 6-channel UNet vs 3-channel: shape mismatch
    key = "model.diffusion_model.out.2.bias"
    bad = {**sd, key: torch.zeros(5)}
    torch.save({"state_dict": bad}, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"out\.2\.bias has shape \[5\]"):
        load_model(files.config, ckpt=tmp_path / "shape.ckpt", ema=False)


def test_usage_errors_come_before_work(tmp_path):
    files = write_tiny("uncond", tmp_path, ckpt=False)
    with pytest.raises(UsageError, match="needs a checkpoint"):
        load_model(files.config)
    with pytest.raises(UsageError, match="not found"):
        load_model(files.config, ckpt=tmp_path / "missing.ckpt")
    with pytest.raises(UsageError, match="not found"):
        load_model(tmp_path / "nope.yaml", ckpt=tmp_path / "missing.ckpt")
    with pytest.raises(UnknownModelError):
        load_model("no-such-model")
    with pytest.raises(UsageError):
        load_model(files.config, ckpt=tmp_path / "x.ckpt", dtype=torch.int64)


def test_zoo_load_writes_safetensors_copy_and_uses_it(monkeypatch):
    files = install_tiny("cin", monkeypatch)
    sidecar = files.folder / "model.safetensors"
    messages: list[str] = []
    first = load("tiny-cin", callback=messages.append)
    assert sidecar.is_file() and any("model.safetensors" in m for m in messages)
    assert first.ckpt_sha256 == sha256_file(files.ckpt)
    meta = ckpt_io.load_safetensors(sidecar).metadata
    assert meta["global_step"] == str(files.global_step)
    assert json.loads(meta["ldmcli.config"])  # the resolved config travels with the weights

    real_load = torch.load

    def no_pickles(*args, **kwargs):
        raise AssertionError("the .ckpt pickle was read although a safetensors copy exists")

    monkeypatch.setattr(torch, "load", no_pickles)
    second = load("tiny-cin")
    assert second.ckpt_path == sidecar and second.global_step == files.global_step
    assert second.ckpt_sha256 == first.ckpt_sha256
    for (k1, v1), (k2, v2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    alone = load(sidecar)  # our safetensors carry their config: no config file needed
    assert alone.global_step == files.global_step
    monkeypatch.setattr(torch, "load", real_load)

    # a replaced .ckpt makes the copy stale: it is converted again
    write_tiny("cin", files.folder, seed=1)
    third = load("tiny-cin")
    assert third.ckpt_path == files.ckpt
    assert not torch.equal(third.model.state_dict()["model.diffusion_model.out.2.bias"],
                           second.model.state_dict()["model.diffusion_model.out.2.bias"])
    assert ckpt_io.load_safetensors(sidecar).metadata["ldmcli.source"] == ckpt_io.source_fingerprint(files.ckpt)


def test_text_model_through_zoo_and_lazy_sha(monkeypatch, tmp_path):
    install_tiny("txt2img", monkeypatch)
    model = load_model("tiny-txt2img", dtype=torch.bfloat16)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.cond_stage_model.transformer.token_emb.weight.dtype == torch.bfloat16
    assert model.betas.dtype == torch.float32  # the schedule stays float32
    files = write_tiny("uncond", tmp_path)
    plain = load(files.config, ckpt=files.ckpt)
    assert plain.ckpt_sha256 is None
    assert plain.sha256() == sha256_file(files.ckpt) == plain.ckpt_sha256


def test_python_api_export():
    import ldmcli

    assert ldmcli.load_model is load_model


# ------------------------------------------------------------------------------------------------ devices


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert pick_device(None).type != "cuda"
        with pytest.raises(UsageError, match="not available"):
            pick_device("cuda")
    with pytest.raises(UsageError):
        pick_device("tpu")
    with pytest.raises(UsageError):
        pick_device("cuda:99")


def test_resolve_precision(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu, cpu_flags_override=frozenset({"avx2", "avx512_bf16"})) == torch.bfloat16
    assert resolve_precision("auto", cpu, cpu_flags_override=frozenset({"amx_bf16"})) == torch.bfloat16
    assert resolve_precision(None, cpu, cpu_flags_override=frozenset({"avx2", "avx512f"})) == torch.float32
    with pytest.raises(UsageError, match="fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="unknown precision"):
        resolve_precision("fp8", cpu)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == frozenset({"fpu", "sse", "avx512f", "avx512_bf16"})
    assert cpu_has_native_bf16(cpu_flags(info))
    assert cpu_flags(tmp_path / "absent") == frozenset()


# ------------------------------------------------------------------------------------------------ memory

_BIG_CONFIG = """model:
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    embed_dim: 4
    ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 96,
               ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
    lossconfig: {target: torch.nn.Identity}
"""

_MEASURE = textwrap.dedent("""
    import gc, sys, torch
    from ldmcli.loading import load_model
    import ldmcli.config, ldmcli.models.autoencoder, safetensors  # imports are not the weights
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    for i, ckpt in enumerate(sys.argv[2:]):
        if i:  # reset the peak (VmHWM) so each format is measured on its own; else measure in a fresh process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        before = status("VmRSS")
        model = load_model(sys.argv[1], ckpt=ckpt)
        total = sum(float(p.double().sum()) for p in model.parameters())  # touch every page of the weights
        print(status("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
        del model
        gc.collect()
""")


def _peak_growth(cfg_path, ckpts) -> list[tuple[int, int]]:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(cfg_path), *map(str, ckpts)],
                         capture_output=True, text=True, cwd=REPO, timeout=180)
    if out.returncode != 0 and len(ckpts) > 1 and "clear_refs" in out.stderr:
        return [row for c in ckpts for row in _peak_growth(cfg_path, [c])]
    assert out.returncode == 0, out.stderr[-2000:]
    return [tuple(map(int, line.split())) for line in out.stdout.strip().splitlines()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_one_copy_of_the_weights(tmp_path):
    """Loading a ~190 MB checkpoint grows peak RSS by at most 1.25x its size + 64 MB, for .ckpt and .safetensors.

    A load that materialises a second copy (random init + copy, or reading the file into RAM and then into the
    parameters) needs at least 2x.
    """
    from ldmcli import config

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(_BIG_CONFIG)
    with torch.device("meta"):
        skeleton = config.build_model(config.load_config(cfg_path))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in skeleton.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in sd.values())
    assert size > 150e6
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "model.ckpt")
    ckpt_io.save_safetensors(tmp_path / "model.safetensors", sd)
    del sd
    names = ("model.ckpt", "model.safetensors")
    for name, (growth, weights) in zip(names, _peak_growth(cfg_path, [tmp_path / n for n in names]), strict=True):
        assert weights == size
        assert growth <= 1.25 * size + 64e6, f"{name}: peak RSS grew {growth / 1e6:.0f} MB for {size / 1e6:.0f} MB"


def _mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(str(path) in line for line in maps)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("route", ["load_model", "prepare_for_inference"])
def test_a_bf16_model_does_not_keep_the_float32_file_mapped(route, tmp_path):
    """After casting to bf16, nothing may hold a view of the float32 checkpoint: its memory map (every page of the
    float32 weights) must go, or a bf16 model costs 1.5x the float32 one in RSS."""
    import gc

    from ldmcli.fastpath import prepare_for_inference

    files = write_tiny("churches", tmp_path, ckpt=False, safetensors=True)
    if route == "load_model":
        model = load_model(files.config, ckpt=files.safetensors, dtype=torch.bfloat16)
    else:
        model = load_model(files.config, ckpt=files.safetensors)
        assert _mapped(files.safetensors.resolve())  # float32 on the CPU: the map is the model's one copy
        prepare_for_inference(model, dtype=torch.bfloat16, pack=False)
    gc.collect()
    assert not _mapped(files.safetensors.resolve())
    assert model.betas.dtype == torch.float32 and model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16

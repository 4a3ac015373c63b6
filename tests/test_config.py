"""Config layer: presets equal the upstream configs, round trips, accessors, and one clear error per bad config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REFERENCE
from ldmcli import config
from ldmcli.errors import UnknownModelError, UsageError

CONFIGS = REFERENCE / "configs"
UPSTREAM = {
    **{n: f"models/first_stage_models/{n}/config.yaml" for n in ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4",
                                                                 "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16")},
    **{n: f"models/ldm/{n}/config.yaml" for n in ("celeba256", "ffhq256", "lsun_churches256", "lsun_beds256",
                                                  "text2img256", "cin256", "bsr_sr", "layout2img-openimages256",
                                                  "semantic_synthesis256", "semantic_synthesis512",
                                                  "inpainting_big")},
    "cin256-v2": "configs/latent-diffusion/cin256-v2.yaml",
    "txt2img-f8-large": "configs/latent-diffusion/txt2img-1p4B-eval.yaml",
    "rdm768x768": "configs/retrieval-augmented-diffusion/768x768.yaml",
}


def _upstream(rel: str) -> dict:
    return yaml.safe_load((CONFIGS / rel).read_text())


def _write(tmp_path: Path, doc: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _error(tmp_path: Path, doc: dict) -> str:
    with pytest.raises(UsageError) as info:
        config.load_config(_write(tmp_path, doc))
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- presets vs upstream


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_preset_equals_upstream_config(name):
    preset = config.load_config(name)
    upstream = config.load_config(CONFIGS / UPSTREAM[name])
    if upstream.ldm is not None:  # an LDM's embedded first stage carries no loss (DummyLoss ≡ none) nor monitor
        fs = dataclasses.replace(upstream.ldm.first_stage, loss=config.LossConfig("none"), monitor=None)
        upstream = dataclasses.replace(upstream, model=dataclasses.replace(upstream.ldm, first_stage=fs))
    assert preset == upstream


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_round_trip_through_json(name):
    cfg = config.load_config(name)
    stored = json.dumps(config.config_to_dict(cfg))  # what the loader keeps in safetensors metadata
    back = config.config_from_dict(json.loads(stored))
    assert back == cfg and back.name == name
    assert config.parse_config(json.loads(stored)) == cfg


def test_round_trip_of_upstream_config_through_file(tmp_path):
    cfg = config.load_config(CONFIGS / UPSTREAM["inpainting_big"])
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config.config_to_dict(cfg)))
    back = config.load_config(path)
    assert back == cfg and back.first_stage.loss.type == "dummy"
    json_path = tmp_path / "mine.json"
    json_path.write_text(json.dumps(config.config_to_dict(cfg)))
    assert config.load_config(json_path) == cfg


# ----------------------------------------------------------------------------------------------------- accessors


def test_accessors_text_to_image():
    cfg = config.load_config("txt2img-f8-large")
    assert cfg.kind == "ldm" and cfg.use_ema is False
    assert cfg.conditioning_key == "crossattn" and cfg.conditioner == "bert"
    assert cfg.downsampling_factor == 8 and cfg.latent_channels == 4 and cfg.channels == 4
    assert cfg.image_size == 32 and cfg.pixel_size == 256
    assert cfg.scale_factor == pytest.approx(0.18215)
    assert cfg.parameterization == "eps"
    assert cfg.schedule == {"beta_schedule": "linear", "timesteps": 1000, "linear_start": 0.00085,
                            "linear_end": 0.012, "cosine_s": 8e-3, "given_betas": None, "v_posterior": 0.0}
    assert cfg.ldm.cond_stage.params == config.BERTEmbedderParams(n_embed=1280, n_layer=32)


def test_accessors_other_families():
    kl = config.load_config("kl-f8")
    assert kl.kind == "first_stage" and kl.ldm is None and kl.use_ema is False
    assert kl.conditioning_key is None and kl.conditioner is None and kl.schedule is None
    assert kl.downsampling_factor == 8 and kl.latent_channels == 4 and kl.image_size == 256
    assert kl.first_stage.loss.type == "lpips_kl"
    assert config.load_config("vq-f16").first_stage.n_embed == 16384

    celeba = config.load_config("celeba256")
    assert celeba.conditioning_key is None and celeba.conditioner == "unconditional" and celeba.use_ema
    assert celeba.first_stage.type == "vq_interface" and celeba.first_stage.loss.type == "none"
    assert config.load_config("bsr_sr").conditioning_key == "concat"  # from upstream's concat_mode default
    inpaint = config.load_config("inpainting_big")
    assert inpaint.conditioner == "first_stage" and inpaint.conditioning_key == "concat"
    assert inpaint.first_stage.ddconfig.attn_type == "none"
    assert config.load_config("cin256-v2").ldm.cond_stage.params.n_classes == 1001
    churches = config.load_config("lsun_churches256")
    assert churches.ldm.scale_by_std and churches.scale_factor == 1.0
    assert config.load_config("rdm768x768").downsampling_factor == 16
    layout = config.load_config("layout2img-openimages256").ldm.cond_stage.params
    assert (layout.vocab_size, layout.max_seq_len, layout.use_tokenizer) == (8192, 92, False)


# ------------------------------------------------------------------------------------------- upstream handling


def test_unknown_targets_are_named(tmp_path):
    doc = _upstream(UPSTREAM["celeba256"])
    doc["model"]["target"] = "ldm.models.diffusion.ddpm.LatentDiffusionV9"
    assert "ldm.models.diffusion.ddpm.LatentDiffusionV9" in _error(tmp_path, doc)

    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["cond_stage_config"]["target"] = "os.system"
    message = _error(tmp_path, doc)
    assert "'os.system'" in message and "cond_stage_config.target" in message

    doc = _upstream(UPSTREAM["kl-f8"])
    doc["model"]["params"]["lossconfig"]["target"] = "my.losses.Fancy"
    assert "my.losses.Fancy" in _error(tmp_path, doc)


def test_ckpt_path_is_ignored(tmp_path):
    doc = _upstream(UPSTREAM["celeba256"])
    plain = config.load_config(_write(tmp_path, doc, "plain.yaml"))
    doc["model"]["params"]["ckpt_path"] = str(tmp_path / "does-not-exist.ckpt")
    doc["model"]["params"]["ignore_keys"] = ["model_ema"]
    doc["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = "/nowhere/model.ckpt"
    with_ckpt = config.load_config(_write(tmp_path, doc, "ckpt.yaml"))
    assert with_ckpt == plain
    with torch.device("meta"):
        config.build_model(with_ckpt)  # builds without touching the missing files


def test_upstream_conditioning_key_rules(tmp_path):
    doc = _upstream(UPSTREAM["bsr_sr"])
    doc["model"]["params"]["concat_mode"] = False
    assert config.load_config(_write(tmp_path, doc)).conditioning_key == "crossattn"
    doc = _upstream(UPSTREAM["celeba256"])
    doc["model"]["params"]["conditioning_key"] = "crossattn"  # an unconditional model ignores it, as upstream
    assert config.load_config(_write(tmp_path, doc)).conditioning_key is None


def test_directory_with_config_yaml_and_lenient_floats(tmp_path):
    doc = _upstream(UPSTREAM["kl-f4"])
    doc["model"]["params"]["lossconfig"]["params"]["kl_weight"] = "1e-6"  # YAML 1.1 reads this as a string
    _write(tmp_path, doc)
    cfg = config.load_config(tmp_path)
    assert cfg.first_stage.loss.params.kl_weight == 1e-6


# --------------------------------------------------------------------------------------------------- bad configs


def test_wrong_type_names_the_field(tmp_path):
    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["unet_config"]["params"]["num_head_channels"] = "thirty-two"
    message = _error(tmp_path, doc)
    assert "model.params.unet_config.params.num_head_channels" in message and "integer" in message
    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["use_ema"] = "yes"
    assert "model.params.use_ema: expected true or false" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"] = 4
    assert "ddconfig.ch_mult: expected a list" in _error(tmp_path, doc)


def test_missing_field_is_named(tmp_path):
    doc = _upstream(UPSTREAM["cin256"])
    del doc["model"]["params"]["unet_config"]["params"]["model_channels"]
    assert "unet_config.params.model_channels: missing required key" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["vq-f8"])
    del doc["model"]["params"]["n_embed"]
    assert "model.params.n_embed: missing required key" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["kl-f8"])
    del doc["model"]["params"]["lossconfig"]
    assert "model.params.lossconfig: missing required key" in _error(tmp_path, doc)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["unet_config"]["params"]["num_head_channel"] = 32
    message = _error(tmp_path, doc)
    assert "num_head_channel: unknown key" in message and "num_head_channels" in message
    doc = _upstream(UPSTREAM["kl-f8"])
    doc["model"]["params"]["n_embed"] = 8192  # a VQ-only key on a KL autoencoder
    assert "model.params.n_embed: unknown key" in _error(tmp_path, doc)


def test_semantic_errors(tmp_path):
    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["conditioning_key"] = "cross"
    assert "unknown conditioning_key 'cross'" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["cin256"])
    del doc["model"]["params"]["unet_config"]["params"]["context_dim"]
    assert "context_dim" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["cin256"])
    doc["model"]["params"]["first_stage_config"]["target"] = "ldm.models.autoencoder.VQModel"
    assert "VQModelInterface" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["inpainting_big"])
    doc["model"]["params"]["cond_stage_trainable"] = True
    assert "cond_stage_trainable" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["text2img256"])
    doc["model"]["params"]["cond_stage_config"]["params"]["n_embed"] = 512
    assert "n_embed (512) must equal the UNet's context_dim (640)" in _error(tmp_path, doc)
    doc = _upstream(UPSTREAM["vq-f4-noattn"])
    doc["model"]["params"]["ddconfig"]["attn_type"] = "flash"
    assert "attn_type 'flash'" in _error(tmp_path, doc)


def test_cross_attention_without_a_context_is_rejected(tmp_path):
    doc = _upstream(UPSTREAM["celeba256"])  # unconditional, with the UNet of a cross-attention model
    doc["model"]["params"]["unet_config"]["params"].update(use_spatial_transformer=True, context_dim=64)
    message = _error(tmp_path, doc)
    assert "model.params.unet_config.params.context_dim: cross-attention" in message
    assert "the model is unconditional" in message
    doc = _upstream(UPSTREAM["inpainting_big"])  # concat conditioning passes no context either
    doc["model"]["params"]["unet_config"]["params"].update(use_spatial_transformer=True, context_dim=64)
    assert "conditioning_key 'concat' passes none" in _error(tmp_path, doc)
    doc = _ours(cond_stage="unconditional")
    doc["diffusion"]["conditioning_key"] = None
    assert "unet.context_dim: cross-attention" in _error(tmp_path, doc)
    del doc["unet"]["context_dim"]
    doc["unet"]["use_spatial_transformer"] = False
    assert config.load_config(_write(tmp_path, doc)).conditioner == "unconditional"


def test_not_a_config(tmp_path):
    assert "neither an upstream config" in _error(tmp_path, {"hello": 1})
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        config.load_config(bad)
    with pytest.raises(UsageError, match="config file not found"):
        config.load_config(tmp_path / "nope.yaml")
    with pytest.raises(UnknownModelError, match="did you mean 'txt2img-f8-large'"):
        config.load_config("txt2img-f8-larg")


# ------------------------------------------------------------------------------------------------ our format


def _ours(**changes) -> dict:
    doc = {"ldmcli_config": 1, "kind": "ldm", "first_stage": "vq-f4",
           "unet": {"image_size": 8, "in_channels": 3, "model_channels": 32, "out_channels": 3, "num_res_blocks": 1,
                    "attention_resolutions": [2], "channel_mult": [1, 2], "num_head_channels": 16,
                    "use_spatial_transformer": True, "context_dim": 16},
           "cond_stage": {"type": "class", "embed_dim": 16, "n_classes": 10, "key": "class_label"},
           "diffusion": {"conditioning_key": "crossattn", "image_size": 8, "timesteps": 100}}
    doc.update(changes)
    return doc


def test_our_format_resolves_first_stage_by_zoo_name(tmp_path):
    cfg = config.load_config(_write(tmp_path, _ours()))
    assert cfg.first_stage == dataclasses.replace(config.load_config("vq-f4").first_stage, type="vq_interface",
                                                  loss=config.LossConfig("none"), monitor=None)
    assert cfg.conditioner == "class" and cfg.schedule["timesteps"] == 100
    model = config.build_model(cfg)  # small enough to build for real
    assert model.cond_stage_model.embedding.weight.shape == (10, 16)


def test_our_format_errors(tmp_path):
    assert "ldmcli_config: unsupported format version 2" in _error(tmp_path, _ours(ldmcli_config=2))
    assert "unknown model kind 'ldmm'" in _error(tmp_path, _ours(kind="ldmm"))
    assert "unknet: unknown key" in _error(tmp_path, {**_ours(), "unknet": {}})
    assert "first_stage: unknown model 'vq-f5'" in _error(tmp_path, _ours(first_stage="vq-f5"))
    assert "not a first-stage model" in _error(tmp_path, _ours(first_stage="celeba256"))
    assert "cond_stage.embed_dim: missing required key" in _error(tmp_path, _ours(cond_stage={"type": "class"}))
    assert "needs parameters" in _error(tmp_path, _ours(cond_stage="bert"))
    assert "unknown conditioner 'clip'" in _error(tmp_path, _ours(cond_stage="clip"))
    uncond = _ours(cond_stage="unconditional")
    assert "null exactly when the model is unconditional" in _error(tmp_path, uncond)
    doc = _ours()
    doc["diffusion"]["scale_factor"] = [1.0]
    assert "diffusion.scale_factor: expected a number" in _error(tmp_path, doc)
    doc = _ours()
    doc["diffusion"]["unet"] = {}
    assert "diffusion.unet: unknown key" in _error(tmp_path, doc)


def test_first_stage_preset_must_be_inline(tmp_path):
    doc = {"ldmcli_config": 1, "kind": "first_stage", "first_stage": "kl-f8"}
    assert "must spell out its architecture" in _error(tmp_path, doc)

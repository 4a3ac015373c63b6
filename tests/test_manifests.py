"""Every upstream config and every zoo preset builds (on the meta device, no memory) a module whose state_dict equals
the upstream manifest exactly: keys in order, shapes, and the dtypes that are not float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE
from ldmcli import config

MANIFESTS = sorted((REFERENCE / "state_dicts").glob("*.json"))

# manifest → zoo preset name, for the 23 published models
ZOO = {
    **{f"first_stage-{n}": n for n in ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8",
                                       "vq-f8-n256", "vq-f16")},
    **{f"ldm-{n}": n for n in ("celeba256", "ffhq256", "lsun_churches256", "lsun_beds256", "text2img256", "cin256",
                               "bsr_sr", "layout2img-openimages256", "semantic_synthesis256",
                               "semantic_synthesis512", "inpainting_big")},
    "configs-latent-diffusion-cin256-v2": "cin256-v2",
    "configs-latent-diffusion-txt2img-1p4B-eval": "txt2img-f8-large",
    "configs-retrieval-augmented-diffusion-768x768": "rdm768x768",
}


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_matches(cfg: config.ModelConfig, manifest: dict) -> None:
    with torch.device("meta"):
        model = config.build_model(cfg)
    sd = model.state_dict()
    expected = manifest["keys"]
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    assert not missing and not extra, f"missing {missing[:5]} extra {extra[:5]}"
    assert list(sd) == list(expected), "same keys, different order"
    wrong = [(k, list(sd[k].shape), s) for k, s in expected.items() if list(sd[k].shape) != s]
    assert not wrong, f"shape mismatches {wrong[:5]}"
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items() if v.dtype != torch.float32}
    assert dtypes == manifest["non_float32_dtypes"]
    assert len(sd) == manifest["num_state_dict_entries"]
    assert sum(v.numel() for v in sd.values()) == manifest["num_state_dict_elements"]


def test_all_32_manifests_are_covered():
    assert len(MANIFESTS) == 32
    assert set(ZOO) <= {p.stem for p in MANIFESTS}
    assert sorted(ZOO.values()) == config.preset_names()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_upstream_config_builds_exact_state_dict(path):
    manifest = _manifest(path)
    cfg = config.load_config(REFERENCE / "configs" / manifest["config"])
    _assert_matches(cfg, manifest)


@pytest.mark.parametrize("stem", sorted(ZOO), ids=str)
def test_preset_builds_exact_state_dict(stem):
    manifest = _manifest(REFERENCE / "state_dicts" / f"{stem}.json")
    cfg = config.load_config(ZOO[stem])
    assert cfg.name == ZOO[stem]
    _assert_matches(cfg, manifest)


@pytest.mark.parametrize("stem", sorted(k for k in ZOO if not k.startswith("first_stage-")), ids=str)
def test_preset_facts_match_manifest(stem):
    """The LDM facts the manifests record (EMA, conditioning, scale factor, schedule) are what the presets say."""
    m = _manifest(REFERENCE / "state_dicts" / f"{stem}.json")
    cfg = config.load_config(ZOO[stem])
    assert cfg.use_ema == m["use_ema"]
    assert cfg.conditioning_key == m["conditioning_key"]
    assert cfg.scale_factor == pytest.approx(m["scale_factor"])
    assert cfg.ldm.scale_by_std == m["scale_by_std"]
    assert cfg.parameterization == m["parameterization"]
    assert cfg.schedule["linear_start"] == m["linear_start"] and cfg.schedule["linear_end"] == m["linear_end"]
    assert cfg.schedule["timesteps"] == m["timesteps"]
    assert cfg.image_size == m["image_size"] and cfg.channels == m["channels"]
    assert cfg.ldm.cond_stage_trainable == m["cond_stage_trainable"]
    assert cfg.ldm.loss_type == m["loss_type"]

"""The zoo registry: every upstream entry, consistent with the reference configs and state_dict manifests."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REFERENCE
from ldmcli import paths, zoo
from ldmcli.errors import UnknownModelError, UsageError

FIRST_STAGES = ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16"]
LDMS = ["celeba256", "ffhq256", "lsun_churches256", "lsun_beds256", "text2img256", "cin256", "cin256-v2", "bsr_sr",
        "layout2img-openimages256", "semantic_synthesis256", "semantic_synthesis512", "txt2img-f8-large",
        "inpainting_big"]
CONFIGS = REFERENCE / "configs"
STATE_DICTS = REFERENCE / "state_dicts"


def test_every_upstream_entry_is_registered_with_groups():
    assert sorted(zoo.GROUPS["first-stages"]) == sorted(FIRST_STAGES)
    assert sorted(zoo.GROUPS["ldms"]) == sorted(LDMS)
    assert {"rdm768x768", "artbench-databases", "openimages-database", "artbench-searchers", "bert-base-uncased",
            "clip-vit-large-patch14", "lpips"} <= set(zoo.names())
    assert list(zoo.GROUPS["all"]) == zoo.names() and len(zoo.names()) == 31  # 29 upstream, built-in digits, Inception
    assert [e.name for e in zoo.expand(["kl-f8", "first-stages", "KL_F8"])] == FIRST_STAGES[1:2] + \
        [n for n in FIRST_STAGES if n != "kl-f8"]


UPSTREAM = [e for e in zoo.entries() if not e.packaged]  # the built-in digits model: tests/test_digits.py


@pytest.mark.parametrize("entry", UPSTREAM, ids=lambda e: e.name)
def test_entry_is_well_formed(entry):
    assert entry.files and entry.contents
    assert all(f.url.startswith("https://") for f in entry.files)
    assert len({f.filename for f in entry.files}) == len(entry.files)
    assert sum(f.archive for f in entry.files) <= 1
    folder = {
        "first_stage": paths.models_dir() / "first_stage_models",
        "ldm": paths.models_dir() / "ldm",
        "rdm": paths.models_dir() / "rdm",
        "database": paths.databases_dir(),
        "searcher": paths.searchers_dir(),
        "asset": paths.assets_dir(),
    }[entry.kind]
    assert entry.local_dir() in (folder, folder / entry.local_dir().name)
    for asset in entry.assets:
        assert zoo.get(asset).kind == "asset"
    if entry.kind in ("first_stage", "ldm", "rdm"):
        assert entry.arch == entry.name and entry.checkpoint in entry.contents
        assert (CONFIGS / entry.config).is_file()
    else:
        assert entry.arch is None and entry.checkpoint is None


@pytest.mark.parametrize("entry", [e for e in UPSTREAM if e.config], ids=lambda e: e.name)
def test_sizes_and_assets_follow_the_reference_configs(entry):
    config = yaml.safe_load((CONFIGS / entry.config).read_text())
    cond = config["model"]["params"].get("cond_stage_config")
    target = cond.get("target", "") if isinstance(cond, dict) else ""
    uses_bert_tokenizer = target.endswith("BERTEmbedder") and cond.get("params", {}).get("use_tokenizer", True)
    assert ("bert-base-uncased" in entry.assets) == bool(uses_bert_tokenizer)
    assert ("clip-vit-large-patch14" in entry.assets) == (entry.kind == "rdm")
    if entry.name == "txt2img-f8-large":
        assert entry.approx_size == 5_700_000_000  # the upstream README's 5.7 GB
        return
    stem = {"first_stage": "first_stage-", "ldm": "ldm-"}.get(entry.kind, "")
    name = stem + entry.name if stem and (STATE_DICTS / f"{stem}{entry.name}.json").exists() else \
        "configs-" + entry.config.removeprefix("configs/").removesuffix(".yaml").replace("/", "-")
    elements = json.loads((STATE_DICTS / f"{name}.json").read_text())["num_state_dict_elements"]
    assert entry.approx_size == elements * 4


def test_layout_matches_upstream_paths():
    assert zoo.get("kl-f8").local_dir() == paths.first_stage_dir("kl-f8")
    assert zoo.get("txt2img-f8-large").local_dir() == paths.ldm_dir("text2img-large")
    assert zoo.get("rdm768x768").local_dir() == paths.rdm_dir("rdm768x768")
    assert zoo.get("inpainting_big").checkpoint == "last.ckpt"
    assert zoo.get("kl-f8").files[0].url == "https://ommer-lab.com/files/latent-diffusion/kl-f8.zip"
    lpips = {f.filename: f for f in zoo.get("lpips").files}
    assert lpips["vgg.pth"].md5 == "d507d7349b931f0638a25a48a722f98a"
    assert lpips["vgg16-397923af.pth"].url == "https://download.pytorch.org/models/vgg16-397923af.pth"


def test_get_accepts_case_separators_and_aliases():
    assert zoo.get("KL_F8").name == "kl-f8"
    assert zoo.get("lsun-churches256").name == "lsun_churches256"
    assert zoo.get("text2img-large").name == "txt2img-f8-large"


def test_unknown_name_is_one_line_usage_error_with_close_matches():
    with pytest.raises(UnknownModelError) as e:
        zoo.get("kl-f9")
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    msg = str(e.value)
    assert "\n" not in msg and "did you mean kl-f8" in msg
    with pytest.raises(UnknownModelError, match="ldm download --list"):
        zoo.get("zzzzzzzz")
    with pytest.raises(UnknownModelError, match="first-stages"):
        zoo.expand(["first-stage"])

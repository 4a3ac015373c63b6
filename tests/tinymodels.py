"""Tiny random-weight latent diffusion models of every family, for tests (each builds and saves in well under 1 s).

Usage::

    from tinymodels import FAMILIES, write_tiny, install_tiny

    files = write_tiny("txt2img", tmp_path)           # config.yaml (upstream form) + model.ckpt [+ .safetensors]
    model = load_model(files.config, ckpt=files.ckpt)

    def test_x(monkeypatch):                          # or go through the zoo, as a user does:
        install_tiny("cin", monkeypatch)              # registers zoo entry "tiny-cin" in the test's LDM_HOME
        model = load_model("tiny-cin")                # or: cli("sample", "tiny-cin", ...)

Families (the upstream model each one imitates, in miniature; 32×32 images, latents 8×8):

* ``txt2img``   KL f4 + BERTEmbedder (crossattn, spatial transformer), no EMA, scale_factor 0.18215 (txt2img-f8-large)
* ``cin``       VQ f4 (VQModelInterface) + ClassEmbedder with a null class (crossattn), EMA (cin256-v2 / cin256)
* ``uncond``    VQ f4, unconditional, num_head_channels, EMA (celeba256 / ffhq256 / lsun_beds256)
* ``churches``  KL f4, unconditional, scale_by_std (a ``scale_factor`` buffer), scale-shift norm (lsun_churches256)
* ``inpaint``   VQ f4 without attention, ``__is_first_stage__`` concat conditioning, 7-channel UNet input
  (inpainting_big)
* ``sr``        VQ f4 + Identity concat conditioning, 6-channel UNet input (bsr_sr)
* ``rdm``       KL f4 (16 latent channels) + Identity crossattn with CLIP-sized contexts (rdm768x768; context 64)
* ``semantic``  VQ f4 + SpatialRescaler (182 one-hot classes, 2 halvings, 182 -> 3), concat into a 6-channel UNet
  (semantic_synthesis256/512)
* ``layout``    VQ f4 + BERTEmbedder over layout tokens (vocab 8192, 92 positions, no tokenizer), crossattn
  (layout2img-openimages256)

The configs are upstream-form YAML, so they also exercise the upstream-config reader. Weights are random (seeded):
zero-initialised layers get noise too, and EMA shadows differ from the raw weights, so a test can tell them apart.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BERT_VOCAB = REPO / "tests" / "fixtures" / "bert-base-uncased-vocab.txt"

_KL = """
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {z}
        ddconfig:
          double_z: true
          z_channels: {z}
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 2]
          num_res_blocks: 1
          attn_resolutions: [8]
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

_VQ = """
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 64
        ddconfig:
          {attn_type}double_z: false
          z_channels: 3
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 2]
          num_res_blocks: 1
          attn_resolutions: {attn}
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

_UNET = """
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: {cin}
        out_channels: {cout}
        model_channels: 32
        attention_resolutions: [2, 1]
        num_res_blocks: 1
        channel_mult: [1, 2]
{extra}"""

_LDM = """model:
  base_learning_rate: 1.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: {linear_start}
    linear_end: {linear_end}
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: {cond_key}
    image_size: 8
    channels: {channels}
{params}{unet}{first_stage}    cond_stage_config: {cond}
"""

_BERT = """
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 64
        n_layer: 1"""

_CLASS = """
      target: ldm.modules.encoders.modules.ClassEmbedder
      params:
        embed_dim: 64
        n_classes: 11
        key: class_label"""

_IDENTITY = """
      target: torch.nn.Identity"""

_RESCALER = """
      target: ldm.modules.encoders.modules.SpatialRescaler
      params:
        n_stages: 2
        in_channels: 182
        out_channels: 3"""

_LAYOUT_BERT = """
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 64
        n_layer: 1
        vocab_size: 8192
        max_seq_len: 92
        use_tokenizer: false"""


def _cfg(*, channels: int, params: str, unet_in: int, unet_extra: str, first_stage: str, cond: str,
         cond_key: str = "image", linear: tuple[float, float] = (0.0015, 0.0155)) -> str:
    return _LDM.format(
        linear_start=linear[0], linear_end=linear[1], cond_key=cond_key, channels=channels, params=params,
        unet=_UNET.format(cin=unet_in, cout=channels, extra=unet_extra), first_stage=first_stage, cond=cond,
    )


_XATTN = """        num_heads: 2
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 64
"""

CONFIGS: dict[str, str] = {
    "txt2img": _cfg(
        channels=4,
        params="    cond_stage_trainable: true\n    conditioning_key: crossattn\n    scale_factor: 0.18215\n"
               "    use_ema: false\n",
        unet_in=4, unet_extra=_XATTN + "        legacy: false\n", first_stage=_KL.format(z=4), cond=_BERT,
        cond_key="caption", linear=(0.00085, 0.012),
    ),
    "cin": _cfg(
        channels=3, params="    cond_stage_trainable: true\n    conditioning_key: crossattn\n",
        unet_in=3, unet_extra=_XATTN.replace("num_heads: 2", "num_head_channels: 16"),
        first_stage=_VQ.format(attn_type="", attn="[8]"), cond=_CLASS, cond_key="class_label",
    ),
    "uncond": _cfg(
        channels=3, params="    concat_mode: false\n",
        unet_in=3, unet_extra="        num_head_channels: 16\n", first_stage=_VQ.format(attn_type="", attn="[8]"),
        cond="__is_unconditional__",
    ),
    "churches": _cfg(
        channels=4, params="    concat_mode: false\n    scale_by_std: true\n    scale_factor: 0.5\n",
        unet_in=4, unet_extra="        num_heads: 2\n        use_scale_shift_norm: true\n        resblock_updown: true\n",
        first_stage=_KL.format(z=4), cond="__is_unconditional__",
    ),
    "inpaint": _cfg(
        channels=3, params="    concat_mode: true\n", cond_key="masked_image",
        unet_in=7, unet_extra="        num_heads: 2\n        resblock_updown: true\n",
        first_stage=_VQ.format(attn_type="attn_type: none\n          ", attn="[]"), cond="__is_first_stage__",
    ),
    "sr": _cfg(
        channels=3, params="    concat_mode: true\n    cond_stage_trainable: false\n    conditioning_key: concat\n",
        cond_key="LR_image", unet_in=6, unet_extra="        num_head_channels: 16\n",
        first_stage=_VQ.format(attn_type="", attn="[8]"), cond=_IDENTITY,
    ),
    "rdm": _cfg(
        channels=16, params="    cond_stage_trainable: false\n    conditioning_key: crossattn\n"
                            "    scale_by_std: false\n    scale_factor: 0.22765929\n",
        unet_in=16, unet_extra=_XATTN.replace("num_heads: 2", "num_head_channels: 16"),
        first_stage=_KL.format(z=16), cond=_IDENTITY, cond_key="nix", linear=(0.0015, 0.015),
    ),
    "semantic": _cfg(
        channels=3, params="    concat_mode: true\n    cond_stage_trainable: true\n", cond_key="segmentation",
        unet_in=6, unet_extra="        num_heads: 2\n", first_stage=_VQ.format(attn_type="", attn="[]"), cond=_RESCALER,
    ),
    "layout": _cfg(
        channels=3, params="    cond_stage_trainable: true\n    conditioning_key: crossattn\n",
        cond_key="coordinates_bbox", unet_in=3, unet_extra=_XATTN, first_stage=_VQ.format(attn_type="", attn="[]"),
        cond=_LAYOUT_BERT,
    ),
}
FAMILIES: tuple[str, ...] = tuple(CONFIGS)
#: families whose config uses text (they need the bert-base-uncased vocab asset)
TEXT_FAMILIES = frozenset({"txt2img"})


@dataclass(frozen=True)
class TinyFiles:
    family: str
    folder: Path
    config: Path
    ckpt: Path | None
    safetensors: Path | None
    global_step: int


def normal_params(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of a single block drawn from N(0, 0.2^2) in place (zero-initialised output layers would hide
    bugs); :func:`randomize` is the whole-model version that keeps norms and EMA shadows plausible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every floating parameter seeded random values (zero-init layers included), in place or, for parameters
    on the meta device, by assigning new tensors.

    Norm scales stay near 1; buffers (schedules) are left alone; EMA shadows become the weights plus a small offset.
    """
    g = torch.Generator().manual_seed(seed)
    made: dict[int, torch.Tensor] = {}
    new: dict[str, torch.Tensor] = {}
    params = {id(p) for p in model.parameters()}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in params or not t.is_floating_point():
            continue
        if id(t) not in made:
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if t.ndim >= 2:
                value = noise / t[0].numel() ** 0.5
            elif name.endswith("weight") and ("norm" in name or ".ln" in name or "gamma" in name):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.05 * noise
            made[id(t)] = value
        new[name] = made[id(t)]
    ema = getattr(model, "model_ema", None)
    if ema is not None:
        for m_name, s_name in ema.m_name2s_name.items():
            raw = new[f"model.{m_name}"]
            new[f"model_ema.{s_name}"] = raw + 0.01 * torch.randn(raw.shape, generator=g, dtype=raw.dtype)
    model.load_state_dict(new, strict=False, assign=True)
    return model


def build_tiny(family: str, folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """Write ``config.yaml`` of ``family`` into ``folder`` and return the built model with random weights."""
    from ldmcli import config
    from ldmcli.loading import params_on_meta

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(CONFIGS[family], encoding="utf-8")
    with params_on_meta():  # no time spent on default init: randomize assigns fresh tensors
        model = config.build_model(config.load_config(path), bert_vocab=BERT_VOCAB)
    model = randomize(model, seed)
    leftover = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    assert not leftover, f"tiny {family}: {leftover[:3]} not randomized"
    return model


def write_tiny(
    family: str, folder: str | Path, *, seed: int = 0, ckpt: bool = True, safetensors: bool = False,
    global_step: int = 1234, ckpt_name: str = "model.ckpt",
) -> TinyFiles:
    """Write ``config.yaml`` plus a Lightning-style ``.ckpt`` and/or a ``.safetensors`` of a tiny ``family`` model."""
    from ldmcli.checkpoint import save_safetensors

    folder = Path(folder)
    model = build_tiny(family, folder, seed)
    state_dict = model.state_dict()
    ckpt_path = st_path = None
    if ckpt:
        ckpt_path = folder / ckpt_name
        torch.save({"epoch": 1, "global_step": global_step, "pytorch-lightning_version": "1.4.2",
                    "state_dict": state_dict}, ckpt_path)
    if safetensors:
        st_path = save_safetensors(folder / Path(ckpt_name).with_suffix(".safetensors").name, state_dict,
                                   global_step=global_step)
    return TinyFiles(family, folder, folder / "config.yaml", ckpt_path, st_path, global_step)


def install_bert_vocab() -> Path:
    """Put the real bert-base-uncased vocab where the store expects it in the current data dir (a test's LDM_HOME)."""
    from ldmcli import zoo

    dest = zoo.get("bert-base-uncased").local_dir()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BERT_VOCAB, dest / "vocab.txt")
    return dest / "vocab.txt"


def install_tiny(family: str, monkeypatch, *, name: str | None = None, seed: int = 0, **write_kwargs) -> TinyFiles:
    """Register ``tiny-<family>`` as a zoo entry (for this test only) and put its files in the data dir.

    The hook: ``zoo.REGISTRY`` is patched with an entry whose ``config`` is the absolute path of the tiny YAML
    (``load_model`` loads an absolute ``config`` path instead of a preset), so ``load_model("tiny-cin")`` and the
    commands go through the zoo and the store exactly as for a real model, without any network.
    """
    from ldmcli import zoo

    name = name or f"tiny-{family}"
    dest = f"models/ldm/{name}"
    entry = zoo.ZooEntry(
        name=name,
        kind="ldm",
        dest=dest,
        files=(zoo.ZooFile(f"https://example.invalid/{name}/model.ckpt", "model.ckpt"),),
        contents=("model.ckpt",),
        arch=None,
        assets=("bert-base-uncased",) if family in TEXT_FAMILIES else (),
        checkpoint="model.ckpt",
        description=f"tiny random-weight {family} model for tests",
    )
    files = write_tiny(family, entry.local_dir(), seed=seed, **write_kwargs)
    entry = zoo.ZooEntry(**{**entry.__dict__, "config_path": str(files.config)})
    monkeypatch.setitem(zoo.REGISTRY, name, entry)
    if family in TEXT_FAMILIES:
        install_bert_vocab()
    return files

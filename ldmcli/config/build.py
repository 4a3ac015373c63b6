"""Typed config to ``nn.Module``: :func:`build_model` and the builders of its parts."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ldmcli.config.registry import SCHEDULER_TARGETS
from ldmcli.config.schema import (
    CondStageConfig, FirstStageConfig, LatentDiffusionConfig, LossConfig, ModelConfig, SchedulerConfig, UNetConfig,
    _LDM_NESTED,
)
from ldmcli.config.native import _plain

# -------------------------------------------------------------------------------------------------- building


def _build_loss(loss: LossConfig) -> Any:
    if loss.type == "none":
        return None
    from ldmcli.models import losses

    if loss.type == "dummy":
        return losses.DummyLoss()
    params = _plain(loss.params)
    if loss.type == "lpips_kl":
        return losses.LPIPSWithDiscriminator(**params)
    return losses.VQLPIPSWithDiscriminator(**params)


def scheduler_dict(s: SchedulerConfig | None) -> dict[str, Any] | None:
    """A scheduler config as upstream's ``scheduler_config`` (``target`` and ``params``) for the models."""
    if s is None:
        return None
    target = next(t for t, k in SCHEDULER_TARGETS.items() if k == s.type)
    return {"target": target, "params": _plain(s.params)}


def build_first_stage(fs: FirstStageConfig) -> Any:
    """AutoencoderKL / VQModel / VQModelInterface for ``fs``, with its training loss when it has one."""
    from ldmcli.models import autoencoder

    ddconfig = _plain(fs.ddconfig)
    common = dict(image_key=fs.image_key, colorize_nlabels=fs.colorize_nlabels, monitor=fs.monitor)
    loss = _build_loss(fs.loss)
    if fs.type == "kl":
        return autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=fs.embed_dim, loss=loss, **common)
    cls = autoencoder.VQModelInterface if fs.type == "vq_interface" else autoencoder.VQModel
    return cls(ddconfig=ddconfig, n_embed=fs.n_embed, embed_dim=fs.embed_dim, loss=loss, remap=fs.remap,
               sane_index_shape=fs.sane_index_shape,
               batch_resize_range=list(fs.batch_resize_range) if fs.batch_resize_range is not None else None,
               scheduler_config=scheduler_dict(fs.scheduler), lr_g_factor=fs.lr_g_factor, **common)


def build_cond_stage(cond: CondStageConfig, first_stage: Any = None,
                     bert_vocab: str | os.PathLike | None = None) -> Any:
    """The conditioner module (None when unconditional; the first stage itself for ``first_stage``)."""
    from ldmcli.models import encoders

    if cond.type == "unconditional":
        return None
    if cond.type == "first_stage":
        return first_stage
    if cond.type == "identity":
        return encoders.IdentityEncoder()
    params = _plain(cond.params)
    if cond.type == "bert":
        return encoders.BERTEmbedder(**params, vocab_path=bert_vocab)
    if cond.type == "class":
        return encoders.ClassEmbedder(**params)
    return encoders.SpatialRescaler(**params)


def build_unet(u: UNetConfig) -> Any:
    from ldmcli.models import unet

    return unet.UNetModel(**_plain(u))


_LDM_PASSTHROUGH = tuple(f.name for f in dataclasses.fields(LatentDiffusionConfig) if f.name not in _LDM_NESTED)


def build_latent_diffusion(d: LatentDiffusionConfig, bert_vocab: str | os.PathLike | None = None) -> Any:
    """LatentDiffusion with its UNet, first stage and conditioner built from ``d``."""
    from ldmcli.models import ddpm

    first_stage = build_first_stage(d.first_stage)
    cond = build_cond_stage(d.cond_stage, first_stage, bert_vocab)
    unet = build_unet(d.unet)
    params = {name: _plain(getattr(d, name)) for name in _LDM_PASSTHROUGH}
    # the resolved key plus a matching concat_mode, so upstream's defaulting rules cannot change it
    params["concat_mode"] = d.conditioning_key == "concat"
    params["scheduler_config"] = scheduler_dict(d.scheduler)
    return ddpm.LatentDiffusion(unet=unet, first_stage_model=first_stage, cond_stage_model=cond, **params)


def build_model(cfg: ModelConfig, *, bert_vocab: str | os.PathLike | None = None) -> Any:
    """Construct the ``nn.Module`` for ``cfg`` on the current default device (``with torch.device("meta"):`` for
    a memory-free skeleton to load weights into). ``bert_vocab`` overrides the data store's bert-base-uncased
    vocab for text conditioners (read only when text is first tokenised)."""
    if cfg.ldm is not None:
        return build_latent_diffusion(cfg.ldm, bert_vocab)
    return build_first_stage(cfg.first_stage)

"""Semantic checks across fields (what a type check cannot see: channel counts, head sizes, conditioning that fits the UNet)."""

from __future__ import annotations

from ldmcli.config.registry import ATTN_TYPES, BETA_SCHEDULES, CONDITIONING_KEYS, PARAMETERIZATIONS
from ldmcli.config.schema import (
    BERTEmbedderParams, ClassEmbedderParams, CondStageConfig, DDConfig, FirstStageConfig, LatentDiffusionConfig,
    LossConfig, SpatialRescalerParams, UNetConfig, VQLPIPSWithDiscriminatorParams,
)
from ldmcli.config.reader import Reader

# --------------------------------------------------------------------------------------------- semantic checks


def _check_ddconfig(r: Reader, dd: DDConfig, where: str) -> DDConfig:
    r.choice(dd.attn_type, ATTN_TYPES, f"{where}.attn_type", "attn_type")
    for name in ("ch", "out_ch", "in_channels", "resolution", "z_channels"):
        if getattr(dd, name) <= 0:
            raise r.fail(f"{where}.{name}", "must be positive")
    if dd.num_res_blocks < 0:
        raise r.fail(f"{where}.num_res_blocks", "must be >= 0")
    if not dd.ch_mult or any(m <= 0 for m in dd.ch_mult):
        raise r.fail(f"{where}.ch_mult", "must be a non-empty list of positive integers")
    if not 0.0 <= dd.dropout < 1.0:
        raise r.fail(f"{where}.dropout", "must lie in [0, 1)")
    return dd


def _check_loss(r: Reader, loss: LossConfig, where: str) -> LossConfig:
    p = loss.params
    if p is not None:
        r.choice(p.disc_loss, ("hinge", "vanilla"), f"{where}.disc_loss", "disc_loss")
        if p.disc_start < 0:
            raise r.fail(f"{where}.disc_start", "must be >= 0")
    if isinstance(p, VQLPIPSWithDiscriminatorParams):
        r.choice(p.perceptual_loss, ("lpips",), f"{where}.perceptual_loss", "perceptual_loss")
        r.choice(p.pixel_loss, ("l1", "l2"), f"{where}.pixel_loss", "pixel_loss")
    return loss


def _check_first_stage(r: Reader, fs: FirstStageConfig, where: str) -> FirstStageConfig:
    if fs.embed_dim <= 0:
        raise r.fail(f"{where}.embed_dim", "must be positive")
    if fs.type == "kl" and not fs.ddconfig.double_z:
        raise r.fail(f"{where}.ddconfig.double_z", "an AutoencoderKL needs double_z: true")
    if fs.is_vq:
        if fs.n_embed is None:
            raise r.fail(f"{where}.n_embed", "missing required key (a VQ first stage needs its codebook size)")
        if fs.n_embed <= 0:
            raise r.fail(f"{where}.n_embed", "must be positive")
    return fs


def _check_unet(r: Reader, u: UNetConfig, where: str) -> UNetConfig:
    for name in ("image_size", "in_channels", "model_channels", "out_channels"):
        if getattr(u, name) <= 0:
            raise r.fail(f"{where}.{name}", "must be positive")
    if not u.channel_mult or any(m <= 0 for m in u.channel_mult):
        raise r.fail(f"{where}.channel_mult", "must be a non-empty list of positive integers")
    if u.dims not in (1, 2, 3):
        raise r.fail(f"{where}.dims", "must be 1, 2 or 3")
    if u.use_spatial_transformer and u.context_dim is None:
        raise r.fail(f"{where}.context_dim", "use_spatial_transformer needs context_dim (the conditioning width)")
    if u.context_dim is not None and not u.use_spatial_transformer:
        raise r.fail(f"{where}.use_spatial_transformer", "context_dim is set: cross-attention needs "
                                                          "use_spatial_transformer: true")
    if u.num_heads == -1 and u.num_head_channels == -1:
        raise r.fail(where, "set num_heads or num_head_channels")
    if u.num_heads == 0 or u.num_heads < -1:
        raise r.fail(f"{where}.num_heads", "must be positive (or -1 to use num_head_channels)")
    if u.num_head_channels == 0 or u.num_head_channels < -1:
        raise r.fail(f"{where}.num_head_channels", "must be positive (or -1 to use num_heads)")
    if u.transformer_depth < 1:
        raise r.fail(f"{where}.transformer_depth", "must be >= 1")
    return u


def _check_cond(r: Reader, c: CondStageConfig, where: str) -> CondStageConfig:
    p = c.params
    if isinstance(p, BERTEmbedderParams):
        for name in ("n_embed", "n_layer", "vocab_size", "max_seq_len"):
            if getattr(p, name) <= 0:
                raise r.fail(f"{where}.{name}", "must be positive")
    elif isinstance(p, ClassEmbedderParams):
        if p.embed_dim <= 0 or p.n_classes <= 0:
            raise r.fail(where, "embed_dim and n_classes must be positive")
    elif isinstance(p, SpatialRescalerParams):
        if p.n_stages < 0:
            raise r.fail(f"{where}.n_stages", "must be >= 0")
        r.choice(p.method, ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"), f"{where}.method",
                 "interpolation method")
    return c


def _check_ldm(r: Reader, d: LatentDiffusionConfig, where: str, unet_where: str) -> LatentDiffusionConfig:
    r.choice(d.beta_schedule, BETA_SCHEDULES, f"{where}.beta_schedule", "beta_schedule")
    r.choice(d.parameterization, PARAMETERIZATIONS, f"{where}.parameterization", "parameterization")
    r.choice(d.loss_type, ("l1", "l2"), f"{where}.loss_type", "loss_type")
    if d.conditioning_key is not None:
        r.choice(d.conditioning_key, CONDITIONING_KEYS, f"{where}.conditioning_key", "conditioning_key")
    if d.timesteps <= 0:
        raise r.fail(f"{where}.timesteps", "must be positive")
    if d.given_betas is not None and len(d.given_betas) != d.timesteps:
        raise r.fail(f"{where}.given_betas", f"has {len(d.given_betas)} entries for {d.timesteps} timesteps")
    if d.num_timesteps_cond is not None and not 1 <= d.num_timesteps_cond <= d.timesteps:
        raise r.fail(f"{where}.num_timesteps_cond", "must lie in [1, timesteps]")
    if d.use_positional_encodings:
        raise r.fail(f"{where}.use_positional_encodings", "is not supported (no published model uses it)")
    if d.image_size <= 0 or d.channels <= 0:
        raise r.fail(where, "image_size and channels must be positive")
    if d.first_stage.type == "vq":
        raise r.fail(where, "an LDM's VQ first stage must be the interface variant (VQModelInterface / "
                            "type vq_interface): the diffusion model works on the pre-quantisation latent")
    kind = d.cond_stage.type
    if kind in ("unconditional", "first_stage") and d.cond_stage_trainable:
        raise r.fail(f"{where}.cond_stage_trainable", f"must be false with a {kind!r} conditioner")
    if (kind == "unconditional") != (d.conditioning_key is None):
        raise r.fail(f"{where}.conditioning_key", "must be null exactly when the model is unconditional")
    if (d.conditioning_key == "adm") != (d.unet.num_classes is not None):
        raise r.fail(f"{where}.conditioning_key", "adm conditioning and the UNet's num_classes go together")
    if d.unet.context_dim is not None and d.conditioning_key not in ("crossattn", "hybrid"):
        given = "the model is unconditional" if kind == "unconditional" else \
            f"conditioning_key {d.conditioning_key!r} passes none"
        raise r.fail(f"{unet_where}.context_dim", f"cross-attention (use_spatial_transformer) needs a context but "
                                                  f"{given}: use crossattn or hybrid conditioning, or drop "
                                                  f"use_spatial_transformer and context_dim")
    width = {BERTEmbedderParams: "n_embed", ClassEmbedderParams: "embed_dim"}.get(type(d.cond_stage.params))
    if (d.conditioning_key in ("crossattn", "hybrid") and width is not None and d.unet.context_dim is not None
            and getattr(d.cond_stage.params, width) != d.unet.context_dim):
        raise r.fail(where, f"the conditioner's {width} ({getattr(d.cond_stage.params, width)}) must equal the "
                            f"UNet's context_dim ({d.unet.context_dim}) for cross-attention")
    return d

"""The typed configs: frozen dataclasses, one per upstream block (first stage, UNet, conditioner, LDM, losses, schedulers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# ------------------------------------------------------------------------------------------------ typed configs


@dataclass(frozen=True)
class DDConfig:
    """Encoder/decoder architecture shared by both first stages (upstream ``ddconfig``)."""

    ch: int
    out_ch: int
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    resolution: int
    z_channels: int
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    double_z: bool = True
    dropout: float = 0.0
    resamp_with_conv: bool = True
    use_linear_attn: bool = False
    attn_type: str = "vanilla"
    give_pre_end: bool = False
    tanh_out: bool = False


@dataclass(frozen=True)
class LPIPSWithDiscriminatorParams:
    """Training loss of the KL autoencoders (upstream ``ldm.modules.losses.LPIPSWithDiscriminator``)."""

    disc_start: int
    logvar_init: float = 0.0
    kl_weight: float = 1.0
    pixelloss_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 1.0
    perceptual_weight: float = 1.0
    use_actnorm: bool = False
    disc_conditional: bool = False
    disc_loss: str = "hinge"


@dataclass(frozen=True)
class VQLPIPSWithDiscriminatorParams:
    """Training loss of the VQ autoencoders (taming-transformers ``VQLPIPSWithDiscriminator``)."""

    disc_start: int
    codebook_weight: float = 1.0
    pixelloss_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 1.0
    perceptual_weight: float = 1.0
    use_actnorm: bool = False
    disc_conditional: bool = False
    disc_ndf: int = 64
    disc_loss: str = "hinge"
    n_classes: int | None = None  # the ldm.modules.losses.vqperceptual variant's extras
    perceptual_loss: str = "lpips"
    pixel_loss: str = "l1"


_LOSS_PARAMS: dict[str, type] = {"lpips_kl": LPIPSWithDiscriminatorParams, "vqlpips": VQLPIPSWithDiscriminatorParams}


@dataclass(frozen=True)
class LossConfig:
    """A first stage's training loss: ``none`` (an LDM's embedded first stage), ``dummy`` (empty module), or one of
    the perceptual+adversarial losses whose ``loss.*`` keys standalone first-stage checkpoints carry."""

    type: str = "none"
    params: LPIPSWithDiscriminatorParams | VQLPIPSWithDiscriminatorParams | None = None


@dataclass(frozen=True)
class WarmupCosineParams:
    """``ldm.lr_scheduler.LambdaWarmUpCosineScheduler``."""

    warm_up_steps: int
    lr_min: float
    lr_max: float
    lr_start: float
    max_decay_steps: int
    verbosity_interval: int = 0


@dataclass(frozen=True)
class CyclesParams:
    """``ldm.lr_scheduler.LambdaWarmUpCosineScheduler2`` / ``LambdaLinearScheduler`` (one entry per cycle)."""

    warm_up_steps: tuple[int, ...]
    f_min: tuple[float, ...]
    f_max: tuple[float, ...]
    f_start: tuple[float, ...]
    cycle_lengths: tuple[int, ...]
    verbosity_interval: int = 0


_SCHEDULER_PARAMS: dict[str, type] = {
    "warmup_cosine": WarmupCosineParams,
    "warmup_cosine_cycles": CyclesParams,
    "linear_cycles": CyclesParams,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate multiplier schedule used in training (``scheduler_config``)."""

    type: str
    params: WarmupCosineParams | CyclesParams


@dataclass(frozen=True)
class FirstStageConfig:
    """Autoencoder ("first stage"): ``kl`` (AutoencoderKL), ``vq`` (VQModel) or ``vq_interface`` (the VQ variant
    inside LDMs, encoding to the pre-quantisation latent)."""

    type: str
    embed_dim: int
    ddconfig: DDConfig
    loss: LossConfig = field(default_factory=LossConfig)
    n_embed: int | None = None  # vq only
    remap: str | None = None  # vq only
    sane_index_shape: bool = False  # vq only
    image_key: str = "image"
    colorize_nlabels: int | None = None
    monitor: str | None = None
    batch_resize_range: tuple[int, ...] | None = None  # vq only
    lr_g_factor: float = 1.0  # vq only
    scheduler: SchedulerConfig | None = None  # vq only

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ddconfig.ch_mult) - 1)

    @property
    def is_vq(self) -> bool:
        return self.type in ("vq", "vq_interface")


_VQ_ONLY = frozenset({"n_embed", "remap", "sane_index_shape", "batch_resize_range", "lr_g_factor", "scheduler"})


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet (upstream ``openaimodel.UNetModel``); defaults are upstream's."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    n_embed: int | None = None
    legacy: bool = True


@dataclass(frozen=True)
class BERTEmbedderParams:
    n_embed: int
    n_layer: int
    vocab_size: int = 30522
    max_seq_len: int = 77
    use_tokenizer: bool = True
    embedding_dropout: float = 0.0


@dataclass(frozen=True)
class ClassEmbedderParams:
    embed_dim: int
    n_classes: int = 1000
    key: str = "class"


@dataclass(frozen=True)
class SpatialRescalerParams:
    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: int | None = None
    bias: bool = False


_COND_PARAMS: dict[str, type] = {
    "bert": BERTEmbedderParams,
    "class": ClassEmbedderParams,
    "spatial_rescaler": SpatialRescalerParams,
}


@dataclass(frozen=True)
class CondStageConfig:
    """The conditioner: ``unconditional`` (none), ``first_stage`` (the autoencoder itself, inpainting),
    ``identity``, ``bert`` (text or layout tokens), ``class`` or ``spatial_rescaler``."""

    type: str
    params: BERTEmbedderParams | ClassEmbedderParams | SpatialRescalerParams | None = None


@dataclass(frozen=True)
class LatentDiffusionConfig:
    """Upstream ``LatentDiffusion`` (and its ``DDPM`` base) parameters, with the built parts' configs.
    ``conditioning_key`` is already resolved (upstream derives it from ``concat_mode`` and the conditioner)."""

    unet: UNetConfig
    first_stage: FirstStageConfig
    cond_stage: CondStageConfig
    # noise schedule (computed in float64, stored as float32)
    timesteps: int = 1000
    beta_schedule: str = "linear"
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    given_betas: tuple[float, ...] | None = None
    v_posterior: float = 0.0
    parameterization: str = "eps"
    # conditioning
    conditioning_key: str | None = None
    cond_stage_key: str = "image"
    cond_stage_trainable: bool = False
    cond_stage_forward: str | None = None
    num_timesteps_cond: int | None = None
    # latent space
    scale_factor: float = 1.0
    scale_by_std: bool = False
    first_stage_key: str = "image"
    image_size: int = 256
    channels: int = 3
    # EMA and training
    use_ema: bool = True
    loss_type: str = "l2"
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    learn_logvar: bool = False
    logvar_init: float = 0.0
    clip_denoised: bool = True
    log_every_t: int = 100
    monitor: str | None = "val/loss"
    use_positional_encodings: bool = False
    scheduler: SchedulerConfig | None = None


_LDM_NESTED = ("unet", "first_stage", "cond_stage", "scheduler")


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: a first stage on its own, or a latent diffusion model with its parts."""

    kind: str  # "first_stage" | "ldm"
    model: FirstStageConfig | LatentDiffusionConfig
    base_learning_rate: float | None = None
    name: str | None = field(default=None, compare=False)  # the preset it came from, if any
    source: str | None = field(default=None, compare=False)  # the file it was read from, for messages

    @property
    def first_stage(self) -> FirstStageConfig:
        return self.model.first_stage if isinstance(self.model, LatentDiffusionConfig) else self.model

    @property
    def ldm(self) -> LatentDiffusionConfig | None:
        return self.model if isinstance(self.model, LatentDiffusionConfig) else None

    @property
    def use_ema(self) -> bool:
        return self.ldm.use_ema if self.ldm is not None else False

    @property
    def conditioning_key(self) -> str | None:
        """``concat`` | ``crossattn`` | ``hybrid`` | ``adm``, or None (unconditional, first stages)."""
        return self.ldm.conditioning_key if self.ldm is not None else None

    @property
    def conditioner(self) -> str | None:
        """The conditioner type (``bert``, ``class``, ``spatial_rescaler``, ``identity``, ``first_stage``,
        ``unconditional``), None for first stages."""
        return self.ldm.cond_stage.type if self.ldm is not None else None

    @property
    def downsampling_factor(self) -> int:
        """f: image pixels per latent pixel along each side."""
        return self.first_stage.downsampling_factor

    @property
    def latent_channels(self) -> int:
        return self.first_stage.embed_dim

    @property
    def image_size(self) -> int:
        """The size the model itself works at, as upstream's ``image_size``: latent size for an LDM, pixel
        resolution for a first stage."""
        return self.ldm.image_size if self.ldm is not None else self.first_stage.ddconfig.resolution

    @property
    def pixel_size(self) -> int:
        """The image resolution the model was trained at."""
        if self.ldm is not None:
            return self.ldm.image_size * self.downsampling_factor
        return self.first_stage.ddconfig.resolution

    @property
    def channels(self) -> int:
        return self.ldm.channels if self.ldm is not None else self.first_stage.embed_dim

    @property
    def scale_factor(self) -> float:
        """The configured latent scale; with ``scale_by_std`` the checkpoint's ``scale_factor`` buffer wins."""
        return self.ldm.scale_factor if self.ldm is not None else 1.0

    @property
    def parameterization(self) -> str | None:
        return self.ldm.parameterization if self.ldm is not None else None

    @property
    def schedule(self) -> dict[str, Any] | None:
        """The noise-schedule parameters (keyword names of upstream ``register_schedule``)."""
        if self.ldm is None:
            return None
        d = self.ldm
        return {"beta_schedule": d.beta_schedule, "timesteps": d.timesteps, "linear_start": d.linear_start,
                "linear_end": d.linear_end, "cosine_s": d.cosine_s,
                "given_betas": list(d.given_betas) if d.given_betas is not None else None,
                "v_posterior": d.v_posterior}

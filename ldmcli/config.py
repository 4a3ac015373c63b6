"""Model configs: upstream YAML files and ldmcli presets → one validated, typed :class:`ModelConfig` → ``nn.Module``.

Two input formats describe the same models (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"):

* **upstream YAML** (CompVis/latent-diffusion): ``model: {target: ldm.models.diffusion.ddpm.LatentDiffusion,
  params: {...}}``. Known ``target`` strings map to this package's classes through the explicit registries below: a
  config never makes the program import a module it names. ``ckpt_path``/``ignore_keys`` entries are ignored (an LDM
  checkpoint already holds its first stage); ``data:`` and ``lightning:`` sections are training-only and ignored.
* **ldmcli presets** (``ldmcli/presets/<zoo name>.yaml``; the same format ``config_to_dict`` writes)::

      ldmcli_config: 1
      kind: ldm                      # or first_stage
      first_stage: kl-f8             # a zoo name, or a mapping {type: kl | vq | vq_interface, embed_dim, ddconfig, ...}
      unet: {image_size: 32, in_channels: 4, ...}
      cond_stage: {type: bert, n_embed: 1280, n_layer: 32}    # or unconditional | first_stage | identity
      diffusion: {linear_start: 0.00085, conditioning_key: crossattn, ...}

Every value is validated up front: a wrong type, a missing field or an unknown key is one :class:`UsageError`
naming the file and the field. ``build_model(cfg)`` constructs the module on the current default device, so callers
build without memory with ``with torch.device("meta"): build_model(cfg)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from ldmcli.errors import UnknownModelError, UsageError

FORMAT_KEY = "ldmcli_config"
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------------- registries
# upstream ``target`` string → our type name. Nothing here is ever imported.

MODEL_TARGETS: dict[str, str] = {
    "ldm.models.autoencoder.AutoencoderKL": "kl",
    "ldm.models.autoencoder.VQModel": "vq",
    "ldm.models.autoencoder.VQModelInterface": "vq_interface",
    "ldm.models.diffusion.ddpm.LatentDiffusion": "ldm",
}
UNET_TARGETS: dict[str, str] = {
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": "unet",
}
LOSS_TARGETS: dict[str, str] = {
    "torch.nn.Identity": "none",
    "ldm.modules.losses.contperceptual.DummyLoss": "dummy",  # resolves upstream through a star import of taming's
    "taming.modules.losses.vqperceptual.DummyLoss": "dummy",
    "taming.modules.losses.DummyLoss": "dummy",
    "ldm.modules.losses.LPIPSWithDiscriminator": "lpips_kl",
    "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator": "lpips_kl",
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": "vqlpips",
    "taming.modules.losses.VQLPIPSWithDiscriminator": "vqlpips",
    "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": "vqlpips",
}
COND_TARGETS: dict[str, str] = {
    "ldm.modules.encoders.modules.BERTEmbedder": "bert",
    "ldm.modules.encoders.modules.ClassEmbedder": "class",
    "ldm.modules.encoders.modules.SpatialRescaler": "spatial_rescaler",
    "torch.nn.Identity": "identity",
}
COND_SENTINELS: dict[str, str] = {
    "__is_unconditional__": "unconditional",
    "__is_first_stage__": "first_stage",
}
SCHEDULER_TARGETS: dict[str, str] = {
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler": "warmup_cosine",
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2": "warmup_cosine_cycles",
    "ldm.lr_scheduler.LambdaLinearScheduler": "linear_cycles",
}

FIRST_STAGE_TYPES = ("kl", "vq", "vq_interface")
LOSS_TYPES = ("none", "dummy", "lpips_kl", "vqlpips")
COND_TYPES = ("unconditional", "first_stage", "identity", "bert", "class", "spatial_rescaler")
CONDITIONING_KEYS = ("concat", "crossattn", "hybrid", "adm")
BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
PARAMETERIZATIONS = ("eps", "x0")
ATTN_TYPES = ("vanilla", "linear", "none")

# accepted (and dropped) wherever upstream accepts them: checkpoint I/O that inference never follows
_IGNORED_IO_KEYS = frozenset({"ckpt_path", "ignore_keys"})


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


# ------------------------------------------------------------------------------------------------ validation core


class Reader:
    """Validates plain YAML/JSON values into the dataclasses, naming ``source`` and the field path in errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> UsageError:
        return UsageError(f"invalid config {self.source}: {where}: {message}" if where else
                          f"invalid config {self.source}: {message}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"expected a mapping, got {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"keys must be strings, got {key!r}")
        return dict(value)

    def choice(self, value: Any, choices: typing.Iterable[str], where: str, what: str = "value") -> str:
        choices = list(choices)
        if not isinstance(value, str) or value not in choices:
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            raise self.fail(where, f"unknown {what} {_show(value)}{hint} (expected one of {', '.join(choices)})")
        return value

    def coerce(self, value: Any, tp: Any, where: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None:
                return None
            if len(args) == 1:
                return self.coerce(value, args[0], where)
            raise TypeError(f"no coercion for {tp}")  # nested configs are read by their own functions
        if origin is tuple:
            (item,) = (a for a in typing.get_args(tp) if a is not Ellipsis)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise self.fail(where, f"expected a list, got {_show(value)}")
            return tuple(self.coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail(where, f"expected true or false, got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise self.fail(where, f"expected an integer, got {_show(value)}")
            return value
        if tp is float:
            if isinstance(value, bool):
                raise self.fail(where, f"expected a number, got {_show(value)}")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise self.fail(where, f"expected a number, got {_show(value)}")
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(where, f"expected a string, got {_show(value)}")
            return value
        raise TypeError(f"no coercion for {tp}")

    def dataclass(self, cls: type, value: Any, where: str, *, nested: Mapping[str, Callable[[Any, str], Any]] = {},
                  ignored: typing.AbstractSet[str] = frozenset(), exclude: typing.AbstractSet[str] = frozenset(),
                  extra: Mapping[str, Any] = {}, aliases: Mapping[str, str] = {}) -> Any:
        """Build ``cls`` from the mapping ``value``: unknown keys, missing required keys and wrong types are errors;
        ``nested`` fields are read by their own function (given the value and its path); ``ignored`` keys are
        dropped; ``exclude`` fields are not allowed here; ``extra`` supplies already-read fields; ``aliases`` maps a
        key as written (``lossconfig``) to its field (``loss``)."""
        data = self.mapping(value, where)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in exclude}
        spelled = {name: key for key, name in aliases.items()}
        allowed = sorted(spelled.get(name, name) for name in set(fields) - set(extra))
        kwargs: dict[str, Any] = dict(extra)
        for key, item in data.items():
            if key in ignored:
                continue
            path = f"{where}.{key}" if where else key
            name = aliases.get(key, key)
            if key not in allowed:
                raise self.fail(path, f"unknown key{did_you_mean(key, allowed)}")
            kwargs[name] = nested[name](item, path) if name in nested else self.coerce(item, hints[name], path)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                key = spelled.get(name, name)
                raise self.fail(f"{where}.{key}" if where else key, "missing required key")
        return cls(**kwargs)

    def target(self, value: Any, registry: Mapping[str, str], where: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"target must be a string, got {_show(value)}")
        if value not in registry:
            raise self.fail(where, f"unknown {what} target {value!r}{did_you_mean(value, list(registry))} "
                                   f"(known: {', '.join(sorted(registry))})")
        return registry[value]

    def target_block(self, value: Any, where: str) -> tuple[Any, dict[str, Any]]:
        """An upstream ``{target: ..., params: {...}}`` block → (target, params)."""
        block = self.mapping(value, where)
        unknown = set(block) - {"target", "params"}
        if unknown:
            key = sorted(unknown)[0]
            raise self.fail(f"{where}.{key}", "unknown key (expected only target and params)")
        if "target" not in block:
            raise self.fail(f"{where}.target", "missing required key")
        params = block.get("params")
        return block["target"], (self.mapping(params, f"{where}.params") if params is not None else {})


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: Any, candidates: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    if not isinstance(word, str):
        return ""
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


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


# ------------------------------------------------------------------------------------- upstream YAML → config


def _upstream_loss(r: Reader, value: Any, where: str) -> LossConfig:
    target, params = r.target_block(value, where)
    kind = r.target(target, LOSS_TARGETS, f"{where}.target", "loss")
    if kind in ("none", "dummy"):
        if params:
            raise r.fail(f"{where}.params", f"{target} takes no parameters")
        return LossConfig(kind)
    return _check_loss(r, LossConfig(kind, r.dataclass(_LOSS_PARAMS[kind], params, f"{where}.params")),
                       f"{where}.params")


def _upstream_scheduler(r: Reader, value: Any, where: str) -> SchedulerConfig:
    target, params = r.target_block(value, where)
    kind = r.target(target, SCHEDULER_TARGETS, f"{where}.target", "learning-rate scheduler")
    return _scheduler(r, kind, params, f"{where}.params")


def _scheduler(r: Reader, kind: str, params: Any, where: str) -> SchedulerConfig:
    p = r.dataclass(_SCHEDULER_PARAMS[kind], params, where)
    if isinstance(p, CyclesParams):
        lengths = {len(p.warm_up_steps), len(p.f_min), len(p.f_max), len(p.f_start), len(p.cycle_lengths)}
        if len(lengths) != 1:
            raise r.fail(where, "warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
    return SchedulerConfig(kind, p)


def _upstream_first_stage(r: Reader, kind: str, params: Any, where: str) -> FirstStageConfig:
    data = r.mapping(params, where)
    if kind != "kl" and "use_ema" in data:  # upstream VQModel's EMA of the whole autoencoder: unused by the zoo
        if r.coerce(data.pop("use_ema"), bool, f"{where}.use_ema"):
            raise r.fail(f"{where}.use_ema", "an EMA of the first stage is not supported")
    exclude = _VQ_ONLY if kind == "kl" else frozenset()
    fs = r.dataclass(
        FirstStageConfig, data, where, ignored=_IGNORED_IO_KEYS, exclude=exclude | {"type"}, extra={"type": kind},
        aliases={"lossconfig": "loss", "scheduler_config": "scheduler"},
        nested={"ddconfig": lambda v, w: _check_ddconfig(r, r.dataclass(DDConfig, v, w), w),
                "loss": lambda v, w: _upstream_loss(r, v, w),
                "scheduler": lambda v, w: _upstream_scheduler(r, v, w)})
    if "lossconfig" not in data:
        raise r.fail(f"{where}.lossconfig", "missing required key")
    return _check_first_stage(r, fs, where)


def _upstream_cond(r: Reader, value: Any, where: str) -> CondStageConfig:
    if isinstance(value, str):
        if value not in COND_SENTINELS:
            raise r.fail(where, f"unknown conditioner {value!r} (expected a target block or one of "
                                f"{', '.join(COND_SENTINELS)})")
        return CondStageConfig(COND_SENTINELS[value])
    target, params = r.target_block(value, where)
    kind = r.target(target, COND_TARGETS, f"{where}.target", "conditioner")
    if kind == "identity":
        if params:
            raise r.fail(f"{where}.params", "torch.nn.Identity takes no parameters")
        return CondStageConfig("identity")
    ignored = frozenset({"device"})  # upstream's device keyword: the module follows its parameters instead
    return _check_cond(r, CondStageConfig(kind, r.dataclass(_COND_PARAMS[kind], params, f"{where}.params",
                                                             ignored=ignored)), f"{where}.params")


def _upstream_ldm(r: Reader, params: Any, where: str) -> LatentDiffusionConfig:
    data = r.mapping(params, where)
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in data:
            raise r.fail(f"{where}.{key}", "missing required key")
    concat_mode = r.coerce(data.pop("concat_mode", True), bool, f"{where}.concat_mode")
    r.coerce(data.pop("load_only_unet", False), bool, f"{where}.load_only_unet")  # checkpoint I/O, like ckpt_path

    def unet(v: Any, w: str) -> UNetConfig:
        target, p = r.target_block(v, w)
        r.target(target, UNET_TARGETS, f"{w}.target", "UNet")
        return _check_unet(r, r.dataclass(UNetConfig, p, f"{w}.params"), f"{w}.params")

    def first_stage(v: Any, w: str) -> FirstStageConfig:
        target, p = r.target_block(v, w)
        kind = r.target(target, MODEL_TARGETS, f"{w}.target", "first-stage")
        if kind == "ldm":
            raise r.fail(f"{w}.target", "a first stage must be an autoencoder")
        return _upstream_first_stage(r, kind, p, f"{w}.params")

    cond = _upstream_cond(r, data.pop("cond_stage_config"), f"{where}.cond_stage_config")
    # upstream: an explicit conditioning_key wins, else concat_mode picks concat or crossattn; unconditional → None
    key = data.pop("conditioning_key", None)
    if key is None:
        key = "concat" if concat_mode else "crossattn"
    if cond.type == "unconditional":
        key = None
    d = r.dataclass(
        LatentDiffusionConfig, data, where, ignored=_IGNORED_IO_KEYS,
        extra={"conditioning_key": key, "cond_stage": cond},
        aliases={"unet_config": "unet", "first_stage_config": "first_stage", "scheduler_config": "scheduler"},
        nested={"unet": unet, "first_stage": first_stage, "scheduler": lambda v, w: _upstream_scheduler(r, v, w)})
    return _check_ldm(r, d, where, f"{where}.unet_config.params")


def from_upstream(doc: Any, source: str = "<config>") -> ModelConfig:
    """An upstream latent-diffusion YAML document (already parsed) → :class:`ModelConfig`."""
    r = Reader(source)
    top = r.mapping(doc, "")
    for key in top:
        if key not in ("model", "data", "lightning"):
            raise r.fail(key, "unknown top-level key (expected model, data, lightning)")
    if "model" not in top:
        raise r.fail("model", "missing required key")
    model = r.mapping(top["model"], "model")
    unknown = set(model) - {"target", "params", "base_learning_rate"}
    if unknown:
        raise r.fail(f"model.{sorted(unknown)[0]}", "unknown key (expected target, params, base_learning_rate)")
    target, params = r.target_block({k: v for k, v in model.items() if k != "base_learning_rate"}, "model")
    kind = r.target(target, MODEL_TARGETS, "model.target", "model")
    lr = model.get("base_learning_rate")
    lr = r.coerce(lr, float, "model.base_learning_rate") if lr is not None else None
    if kind == "ldm":
        return ModelConfig("ldm", _upstream_ldm(r, params, "model.params"), lr, source=source)
    return ModelConfig("first_stage", _upstream_first_stage(r, kind, params, "model.params"), lr, source=source)


# ------------------------------------------------------------------------------------------ our format ↔ config


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _typed_block(obj: Any) -> Any:
    """``{type: ..., **params}`` for loss, conditioner and scheduler configs (a bare type name when no params)."""
    if obj is None:
        return None
    if obj.params is None:
        return obj.type
    return {"type": obj.type, **_plain(obj.params)}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config in ldmcli's own format as plain JSON/YAML values (every field explicit), e.g. to store next to
    the weights. ``config_from_dict`` reads it back to an equal config."""

    def first_stage(fs: FirstStageConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(fs):
            if fs.type == "kl" and f.name in _VQ_ONLY:
                continue
            value = getattr(fs, f.name)
            out[f.name] = _typed_block(value) if f.name in ("loss", "scheduler") else _plain(value)
        return out

    out: dict[str, Any] = {FORMAT_KEY: FORMAT_VERSION, "kind": cfg.kind}
    if cfg.name is not None:
        out["name"] = cfg.name
    if cfg.base_learning_rate is not None:
        out["base_learning_rate"] = cfg.base_learning_rate
    ldm = cfg.ldm
    if ldm is None:
        out["first_stage"] = first_stage(cfg.first_stage)
        return out
    out["first_stage"] = first_stage(ldm.first_stage)
    out["unet"] = _plain(ldm.unet)
    out["cond_stage"] = _typed_block(ldm.cond_stage)
    out["diffusion"] = {f.name: _plain(getattr(ldm, f.name)) for f in dataclasses.fields(ldm)
                        if f.name not in _LDM_NESTED}
    out["diffusion"]["scheduler"] = _typed_block(ldm.scheduler)
    return out


def _ours_typed(r: Reader, value: Any, where: str, kinds: tuple[str, ...], params: Mapping[str, type],
                what: str) -> tuple[str, Any]:
    """Read ``{type: ..., **params}`` or a bare type name."""
    if isinstance(value, str):
        kind = r.choice(value, kinds, where, what)
        if kind in params and any(f.default is dataclasses.MISSING for f in dataclasses.fields(params[kind])):
            raise r.fail(where, f"{what} {kind!r} needs parameters: write it as a mapping with type: {kind}")
        return kind, (r.dataclass(params[kind], {}, where) if kind in params else None)
    data = r.mapping(value, where)
    if "type" not in data:
        raise r.fail(f"{where}.type", "missing required key")
    kind = r.choice(data.pop("type"), kinds, f"{where}.type", what)
    if kind not in params:
        if data:
            raise r.fail(f"{where}.{sorted(data)[0]}", f"{what} {kind!r} takes no parameters")
        return kind, None
    return kind, r.dataclass(params[kind], data, where)


def _ours_first_stage(r: Reader, value: Any, where: str, *, inside_ldm: bool) -> FirstStageConfig:
    if isinstance(value, str):
        if not inside_ldm:
            raise r.fail(where, "a first-stage model must spell out its architecture (a mapping)")
        base = load_config(value, _via=f"{r.source}: {where}")
        if base.kind != "first_stage":
            raise r.fail(where, f"{value!r} is not a first-stage model")
        fs = base.first_stage
        # inside an LDM: no training loss or its bookkeeping, and a VQ model encodes to its pre-quantisation latent
        return dataclasses.replace(fs, type="vq_interface" if fs.is_vq else fs.type, loss=LossConfig("none"),
                                   monitor=None, scheduler=None)
    data = r.mapping(value, where)
    if "type" not in data:
        raise r.fail(f"{where}.type", "missing required key")
    kind = r.choice(data.pop("type"), FIRST_STAGE_TYPES, f"{where}.type", "first-stage type")
    exclude = _VQ_ONLY if kind == "kl" else frozenset()
    fs = r.dataclass(
        FirstStageConfig, data, where, exclude=exclude | {"type"}, extra={"type": kind},
        nested={"ddconfig": lambda v, w: _check_ddconfig(r, r.dataclass(DDConfig, v, w), w),
                "loss": lambda v, w: _check_loss(r, LossConfig(*_ours_typed(r, v, w, LOSS_TYPES, _LOSS_PARAMS,
                                                                            "loss type")), w),
                "scheduler": lambda v, w: _ours_scheduler(r, v, w)})
    return _check_first_stage(r, fs, where)


def _ours_scheduler(r: Reader, value: Any, where: str) -> SchedulerConfig | None:
    if value is None:
        return None
    data = r.mapping(value, where)
    if "type" not in data:
        raise r.fail(f"{where}.type", "missing required key")
    kind = r.choice(data.pop("type"), tuple(_SCHEDULER_PARAMS), f"{where}.type", "scheduler type")
    return _scheduler(r, kind, data, where)


def config_from_dict(data: Any, source: str = "<config>", name: str | None = None) -> ModelConfig:
    """ldmcli's own format (a preset file, or what ``config_to_dict`` wrote) → :class:`ModelConfig`."""
    r = Reader(source)
    top = r.mapping(data, "")
    version = top.pop(FORMAT_KEY, None)
    if version != FORMAT_VERSION:
        raise r.fail(FORMAT_KEY, f"unsupported format version {_show(version)} (this ldmcli reads {FORMAT_VERSION})")
    kind = r.choice(top.pop("kind", None), ("first_stage", "ldm"), "kind", "model kind")
    name = top.pop("name", name)
    if name is not None:
        name = r.coerce(name, str, "name")
    lr = top.pop("base_learning_rate", None)
    lr = r.coerce(lr, float, "base_learning_rate") if lr is not None else None
    allowed = ("first_stage",) if kind == "first_stage" else ("first_stage", "unet", "cond_stage", "diffusion")
    for key in top:
        if key not in allowed:
            raise r.fail(key, f"unknown key{did_you_mean(key, allowed)} (a {kind} config has {', '.join(allowed)})")
    for key in allowed:
        if key not in top:
            raise r.fail(key, "missing required key")
    if kind == "first_stage":
        return ModelConfig("first_stage", _ours_first_stage(r, top["first_stage"], "first_stage", inside_ldm=False),
                           lr, name=name, source=source)
    fs = _ours_first_stage(r, top["first_stage"], "first_stage", inside_ldm=True)
    unet = _check_unet(r, r.dataclass(UNetConfig, top["unet"], "unet"), "unet")
    cond = _check_cond(r, CondStageConfig(*_ours_typed(r, top["cond_stage"], "cond_stage", COND_TYPES, _COND_PARAMS,
                                                       "conditioner")), "cond_stage")
    d = r.dataclass(LatentDiffusionConfig, top["diffusion"], "diffusion", exclude=set(_LDM_NESTED) - {"scheduler"},
                    extra={"unet": unet, "first_stage": fs, "cond_stage": cond},
                    nested={"scheduler": lambda v, w: _ours_scheduler(r, v, w)})
    return ModelConfig("ldm", _check_ldm(r, d, "diffusion", "unet"), lr, name=name, source=source)


# ------------------------------------------------------------------------------------------------------ loading


def preset_names(folder: str = "") -> list[str]:
    """Every preset shipped with the package: one per zoo model, or those of ``presets/<folder>`` (``train``)."""
    root = resources.files("ldmcli") / "presets"
    root = root / folder if folder else root
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str, folder: str = "") -> Any:
    """The YAML document of the shipped preset ``name`` (in ``presets/<folder>`` if given)."""
    root = resources.files("ldmcli") / "presets"
    root = root / folder if folder else root
    return read_yaml((root / f"{name}.yaml").read_text(encoding="utf-8"), f"preset {name}")


def read_config_file(path: Path) -> Any:
    """The document in a config file: JSON for ``.json``, YAML otherwise (unreadable or invalid: UsageError)."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
    if path.suffix == ".json":
        import json

        try:
            return json.loads(content)
        except json.JSONDecodeError as e:
            raise UsageError(f"invalid config {path}: not valid JSON: {e}") from None
    return read_yaml(content, str(path))


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML text (``source`` names it in the one-line UsageError for invalid YAML)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UsageError(f"invalid config {source}: not valid YAML{where}: {problem}") from None


def parse_config(doc: Any, source: str = "<config>", name: str | None = None) -> ModelConfig:
    """A parsed document in either format → :class:`ModelConfig` (upstream if it has ``model:``)."""
    if isinstance(doc, Mapping) and FORMAT_KEY in doc:
        return config_from_dict(doc, source, name=name)
    if isinstance(doc, Mapping) and "model" in doc:
        cfg = from_upstream(doc, source)
        return dataclasses.replace(cfg, name=name) if name is not None else cfg
    raise UsageError(f"invalid config {source}: neither an upstream config (top-level 'model:') nor an ldmcli "
                     f"config (top-level '{FORMAT_KEY}: {FORMAT_VERSION}')")


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or (os.altsep is not None and os.altsep in text)
            or text.endswith((".yaml", ".yml", ".json")))


def load_config(name_or_path: str | os.PathLike, _via: str | None = None) -> ModelConfig:
    """A zoo preset name (``txt2img-f8-large``), an ldmcli config file, or an upstream YAML (a file, or a folder
    holding ``config.yaml`` as upstream's ``models/ldm/<name>/``) → a validated :class:`ModelConfig`."""
    text = os.fspath(name_or_path)
    names = preset_names()
    if not isinstance(name_or_path, os.PathLike) and not _looks_like_path(text) and text in names:
        return parse_config(read_preset(text), f"preset {text}", name=text)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"
    if path.is_file():
        return parse_config(read_config_file(path), str(path))
    if _looks_like_path(text) or isinstance(name_or_path, os.PathLike):
        raise UsageError(f"config file not found: {path}")
    prefix = f"{_via}: " if _via else ""
    raise UnknownModelError(f"{prefix}unknown model {text!r}{did_you_mean(text, names)} "
                            f"(a zoo name such as {', '.join(names[:3])}, ... or a config file path)")


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

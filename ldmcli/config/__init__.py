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

# One module per concern; everything stays importable from ``ldmcli.config``: registry (upstream targets), schema
# (typed configs), reader (validation), checks (cross-field rules), upstream (upstream YAML), native (ldmcli's
# format), files (presets and config files), build (config -> nn.Module).
from ldmcli.config.registry import (  # noqa: F401
    ATTN_TYPES,
    BETA_SCHEDULES,
    CONDITIONING_KEYS,
    COND_SENTINELS,
    COND_TARGETS,
    COND_TYPES,
    FIRST_STAGE_TYPES,
    FORMAT_KEY,
    FORMAT_VERSION,
    LOSS_TARGETS,
    LOSS_TYPES,
    MODEL_TARGETS,
    PARAMETERIZATIONS,
    SCHEDULER_TARGETS,
    UNET_TARGETS,
    _IGNORED_IO_KEYS,
)
from ldmcli.config.schema import (  # noqa: F401
    BERTEmbedderParams,
    ClassEmbedderParams,
    CondStageConfig,
    CyclesParams,
    DDConfig,
    FirstStageConfig,
    LPIPSWithDiscriminatorParams,
    LatentDiffusionConfig,
    LossConfig,
    ModelConfig,
    SchedulerConfig,
    SpatialRescalerParams,
    UNetConfig,
    VQLPIPSWithDiscriminatorParams,
    WarmupCosineParams,
    _COND_PARAMS,
    _LDM_NESTED,
    _LOSS_PARAMS,
    _SCHEDULER_PARAMS,
    _VQ_ONLY,
)
from ldmcli.config.reader import (  # noqa: F401
    Reader,
    _show,
    did_you_mean,
)
from ldmcli.config.checks import (  # noqa: F401
    _check_cond,
    _check_ddconfig,
    _check_first_stage,
    _check_ldm,
    _check_loss,
    _check_unet,
)
from ldmcli.config.upstream import (  # noqa: F401
    _scheduler,
    _upstream_cond,
    _upstream_first_stage,
    _upstream_ldm,
    _upstream_loss,
    _upstream_scheduler,
    from_upstream,
)
from ldmcli.config.native import (  # noqa: F401
    _ours_first_stage,
    _ours_scheduler,
    _ours_typed,
    _plain,
    _typed_block,
    config_from_dict,
    config_to_dict,
)
from ldmcli.config.files import (  # noqa: F401
    _looks_like_path,
    load_config,
    parse_config,
    preset_names,
    read_config_file,
    read_preset,
    read_yaml,
)
from ldmcli.config.build import (  # noqa: F401
    _LDM_PASSTHROUGH,
    _build_loss,
    build_cond_stage,
    build_first_stage,
    build_latent_diffusion,
    build_model,
    build_unet,
    scheduler_dict,
)

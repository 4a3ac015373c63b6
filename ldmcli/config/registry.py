"""Upstream ``target`` strings and the names ldmcli gives them (nothing here is ever imported), and the enumerations the configs allow."""

from __future__ import annotations

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

"""Latent diffusion (Rombach et al., CVPR 2022): a DDPM (Ho et al. 2020) in the latent space of a frozen autoencoder.

``LatentDiffusion`` is a plain ``nn.Module`` whose state_dict equals upstream's ``ldm.models.diffusion.ddpm``
checkpoints: the 12 schedule buffers, ``model.diffusion_model.*`` (the UNet inside a ``DiffusionWrapper``),
``model_ema.*`` when ``use_ema``, ``first_stage_model.*``, ``cond_stage_model.*`` and, only with ``scale_by_std``,
``scale_factor``. Method names are upstream's so notebooks port over (``apply_model``, ``get_learned_conditioning``,
``encode_first_stage``, ``decode_first_stage``, ``q_sample``, ``ema_scope``, ``p_losses``...). Training loops,
logging and samplers live elsewhere; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldmcli.models.autoencoder import VQModelInterface
from ldmcli.models.distributions import DiagonalGaussianDistribution
from ldmcli.models.ema import LitEma
from ldmcli.models.patches import (
    SplitInputParams,
    clamp_patch,
    delta_border,
    patch_weighting,
    repeat_batch,
    run_patchwise,
    tie_weighting,
)
from ldmcli.models.schedule import SCHEDULE_BUFFERS, extract, lvlb_weights, make_beta_schedule, schedule_buffers
from ldmcli.sampling.samplers import noise_like

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")
IS_FIRST_STAGE = "__is_first_stage__"
IS_UNCONDITIONAL = "__is_unconditional__"
# Buffers that stay float32 whatever dtype the networks are cast to.
_FLOAT32_BUFFERS = (*SCHEDULE_BUFFERS, "lvlb_weights", "logvar", "scale_factor")

Cond = torch.Tensor | list | dict | None


class DiffusionWrapper(nn.Module):
    """Feeds the conditioning to the UNet the way ``conditioning_key`` says.

    concat: channel-concatenated to the input; crossattn: the cross-attention context; hybrid: both;
    adm: class labels ``y``; None: unconditional.
    """

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; expected one of {CONDITIONING_KEYS}")
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])  # adm


class LatentDiffusion(nn.Module):
    """A DDPM over first-stage latents with an optional conditioner (LDM, Rombach et al. 2022).

    ``unet``, ``first_stage_model`` and ``cond_stage_model`` are built modules. ``cond_stage_model`` may be None
    (or ``"__is_unconditional__"``) for an unconditional model, or the first stage itself (or
    ``"__is_first_stage__"``) as in inpainting_big. The other keywords are upstream's ``LatentDiffusion`` /
    ``DDPM`` parameters; the training bookkeeping ones (``monitor``, ``scheduler_config``, ``log_every_t``) are kept
    as plain attributes for a trainer. Checkpoint loading is not the model's job (see ``ldmcli.loading``).
    """

    def __init__(
        self,
        unet: nn.Module,
        first_stage_model: nn.Module,
        cond_stage_model: nn.Module | str | None = None,
        *,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | np.ndarray | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        use_positional_encodings: bool = False,
        monitor: str | None = None,
        scheduler_config: Any = None,
        log_every_t: int = 100,
    ) -> None:
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', not {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', not {loss_type!r}")
        if use_positional_encodings:
            raise ValueError("use_positional_encodings is not supported (no published model uses it)")
        self.num_timesteps_cond = 1 if num_timesteps_cond is None else num_timesteps_cond
        if self.num_timesteps_cond > timesteps:
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        unconditional = cond_stage_model is None or (
            isinstance(cond_stage_model, str) and cond_stage_model == IS_UNCONDITIONAL
        )
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if unconditional:
            conditioning_key = None

        self.parameterization = parameterization
        self.clip_denoised = False  # LatentDiffusion overrides DDPM's default
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = False
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_forward = cond_stage_forward
        self.scale_by_std = scale_by_std
        self.log_every_t = log_every_t
        self.monitor = monitor
        self.scheduler_config = scheduler_config
        self._split_input_dict: dict[str, Any] | None = None  # upstream's split_input_params, see below

        self.model = DiffusionWrapper(unet, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)

        self.register_schedule(
            given_betas=given_betas,
            beta_schedule=beta_schedule,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            cosine_s=cosine_s,
        )
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=float(logvar_init), size=(self.num_timesteps,))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)

        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor

        self.first_stage_model = first_stage_model.eval()
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

        if isinstance(cond_stage_model, str) and cond_stage_model == IS_FIRST_STAGE:
            cond_stage_model = self.first_stage_model
        if unconditional:
            self.cond_stage_model = None
        elif cond_stage_model is self.first_stage_model:
            if cond_stage_trainable:
                raise ValueError("a cond stage that is the first stage cannot be trainable")
            self.cond_stage_model = cond_stage_model
        elif isinstance(cond_stage_model, nn.Module):
            self.cond_stage_model = cond_stage_model
            if not cond_stage_trainable:
                self.cond_stage_model.eval()
                for param in self.cond_stage_model.parameters():
                    param.requires_grad = False
        else:
            raise ValueError(f"cond_stage_model must be a module, None or {IS_FIRST_STAGE!r}")

    # ----------------------------------------------------------------------------------------------- schedule
    def register_schedule(
        self,
        given_betas: Sequence[float] | np.ndarray | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """(Re)build the 12 schedule buffers, ``lvlb_weights`` and the conditioning-noise schedule."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(
                beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
            )
        (n,) = betas.shape
        self.num_timesteps = int(n)
        self.linear_start = linear_start
        self.linear_end = linear_end
        buffers = schedule_buffers(betas, v_posterior=self.v_posterior)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        weights = lvlb_weights(betas, buffers, self.parameterization)
        if not weights.is_meta and torch.isnan(weights).all():
            raise ValueError("the beta schedule gives NaN variational-bound weights")
        self.register_buffer("lvlb_weights", weights, persistent=False)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
            ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
            cond_ids[: self.num_timesteps_cond] = ids
            self.register_buffer("cond_ids", cond_ids, persistent=False)

    # -------------------------------------------------------------------------------------- dtype and train mode
    @property
    def device(self) -> torch.device:
        """Where the model lives (upstream code and notebooks use Lightning's ``model.device``)."""
        return self.betas.device

    def _apply(self, fn: Any, recurse: bool = True) -> LatentDiffusion:
        """``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` cast the networks but keep the schedule (and
        ``scale_factor``) in float32, so samplers never see bf16-rounded alphas; device moves apply to all."""
        keep = {
            name: buf
            for name in _FLOAT32_BUFFERS
            if (buf := self._buffers.get(name)) is not None and buf.dtype == torch.float32
        }
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers.get(name)
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return self

    def train(self, mode: bool = True) -> LatentDiffusion:
        """As nn.Module.train, but the first stage (and a frozen conditioner) stay in eval mode, as upstream."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Within the block the diffusion model uses its EMA weights (when ``use_ema``); they are put back after."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())

    # ------------------------------------------------------------------------------------------ diffusion math
    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Diffuse ``x_start`` to step ``t``: sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = noise_like(x_start, generator)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and the predicted noise: sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    # ------------------------------------------------------------------------------------ patch-wise evaluation
    @property
    def split_input_params(self) -> dict[str, Any]:
        """Upstream's switch for patch-wise evaluation (see :mod:`ldmcli.models.patches`): set it to a dict such as
        ``{"ks": (128, 128), "stride": (64, 64), "vqf": 4, "patch_distributed_vq": True, "tie_braker": False,
        "clip_max_weight": 0.5, "clip_min_weight": 0.01, "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}``
        and ``apply_model`` / ``encode_first_stage`` / ``decode_first_stage`` run patch by patch; ``del`` it (or set
        None) to go back. ``hasattr(model, "split_input_params")`` is False while unset, as upstream."""
        if self._split_input_dict is None:
            raise AttributeError("split_input_params")
        return self._split_input_dict

    @split_input_params.setter
    def split_input_params(self, params: dict[str, Any] | None) -> None:
        if params is not None:
            SplitInputParams.from_dict(params)  # a bad dict fails here, not at the first step
        self._split_input_dict = params

    @split_input_params.deleter
    def split_input_params(self) -> None:
        self._split_input_dict = None

    def _split(self) -> SplitInputParams | None:
        """The validated params, re-read when a caller changed the dict in place (upstream code does)."""
        if self._split_input_dict is None:
            return None
        return SplitInputParams.from_dict(self._split_input_dict)

    def delta_border(self, h: int, w: int) -> torch.Tensor:
        """Upstream's normalised distance to the border of an ``h x w`` patch (``(h, w)``, 0 to 0.5)."""
        return delta_border(h, w)

    def get_weighting(self, h: int, w: int, Ly: int, Lx: int, device: Any) -> torch.Tensor:  # noqa: N803
        """Upstream's blending weights ``(1, h * w, Ly * Lx)`` for ``Ly x Lx`` patches of ``h x w`` (needs
        ``split_input_params`` for the clip bounds)."""
        params = self._split()
        if params is None:
            raise ValueError("get_weighting needs split_input_params")
        weighting = patch_weighting(h, w, params).reshape(1, h * w, 1).repeat(1, 1, Ly * Lx)
        ties = tie_weighting(Ly, Lx, params)
        if ties is not None:
            weighting = weighting * ties.view(1, 1, Ly * Lx)
        return weighting.to(device)

    # ------------------------------------------------------------------------------------- stages and the UNet
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor | DiagonalGaussianDistribution:
        """The first stage's encoding of images ``x`` in [-1, 1] (a posterior for KL, a tensor for VQ); patch by
        patch under ``split_input_params`` with ``patch_distributed_vq`` (``ks``/``stride`` in image pixels)."""
        params = self._split()
        if params is None or not params.patch_distributed_vq:
            return self.first_stage_model.encode(x)
        self._split_input_dict["original_image_size"] = tuple(x.shape[-2:])
        ks, stride = clamp_patch(params.ks, params.stride, *x.shape[-2:])

        def encode(parts: list[torch.Tensor], n: int) -> torch.Tensor:
            h = self.first_stage_model.encode(parts[0])
            if not isinstance(h, torch.Tensor):
                raise TypeError("patch-wise encoding needs a first stage whose encode returns a tensor (a VQ stage)")
            return h

        return run_patchwise(encode, [x], ks, stride, Fraction(1, params.vqf), params, "encode")

    def get_first_stage_encoding(
        self,
        encoder_posterior: torch.Tensor | DiagonalGaussianDistribution,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The diffusion latent: a sample of a Gaussian posterior (or the tensor itself) times ``scale_factor``."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"cannot take a first-stage encoding of {type(encoder_posterior).__name__}")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """Images from latents: divide by ``scale_factor``, then decode (a VQ first stage quantises first)."""
        return self.differentiable_decode_first_stage(z, predict_cids, force_not_quantize)

    def differentiable_decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """:meth:`decode_first_stage` without ``no_grad`` (for losses through the decoder). Patch by patch under
        ``split_input_params`` with ``patch_distributed_vq`` (``ks``/``stride`` in latent pixels, ``vqf`` the
        upscaling), each patch decoded (and, for VQ, quantised) on its own as upstream."""
        if predict_cids:
            if z.dim() == 4:
                z = torch.argmax(z.exp(), dim=1).long()
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None)
            z = rearrange(z, "b h w c -> b c h w").contiguous()
        z = 1.0 / self.scale_factor * z
        vq = isinstance(self.first_stage_model, VQModelInterface)

        def decode(part: torch.Tensor) -> torch.Tensor:
            if vq:
                return self.first_stage_model.decode(part, force_not_quantize=predict_cids or force_not_quantize)
            return self.first_stage_model.decode(part)

        params = self._split()
        if params is None or not params.patch_distributed_vq:
            return decode(z)
        ks, stride = clamp_patch(params.ks, params.stride, *z.shape[-2:])
        return run_patchwise(lambda parts, n: decode(parts[0]), [z], ks, stride, Fraction(params.vqf), params,
                             "decode", batch=params.decode_patch_batch)

    def get_learned_conditioning(self, c: Any) -> Any:
        """Run the conditioner on raw conditioning ``c``: its ``encode`` when it has one (a posterior gives its
        mode), else its forward, or the method named by ``cond_stage_forward``."""
        if self.cond_stage_forward is None:
            encode = getattr(self.cond_stage_model, "encode", None)
            if callable(encode):
                c = encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            method = getattr(self.cond_stage_model, self.cond_stage_forward, None)
            if not callable(method):
                raise ValueError(f"the conditioner has no method {self.cond_stage_forward!r}")
            c = method(c)
        return c

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond, return_ids: bool = False) -> Any:
        """The UNet's prediction for ``x_noisy`` at ``t``. ``cond`` is a dict ``{'c_concat': [...],
        'c_crossattn': [...]}`` (hybrid), or a tensor / list of tensors put under the model's conditioning key.
        Under ``split_input_params`` the UNet runs on ``ks`` patches (latent pixels): concat conditionings are cut
        like the latent, cross-attention contexts go to every patch."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        params = self._split()
        if params is not None:
            return self._apply_model_patchwise(x_noisy, t, cond, params)
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def _apply_model_patchwise(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], params: SplitInputParams
    ) -> torch.Tensor:
        if self.cond_stage_key == "coordinates_bbox" and self.model.conditioning_key is not None:
            raise ValueError("patch-wise sampling of a bounding-box (layout) model is not supported")
        h, w = x.shape[-2:]
        concat = list(cond.get("c_concat") or [])
        for c in concat:
            if c.shape[-2:] != (h, w):
                raise ValueError(f"patch-wise apply_model cuts concat conditionings like the latent; got "
                                 f"{tuple(c.shape[-2:])} for a {h}x{w} latent")
        rest = {k: v for k, v in cond.items() if k != "c_concat"}
        ks, stride = clamp_patch(params.ks, params.stride, h, w)

        def unet(parts: list[torch.Tensor], n: int) -> torch.Tensor:
            kwargs = {k: repeat_batch(v, n) for k, v in rest.items()}
            if concat:
                kwargs["c_concat"] = parts[1:]
            out = self.model(parts[0], repeat_batch(t, n), **kwargs)
            if isinstance(out, tuple):
                raise ValueError("patch-wise apply_model cannot blend a model with several outputs")
            return out

        return run_patchwise(unet, [x, *concat], ks, stride, Fraction(1), params, "unet")

    # --------------------------------------------------------------------------------------------------- losses
    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """L1 or L2 (``loss_type``), averaged when ``mean``."""
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")

    def p_losses(
        self,
        x_start: torch.Tensor,
        cond: Cond,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The LDM training loss at steps ``t`` (simple loss weighted by ``logvar``, plus ``original_elbo_weight``
        times the VLB term), and a dict of its parts keyed ``train/...`` or ``val/...`` as upstream logs them."""
        if noise is None:
            noise = noise_like(x_start, generator)
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)

        prefix = "train" if self.training else "val"
        target = x_start if self.parameterization == "x0" else noise
        loss_dict: dict[str, torch.Tensor] = {}

        loss_simple = self.get_loss(model_output, target, mean=False).mean([1, 2, 3])
        loss_dict[f"{prefix}/loss_simple"] = loss_simple.mean()

        logvar_t = self.logvar[t.to(self.logvar.device)].to(x_start.device)
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()

        loss_vlb = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
        loss_vlb = (self.lvlb_weights[t] * loss_vlb).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def forward(
        self,
        x: torch.Tensor,
        c: Any,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training loss on latents ``x``: uniform random steps, conditioning encoded when trainable."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), generator=generator, device=_gen_device(x, generator))
        t = t.to(x.device)
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError("this model is conditional: pass the conditioning")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t]
                c = self.q_sample(x_start=c, t=tc, noise=noise_like(c.float(), generator))
        return self.p_losses(x, c, t, noise=noise, generator=generator)


def _gen_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device

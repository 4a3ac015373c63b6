"""Lightning modules that train this package's plain ``nn.Module`` models the way upstream's ``training_step``s do.

* :class:`AutoencoderModule`: AutoencoderKL / VQModel with their GAN losses (Esser et al. 2021; Rombach et al. 2022,
  App. G). Two optimizers (autoencoder, discriminator; Adam, betas (0.5, 0.9)) stepped one after the other on each
  batch, as Lightning 1.x's automatic multi-optimizer loop did; here with manual optimization, since Lightning 2
  dropped that loop. The discriminator step re-runs the autoencoder after its update, as upstream's second
  ``training_step`` call did; before ``disc_start`` it is skipped (its loss is zero then). ``step`` counts batches that stepped (Lightning counts each optimizer's step).
* :class:`LatentDiffusionModule`: the LDM loss on first-stage latents (AdamW on the UNet, plus a trainable
  conditioner), EMA after every batch (the :class:`~ldmcli.training.callbacks.EMAUpdate` callback, so it runs
  before the batch's checkpoint), the warm-up LR schedule, ``scale_by_std`` on the first batch, and
  ``cond_drop``: the null condition with probability P, for classifier-free guidance (Ho & Salimans 2022).

All randomness of a step (posterior samples, timesteps, noise, condition dropping) comes from a ``torch.Generator``
the module owns and checkpoints, so a resumed run continues the same random stream.
The checkpoint's ``state_dict`` has the wrapped model's own keys (upstream's), so ``load_model`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from einops import rearrange
from torch.optim.lr_scheduler import LambdaLR

from ldmcli.errors import LdmError

PREFIX = "net."


class NonFiniteLossError(LdmError):
    """The training loss became NaN or infinite."""


def image_input(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """Upstream ``get_input``: ``b h w c`` images (or ``b h w`` maps) → contiguous float ``b c h w``."""
    x = batch[key]
    if x.ndim == 3:
        x = x[..., None]
    return rearrange(x, "b h w c -> b c h w").contiguous().float()


class _Base(L.LightningModule):
    """State shared by both modules: the wrapped model under ``net``, the learning rate, the random stream."""

    def __init__(self, net: torch.nn.Module, learning_rate: float, seed: int) -> None:
        super().__init__()
        self.net = net
        self.learning_rate = learning_rate
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.last_loss: float | None = None
        self.extra_checkpoint: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        # each rank draws its own stream (a fresh run; a resumed one restores the state)
        if self.trainer is not None and self.trainer.global_rank:
            self.generator.manual_seed(self.seed + 7919 * self.trainer.global_rank)

    def _check_finite(self, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss became {value} at step {self.step}; lower the learning rate or check "
                                     "the data (the last good checkpoint is kept)")

    @property
    def step(self) -> int:
        """Optimizer steps taken (batches that stepped, for the two-optimizer autoencoder)."""
        return self.trainer.global_step if self._trainer is not None else 0

    # frozen pretrained weights the run rebuilds (from the store) each time: left out of checkpoints
    REBUILT_PREFIXES: tuple[str, ...] = ()
    # what sampling does not need: left out of the exported model.ckpt too
    TRAINING_ONLY_PREFIXES: tuple[str, ...] = ()

    # checkpoints hold the wrapped model's keys, as upstream's do
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rebuilt = tuple(PREFIX + p for p in self.REBUILT_PREFIXES)
        checkpoint["state_dict"] = {k[len(PREFIX):]: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(PREFIX) and not (rebuilt and k.startswith(rebuilt))}
        checkpoint["generator_state"] = self.generator.get_state()
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        checkpoint["global_step"] = self.step
        checkpoint.update(self.extra_checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = {PREFIX + k: v for k, v in checkpoint["state_dict"].items()}
        if self.REBUILT_PREFIXES:  # the rebuilt weights as this run loaded them (older checkpoints carry them)
            rebuilt = tuple(PREFIX + p for p in self.REBUILT_PREFIXES)
            for k, v in self.state_dict().items():
                if k.startswith(rebuilt) and k not in state:
                    state[k] = v
        checkpoint["state_dict"] = state
        if "generator_state" in checkpoint:
            self.generator.set_state(checkpoint["generator_state"])
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


class AutoencoderModule(_Base):
    """Train AutoencoderKL or VQModel (with its ``loss`` module) on ``batch[image_key]``.

    Checkpoints leave out the frozen LPIPS network (``loss.perceptual_loss.*``, VGG16: ~58 MB): a run loads it from
    the store (or needs none with ``perceptual_weight: 0``); the exported ``model.ckpt`` leaves out ``loss.*``."""

    REBUILT_PREFIXES = ("loss.perceptual_loss.",)
    TRAINING_ONLY_PREFIXES = ("loss.",)

    def __init__(self, net: torch.nn.Module, learning_rate: float, *, seed: int = 23, accumulate: int = 1,
                 image_logger_images: int = 8) -> None:
        super().__init__(net, learning_rate, seed)
        self.automatic_optimization = False
        self.is_vq = hasattr(net, "quantize")
        self.accumulate = accumulate
        self.max_images = image_logger_images
        self._micro = 0

    @property
    def step(self) -> int:
        return self.trainer.global_step // 2 if self._trainer is not None else 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Lightning counts both optimizers' steps; the file says how many batches stepped, as upstream's did
        checkpoint["global_step"] = self.step

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.is_vq:
            return self.net(x)  # (reconstruction, codebook loss)
        return self.net(x, generator=self.generator)  # (reconstruction, posterior)

    def _loss(self, x: torch.Tensor, rec: torch.Tensor, aux: Any, idx: int) -> tuple[torch.Tensor, dict]:
        last = self.net.get_last_layer()
        if self.is_vq:
            return self.net.loss(aux, x, rec, idx, self.step, last_layer=last, split="train")
        return self.net.loss(x, rec, aux, idx, self.step, last_layer=last, split="train")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        opt_ae, opt_disc = self.optimizers()
        x = image_input(batch, self.net.image_key)
        self._micro += 1
        boundary = self._micro % self.accumulate == 0

        self.toggle_optimizer(opt_ae)
        rec, aux = self._forward(x)
        aeloss, log_ae = self._loss(x, rec, aux, 0)
        self._check_finite(aeloss)
        self.manual_backward(aeloss / self.accumulate)
        if boundary:
            opt_ae.step()
            opt_ae.zero_grad(set_to_none=True)
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        log_disc: dict = {}
        discloss = torch.zeros((), device=x.device)
        if self._discriminator_active():
            with torch.no_grad():
                rec, aux = self._forward(x)
            discloss, log_disc = self._loss(x, rec, aux, 1)
            self._check_finite(discloss)
            self.manual_backward(discloss / self.accumulate)
        if boundary:
            opt_disc.step()  # also before disc_start (no gradients: a no-op), so each batch counts two steps
            opt_disc.zero_grad(set_to_none=True)
            for sched in self._schedulers():
                sched.step()
        self.untoggle_optimizer(opt_disc)

        self.last_loss = float(aeloss.detach())
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True)
        self.log("discloss", discloss.detach(), prog_bar=True, on_step=True)
        self.log_dict({k: v.detach().float() for k, v in {**log_ae, **log_disc}.items()}, on_step=True)
        return aeloss.detach()

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, float]:
        """Upstream's ``validation_step``: both losses with ``split="val"`` (``val/rec_loss``, ``val/total_loss``,
        ``val/disc_loss``, ...) on one batch, the posterior sampled from ``generator``. Call in eval mode."""
        x = image_input(batch, self.net.image_key).to(self.device)
        rec, aux = self.net(x) if self.is_vq else self.net(x, generator=generator)
        last = self.net.get_last_layer()
        logs: dict[str, Any] = {}
        for idx in (0, 1):
            if self.is_vq:
                _, part = self.net.loss(aux, x, rec, idx, self.step, last_layer=last, split="val")
            else:
                _, part = self.net.loss(x, rec, aux, idx, self.step, last_layer=last, split="val")
            logs.update(part)
        return {k: float(v) for k, v in logs.items()}

    def _discriminator_active(self) -> bool:
        """Before ``disc_start`` (or with ``disc_factor: 0``) the discriminator loss is 0 times a number, its
        gradients are zero and Adam leaves the weights alone: the discriminator step is skipped then."""
        loss = self.net.loss
        return loss.disc_factor > 0 and self.step >= loss.discriminator_iter_start

    def _schedulers(self) -> list:
        s = self.lr_schedulers()
        if s is None:
            return []
        return list(s) if isinstance(s, list) else [s]

    def configure_optimizers(self) -> Any:
        net = self.net
        lr_g = getattr(net, "lr_g_factor", 1.0) * self.learning_rate
        ae_params = (list(net.encoder.parameters()) + list(net.decoder.parameters())
                     + (list(net.quantize.parameters()) if self.is_vq else [])
                     + list(net.quant_conv.parameters()) + list(net.post_quant_conv.parameters()))
        opt_ae = torch.optim.Adam(ae_params, lr=lr_g if self.is_vq else self.learning_rate, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(net.loss.discriminator.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))
        sched_cfg = getattr(net, "scheduler_config", None)
        if sched_cfg is None:
            return [opt_ae, opt_disc]
        from ldmcli.training.lr_schedule import build_schedule

        return [opt_ae, opt_disc], [LambdaLR(opt_ae, build_schedule(sched_cfg)),
                                    LambdaLR(opt_disc, build_schedule(sched_cfg))]

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Inputs and reconstructions (posterior mode / quantised) in [-1, 1]."""
        x = image_input(batch, self.net.image_key)[: self.max_images].to(self.device)
        if self.is_vq:
            rec, _ = self.net(x)
        else:
            rec, _ = self.net(x, sample_posterior=False)
        return {"inputs": x, "reconstructions": rec}


class LatentDiffusionModule(_Base):
    """Train a LatentDiffusion model's UNet (and trainable conditioner) on first-stage latents of the batch."""

    def __init__(self, net: torch.nn.Module, learning_rate: float, *, seed: int = 23, cond_drop: float = 0.0,
                 null_condition: Callable[[Any, torch.Tensor], Any] | None = None, restarted: bool = False,
                 image_logger_images: int = 8, sample_steps: int = 50,
                 scheduler_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(net, learning_rate, seed)
        self.scheduler_config = scheduler_config
        self.cond_drop = cond_drop
        self.null_condition = null_condition
        self.restarted = restarted
        self.max_images = image_logger_images
        self.sample_steps = sample_steps

    def _latents(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                 drop: bool = True) -> tuple[torch.Tensor, Any]:
        """Upstream ``LatentDiffusion.get_input``: latents ``z`` and the conditioning (encoded unless trainable).
        Random draws come from ``generator`` (default: the module's stream); ``drop=False``: no condition dropping."""
        net = self.net
        generator = self.generator if generator is None else generator
        x = image_input(batch, net.first_stage_key).to(self.device)
        with torch.no_grad():
            z = net.get_first_stage_encoding(net.encode_first_stage(x), generator=generator).detach()
        if net.model.conditioning_key is None:
            return z, None
        key = net.cond_stage_key
        if key == net.first_stage_key:
            xc: Any = x
        elif key in ("caption", "coordinates_bbox"):
            xc = batch[key]
        elif key == "class_label":
            xc = batch
        else:
            xc = image_input(batch, key).to(self.device)
        if self.cond_drop > 0 and drop:
            dropped = torch.rand(z.shape[0], generator=generator) < self.cond_drop
            if bool(dropped.any()):
                xc = self.null_condition(xc, dropped)
        if not net.cond_stage_trainable:
            with torch.no_grad():
                c = net.get_learned_conditioning(xc)
        else:
            c = xc
        return z, c

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        net = self.net
        if not (net.scale_by_std and self.trainer.global_step == 0 and batch_idx == 0 and not self.restarted):
            return
        if float(net.scale_factor) != 1.0:
            raise LdmError("scale_by_std needs scale_factor: 1.0 (the factor is computed from the data)")
        x = image_input(batch, net.first_stage_key).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        z = net.get_first_stage_encoding(net.encode_first_stage(x), generator=gen)
        factor = 1.0 / z.flatten().std()
        factor = self.trainer.strategy.broadcast(factor, src=0)  # rank 0's batch decides, as upstream
        net.scale_factor.copy_(factor.to(net.scale_factor))
        self.restarted = True

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        z, c = self._latents(batch)
        loss, logs = self.net(z, c, generator=self.generator)
        self._check_finite(loss)
        self.last_loss = float(loss.detach())
        self.log("loss", loss.detach(), prog_bar=True, on_step=True)
        self.log_dict({k: v.detach().float() for k, v in logs.items()}, on_step=True)
        if self.scheduler_config is not None and self._trainer is not None:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    @torch.no_grad()
    def validation_metrics(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, float]:
        """Upstream's ``validation_step``: the loss parts (``val/loss_simple``, ``val/loss_vlb``, ``val/loss``) with
        the training weights and again with the EMA weights (``..._ema``), on the same timesteps and noise (drawn
        from ``generator``), with the true conditions. Call in eval mode."""
        net = self.net
        z, c = self._latents(batch, generator=generator, drop=False)
        state = generator.get_state()
        _, logs = net(z, c, generator=generator)
        out = {k: float(v) for k, v in logs.items() if k.startswith("val/")}
        if getattr(net, "use_ema", False):
            generator.set_state(state)
            with net.ema_scope():
                _, logs = net(z, c, generator=generator)
            out.update({f"{k}_ema": float(v) for k, v in logs.items() if k.startswith("val/")})
        return out

    def configure_optimizers(self) -> Any:
        net = self.net
        params = list(net.model.parameters())
        if net.cond_stage_trainable:
            params += list(net.cond_stage_model.parameters())
        if net.learn_logvar:
            params.append(net.logvar)
        opt = torch.optim.AdamW(params, lr=self.learning_rate)
        if self.scheduler_config is None:
            return opt
        from ldmcli.training.lr_schedule import build_schedule

        return [opt], [{"scheduler": LambdaLR(opt, build_schedule(self.scheduler_config)), "interval": "step",
                        "frequency": 1}]

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Inputs, their first-stage reconstructions and DDIM samples (EMA weights) for the batch's conditions."""
        from ldmcli.sampling import SamplerSettings, sample_latents

        net = self.net
        n = min(self.max_images, len(batch[net.first_stage_key]))
        small = {k: v[:n] for k, v in batch.items()}
        x = image_input(small, net.first_stage_key).to(self.device)
        gen = torch.Generator().manual_seed(self.seed)
        z = net.get_first_stage_encoding(net.encode_first_stage(x), generator=gen)
        if net.model.conditioning_key is None:
            c = None
        else:
            saved, self.cond_drop = self.cond_drop, 0.0
            _, c = self._latents(small)
            self.cond_drop = saved
            if net.cond_stage_trainable:
                c = net.get_learned_conditioning(c)
        with net.ema_scope():
            x_t = torch.randn(tuple(z.shape), generator=gen).to(z)  # drawn on the CPU: the same on every device
            samples = sample_latents(net, x_t, c, None, SamplerSettings("ddim", self.sample_steps))
        return {"inputs": x, "reconstruction": net.decode_first_stage(z), "samples": net.decode_first_stage(samples)}

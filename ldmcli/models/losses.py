"""Training losses of the first stages (Esser et al. 2021, "Taming Transformers", Sec. 3.1; Rombach et al. 2022,
App. G): L1 + LPIPS reconstruction (Zhang et al. 2018), a PatchGAN discriminator (Isola et al. 2017) with hinge or
non-saturating loss and the adaptive generator weight of VQGAN, plus the KL term (``LPIPSWithDiscriminator``) or the
codebook loss (``VQLPIPSWithDiscriminator``).

Module layouts equal upstream's (``perceptual_loss.net.slice1.0.weight``, ``perceptual_loss.lin0.model.1.weight``,
``discriminator.main.3.running_mean``, ``logvar``), so standalone first-stage checkpoints' ``loss.*`` keys load.
The LPIPS weights are not bundled: :func:`load_lpips` / :meth:`LPIPS.load_pretrained` read the torchvision VGG16
state dict and the LPIPS ``vgg.pth`` linear heads from paths; with ``perceptual_weight: 0`` neither is needed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldmcli.errors import CheckpointError, LdmError

# torchvision's vgg16().features split after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices 0..29).
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICE_ENDS = (4, 9, 16, 23, 30)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> list[nn.Module]:
    """torchvision's ``vgg16().features`` layers. The convs start zero-filled (no random init of 14.7M weights that
    are always replaced by pretrained ones); built on the meta device first so this costs one memset."""
    layers: list[nn.Module] = []
    in_ch = 3
    device = torch.get_default_device()
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1, device="meta").to_empty(device=device)
            if device.type != "meta":
                with torch.no_grad():
                    conv.weight.zero_()
                    conv.bias.zero_()
            layers += [conv, nn.ReLU(inplace=False)]
            in_ch = int(item)
    return layers


class VGG16Features(nn.Module):
    """The convolutional part of VGG16 (Simonyan & Zisserman 2015) in five slices named as torchvision's
    ``features`` indices, returning relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""

    def __init__(self) -> None:
        super().__init__()
        layers = _vgg16_features()
        start = 0
        for n, end in enumerate(_SLICE_ENDS, start=1):
            block = nn.Sequential()
            for idx in range(start, end):
                block.add_module(str(idx), layers[idx])
            setattr(self, f"slice{n}", block)
            start = end
        self.N_slices = len(_SLICE_ENDS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for n in range(1, self.N_slices + 1):
            x = getattr(self, f"slice{n}")(x)
            outs.append(x)
        return outs


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet statistics LPIPS' VGG expects (buffers ``shift`` and ``scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """LPIPS' learned per-channel weights: (Dropout,) 1x1 conv to one channel without bias."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    norm_factor = torch.sqrt(torch.sum(x**2, dim=1, keepdim=True))
    return x / (norm_factor + eps)


def spatial_average(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    return x.mean([2, 3], keepdim=keepdim)


def _read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LdmError(f"LPIPS weight file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle needing more than tensors
        raise CheckpointError(f"cannot read LPIPS weights {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), VGG16 variant "v0.1", frozen.

    ``forward(input, target)`` takes images in [-1, 1] and returns a (b, 1, 1, 1) distance. ``pretrained`` tells
    whether real weights were loaded (by :meth:`load_pretrained` or through ``load_state_dict``). As upstream, the
    heads' Dropout(0.5) follows the module's mode: a trainer's ``model.train()`` turns it on (upstream training ran
    that way); call ``.eval()`` on this module afterwards for a deterministic distance.
    """

    def __init__(self, use_dropout: bool = True) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.chns = list(LPIPS_CHANNELS)
        self.net = VGG16Features()
        for i, chn in enumerate(self.chns):
            setattr(self, f"lin{i}", NetLinLayer(chn, use_dropout=use_dropout))
        for param in self.parameters():
            param.requires_grad = False
        self.pretrained = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: ANN001 (torch's signature)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if all(f"{prefix}lin{i}.model.1.weight" in state_dict for i in range(len(self.chns))):
            self.pretrained = True

    def load_pretrained(self, vgg16_path: str | os.PathLike, lpips_path: str | os.PathLike) -> LPIPS:
        """Load torchvision's ImageNet VGG16 state dict (``features.N.*`` keys; ``classifier.*`` ignored) and the
        LPIPS linear heads (``vgg.pth``, keys ``lin0..4.model.1.weight``). Files are read without running pickled
        code (``weights_only``) or as ``.safetensors``."""
        vgg = _read_weights(vgg16_path)
        lin = _read_weights(lpips_path)
        own = self.state_dict()
        new: dict[str, torch.Tensor] = {}
        slice_of = {idx: n for n, (a, b) in enumerate(zip((0, *_SLICE_ENDS[:-1]), _SLICE_ENDS), start=1)
                    for idx in range(a, b)}
        for key, value in vgg.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) in slice_of:
                new[f"net.slice{slice_of[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
        for key, value in lin.items():
            if key.startswith("lin"):
                new[key] = value
        wanted = [k for k in own if k.startswith(("net.", "lin"))]
        missing = [k for k in wanted if k not in new]
        if missing:
            where = lpips_path if missing[0].startswith("lin") else vgg16_path
            raise CheckpointError(
                f"{os.fspath(where)} is not the expected LPIPS/VGG16 weight file: missing {', '.join(missing[:3])}"
            )
        for k in wanted:
            if tuple(new[k].shape) != tuple(own[k].shape):
                raise CheckpointError(f"LPIPS weight {k} has shape {tuple(new[k].shape)}, expected "
                                      f"{tuple(own[k].shape)}")
        with torch.no_grad():
            for k in wanted:
                own[k].copy_(new[k])
        self.pretrained = True
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outs0 = self.net(self.scaling_layer(input))
        outs1 = self.net(self.scaling_layer(target))
        val = None
        for kk in range(len(self.chns)):
            diff = (normalize_tensor(outs0[kk]) - normalize_tensor(outs1[kk])) ** 2
            res = spatial_average(getattr(self, f"lin{kk}").model(diff), keepdim=True)
            val = res if val is None else val + res
        return val


def load_lpips(
    vgg16_path: str | os.PathLike, lpips_path: str | os.PathLike, device: torch.device | str | None = None
) -> LPIPS:
    """A frozen, eval-mode LPIPS with the weights of the two files (see :meth:`LPIPS.load_pretrained`)."""
    model = LPIPS().load_pretrained(vgg16_path, lpips_path).eval()
    return model.to(device) if device is not None else model


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch (Kingma & Dhariwal 2018), the
    discriminator's norm layer with ``use_actnorm`` (keys ``loc``, ``scale``, ``initialized``)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.data.copy_(-flat.mean(1)[None, :, None, None])
        self.scale.data.copy_(1 / (flat.std(1)[None, :, None, None] + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    classname = m.__class__.__name__
    if "Conv" in classname:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in classname:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix: 4x4 convs with LeakyReLU(0.2), BatchNorm (or ActNorm) after all but the
    first and last; outputs one logit per patch."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own affine shift
        kw, padw = 4, 1
        sequence: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
                                     nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
            norm_layer(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw),
        ]
        self.main = nn.Sequential(*sequence)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps (the discriminator warm-up), ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    loss_real = torch.mean(F.relu(1.0 - logits_real))
    loss_fake = torch.mean(F.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def measure_perplexity(predicted_indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook perplexity and number of codes in use (equal to ``n_embed`` when all are used equally)."""
    encodings = F.one_hot(predicted_indices.reshape(-1).long(), n_embed).float()
    avg_probs = encodings.mean(0)
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    return perplexity, torch.sum(avg_probs > 0)


def _disc_loss_fn(disc_loss: str):
    if disc_loss == "hinge":
        return hinge_d_loss
    if disc_loss == "vanilla":
        return vanilla_d_loss
    raise ValueError(f"unknown disc_loss {disc_loss!r} (expected 'hinge' or 'vanilla')")


class _GANLoss(nn.Module):
    """The parts both first-stage losses share: LPIPS, discriminator, adaptive weight, discriminator step."""

    def _init_disc(self, disc_start: int, disc_num_layers: int, disc_in_channels: int, disc_factor: float,
                   disc_weight: float, use_actnorm: bool, disc_conditional: bool, disc_ndf: int) -> None:
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm, ndf=disc_ndf)
        self.discriminator.apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def _perceptual(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        if not self.perceptual_loss.pretrained:
            raise LdmError("the LPIPS perceptual loss has no weights: load them (LPIPS.load_pretrained) "
                           "or set perceptual_weight: 0")
        return self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """VQGAN's lambda = ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4],
        times ``disc_weight``."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def _logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            return self.discriminator(x)
        return self.discriminator(torch.cat((x, cond), dim=1))

    def _generator_logits(self, reconstructions: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None and self.disc_conditional:
            raise ValueError("this loss has disc_conditional: true and needs cond=")
        if cond is not None and not self.disc_conditional:
            raise ValueError("cond= given to a loss with disc_conditional: false")
        return self._logits(reconstructions.contiguous(), cond)

    def _adaptive_or_zero(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                          last_layer: torch.Tensor | None) -> torch.Tensor:
        if last_layer is None:
            raise ValueError("the generator step needs last_layer= (the decoder's output conv weight)")
        try:
            return self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        except RuntimeError:  # no graph, as in validation under no_grad
            if self.training:
                raise
            return torch.tensor(0.0)

    def _discriminator_step(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                            cond: torch.Tensor | None, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self._logits(inputs.contiguous().detach(), cond)
        logits_fake = self._logits(reconstructions.contiguous().detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {
            f"{split}/disc_loss": d_loss.clone().detach().mean(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


class LPIPSWithDiscriminator(_GANLoss):
    """Loss of the KL autoencoders (upstream ``ldm.modules.losses.LPIPSWithDiscriminator``).

    Generator step (``optimizer_idx=0``): ``sum(nll)/b + kl_weight * sum(KL)/b + d_weight * disc_factor * g_loss``
    with ``nll = (|x - x'| + perceptual_weight * LPIPS) / exp(logvar) + logvar`` (``logvar`` a learned scalar),
    ``g_loss = -mean(D(x'))``, ``d_weight`` the adaptive weight and ``disc_factor`` 0 before ``disc_start``.
    Discriminator step (``optimizer_idx=1``): ``disc_factor * hinge/vanilla(D(x), D(x'))``.
    ``pixelloss_weight`` is accepted and, as upstream, unused.
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
    ) -> None:
        super().__init__()
        disc_loss_fn = _disc_loss_fn(disc_loss)
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_loss = LPIPS().eval()
        self.perceptual_weight = perceptual_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self._init_disc(disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight, use_actnorm,
                        disc_conditional, 64)
        self.disc_loss = disc_loss_fn

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: Any,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, global_step, cond, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), not {optimizer_idx!r}")
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_weight > 0:
            rec_loss = rec_loss + self.perceptual_weight * self._perceptual(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss = -torch.mean(self._generator_logits(reconstructions, cond))
        if self.disc_factor > 0.0:
            d_weight = self._adaptive_or_zero(nll_loss, g_loss, last_layer)
        else:
            d_weight = torch.tensor(0.0)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log


class VQLPIPSWithDiscriminator(_GANLoss):
    """Loss of the VQ autoencoders (taming ``VQLPIPSWithDiscriminator``).

    Generator step: ``mean(pixel + perceptual_weight * LPIPS) + d_weight * disc_factor * g_loss +
    codebook_weight * mean(codebook_loss)``, pixel loss L1 (or L2 with ``pixel_loss: l2``). Discriminator step as
    :class:`LPIPSWithDiscriminator`. ``pixelloss_weight`` is accepted and, as upstream, unused.
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        n_classes: int | None = None,
        perceptual_loss: str = "lpips",
        pixel_loss: str = "l1",
    ) -> None:
        super().__init__()
        disc_loss_fn = _disc_loss_fn(disc_loss)
        if perceptual_loss != "lpips":
            raise ValueError(f"unknown perceptual_loss {perceptual_loss!r} (only 'lpips' is available)")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"unknown pixel_loss {pixel_loss!r} (expected 'l1' or 'l2')")
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_loss = LPIPS().eval()
        self.perceptual_weight = perceptual_weight
        self.pixel_loss_type = pixel_loss
        self._init_disc(disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight, use_actnorm,
                        disc_conditional, disc_ndf)
        self.disc_loss = disc_loss_fn
        self.n_classes = n_classes

    def forward(
        self,
        codebook_loss: torch.Tensor,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        predicted_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, global_step, cond, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), not {optimizer_idx!r}")
        diff = inputs.contiguous() - reconstructions.contiguous()
        rec_loss = torch.abs(diff) if self.pixel_loss_type == "l1" else torch.pow(diff, 2)
        if self.perceptual_weight > 0:
            p_loss = self._perceptual(inputs, reconstructions)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.tensor([0.0])
        nll_loss = torch.mean(rec_loss)

        g_loss = -torch.mean(self._generator_logits(reconstructions, cond))
        d_weight = self._adaptive_or_zero(nll_loss, g_loss, last_layer)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        if predicted_indices is not None and self.n_classes is not None:
            with torch.no_grad():
                perplexity, cluster_use = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_use
        return loss, log


class DummyLoss(nn.Module):
    """An empty module (upstream ``contperceptual.DummyLoss``): no parameters, no state_dict keys."""

"""First-stage autoencoders of latent diffusion (Rombach et al., CVPR 2022, Sec. 3.1 and App. G): the convolutional
encoder/decoder of VQGAN (Esser et al. 2021) with a KL-regularised (``AutoencoderKL``) or vector-quantised
(``VQModel``) bottleneck.

Module names follow upstream ``ldm.modules.diffusionmodules.model`` and ``ldm.models.autoencoder`` so that
state_dict keys equal the published checkpoints' (``encoder.down.0.block.0.norm1.weight``, ``quantize.embedding.weight``,
...). The arithmetic follows upstream too: GroupNorm(32, eps=1e-6), swish as ``x * sigmoid(x)``, nearest x2
upsampling, stride-2 downsampling after an asymmetric (0, 1, 0, 1) zero pad.

Upstream constructor keywords that are training or I/O concerns are accepted so an upstream YAML's ``params`` can be
passed through: ``image_key``, ``monitor``, ``scheduler_config``, ``lr_g_factor`` and ``batch_resize_range`` are kept
as plain attributes for a trainer; ``ckpt_path`` and ``ignore_keys`` are ignored (loading checkpoints is
``load_model``'s job, and an LDM checkpoint already holds its first stage). The loss is passed in built (``loss=``),
not as ``lossconfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldmcli.models.distributions import DiagonalGaussianDistribution
from ldmcli.models.quantize import VectorQuantizer

ATTN_TYPES = ("vanilla", "linear", "none")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, computed as upstream does (``x * sigmoid(x)``)."""
    return x * torch.sigmoid(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 (upstream's name)
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after a (0, 1, 0, 1) zero pad, or 2x2 average pooling without conv."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with a residual; a 1x1 (``nin_shortcut``) or 3x3 (``conv_shortcut``) projection when
    the channel count changes; an optional timestep embedding added after the first conv."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + rearrange(self.temb_proj(nonlinearity(temb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection, plus a residual.

    Uses ``F.scaled_dot_product_attention`` (softmax(q k^T / sqrt(c)) v), equal to upstream's explicit
    bmm-softmax-bmm to float tolerance and memory-efficient at large resolutions.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        _, _, height, width = x.shape
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (self.q(h_), self.k(h_), self.v(h_)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(out)


class LinAttnBlock(nn.Module):
    """Linear attention (Shen et al. 2021) with one head of ``in_channels`` dims, as upstream's ``attn_type:
    linear``: no normalisation and no residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.heads = 1
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, 1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        q, k, v = rearrange(
            self.to_qkv(x), "b (qkv heads c) h w -> qkv b heads c (h w)", heads=self.heads, qkv=3
        )
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        out = rearrange(out, "b heads c (h w) -> b (heads c) h w", heads=self.heads, h=height, w=width)
        return self.to_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"unknown attn_type {attn_type!r} (expected one of {', '.join(ATTN_TYPES)})")


def _attn_type(attn_type: str, use_linear_attn: bool) -> str:
    attn_type = "linear" if use_linear_attn else attn_type
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"unknown attn_type {attn_type!r} (expected one of {', '.join(ATTN_TYPES)})")
    return attn_type


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, ``len(ch_mult)`` levels of ResnetBlocks (attention at
    ``attn_resolutions``) with downsampling between levels, a middle block (resnet, attention, resnet), then
    norm-swish-conv to ``2 * z_channels`` channels (``double_z``) or ``z_channels``."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        give_pre_end: bool = False,  # a Decoder option: the shared ddconfig reaches both
        tanh_out: bool = False,  # a Decoder option
    ) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h, None)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_1(h, None)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, None)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: the mirror of :class:`Encoder` with ``num_res_blocks + 1`` blocks per level and nearest
    upsampling; ``give_pre_end`` returns the features before the output head, ``tanh_out`` squashes the output."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        double_z: bool = True,  # an Encoder option: the shared ddconfig reaches both
    ) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)

        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            ups.insert(0, up)  # index by level, lowest resolution last, as upstream
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_1(h, None)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, None)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, None)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        if self.tanh_out:
            h = torch.tanh(h)
        return h


class _FirstStage(nn.Module):
    """What AutoencoderKL and VQModel share: encoder, decoder, optional loss, upstream's bookkeeping keywords."""

    def _init_common(
        self,
        ddconfig: dict[str, Any],
        loss: nn.Module | None,
        image_key: str,
        colorize_nlabels: int | None,
        monitor: str | None,
    ) -> None:
        self.image_key = image_key
        self.monitor = monitor
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        # registered right after the decoder so its ``loss.*`` keys sit where upstream's do
        self.loss = loss
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int) or isinstance(colorize_nlabels, bool):
                raise ValueError(f"colorize_nlabels must be an integer, not {colorize_nlabels!r}")
            # a random projection of segmentation maps to RGB for image logs (upstream ``to_rgb``)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, for the adaptive GAN weight of the training losses."""
        return self.decoder.conv_out.weight

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a many-channel map (segmentation) to 3 channels in [-1, 1] with the ``colorize`` buffer."""
        if not hasattr(self, "colorize"):
            raise ValueError("to_rgb needs the model to be built with colorize_nlabels")
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder ("LDM-KL-f"): the encoder's ``2 * z_channels`` moments go through
    ``quant_conv`` to a diagonal Gaussian over ``embed_dim`` channels; ``post_quant_conv`` maps latents back."""

    def __init__(
        self,
        ddconfig: dict[str, Any],
        embed_dim: int,
        loss: nn.Module | None = None,
        *,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and logvar)")
        self._init_common(ddconfig, loss, image_key, colorize_nlabels, monitor)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(_FirstStage):
    """Vector-quantised autoencoder ("LDM-VQ-f", VQGAN): ``quant_conv`` to ``embed_dim`` channels, nearest of
    ``n_embed`` codes (beta 0.25, legacy loss placement), ``post_quant_conv`` back to ``z_channels``."""

    def __init__(
        self,
        ddconfig: dict[str, Any],
        n_embed: int,
        embed_dim: int,
        loss: nn.Module | None = None,
        *,
        remap: Any = None,
        sane_index_shape: bool = False,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: Sequence[int] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        use_ema: bool = False,
    ) -> None:
        super().__init__()
        if use_ema:
            raise ValueError("VQModel use_ema: true is not supported (no published first stage uses it)")
        self._init_common(ddconfig, loss, image_key, colorize_nlabels, monitor)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap,
                                        sane_index_shape=sane_index_shape)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.batch_resize_range = batch_resize_range
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """Returns ``(quant, codebook_loss, (None, None, indices))``."""
        return self.quantize(self.encode_to_prequant(x))

    def _decode_quant(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self._decode_quant(quant)

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Decode codebook indices of shape (b, h, w)."""
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self._decode_quant(quant)

    def forward(
        self, input: torch.Tensor, return_pred_indices: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quant, diff, (_, _, ind) = self.quantize(self.encode_to_prequant(input))
        dec = self._decode_quant(quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff


class VQModelInterface(VQModel):
    """The VQ first stage as an LDM uses it: ``encode`` stops before quantisation (the diffusion model works on the
    continuous pre-quantisation latent) and ``decode`` quantises first unless ``force_not_quantize``."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:  # type: ignore[override]
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self._decode_quant(quant)

"""The LDM denoising UNet (Rombach et al. 2022), after the ADM UNet of Dhariwal & Nichol 2021 ("guided diffusion").

Module tree and parameter names equal upstream ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` so the
published checkpoints load unchanged (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``, ``time_embed.0``,
``out.2``...). Arithmetic follows upstream: GroupNorm32 normalises in float32, the sinusoidal timestep embedding is
[cos, sin], attention softmaxes with the same scale. Differences that do not change float32 results: attention uses
``F.scaled_dot_product_attention``, gradient checkpointing is only used while training, and feature maps keep the
memory format of the input (so ``channels_last`` stays ``channels_last``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ldmcli.models.attention import SpatialTransformer, zero_module


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017), ``[cos(t f), sin(t f)]`` with f = max_period^(-i/half).

    ``timesteps`` is a 1-D tensor of (possibly fractional) steps; returns float32 ``[N, dim]`` (zero-padded when odd).
    ``repeat_only`` (upstream's option) repeats the raw steps instead.
    """
    if repeat_only:
        return repeat(timesteps, "b -> b d", d=dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=timesteps.device
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in float32 and casts back to the input's dtype (upstream ``GroupNorm32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: 32 groups, eps 1e-5."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (3-D: inner two dims only)."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution, or by average pooling when ``use_conv`` is False."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added, or FiLM scale/shift with
    ``use_scale_shift_norm``); optionally changes channels or resamples (``up``/``down``, BigGAN style)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """QKV attention over ``[N, heads*3*C, T]`` (heads split before q/k/v, the original ADM layout)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(qkv, "b (h three c) t -> three b h t c", h=self.n_heads, three=3)
        out = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
        return rearrange(out, "b h t c -> b (h c) t")


class QKVAttention(nn.Module):
    """QKV attention over ``[N, 3*heads*C, T]`` (q/k/v split before heads; ``use_new_attention_order``)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(qkv, "b (three h c) t -> three b h t c", h=self.n_heads, three=3)
        out = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
        return rearrange(out, "b h t c -> b (h c) t")


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions (ADM), with a 1-D conv for qkv and a zero-initialised output."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        out = (x + h).reshape(b, c, *spatial)
        return out.contiguous(memory_format=memory_format) if out.dim() == 4 else out


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class UNetModel(nn.Module):
    """The LDM UNet: ResBlocks with timestep embedding, self-attention or cross-attention SpatialTransformers at the
    ``attention_resolutions`` (downsampling rates), optional class embedding ``y`` (``num_classes``).

    Keyword names are upstream's. ``use_checkpoint`` enables gradient checkpointing while training only;
    ``use_fp16`` is accepted and ignored (cast the module to choose a precision).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the cross-attention conditioning width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is given but use_spatial_transformer is off")
        if isinstance(context_dim, (list, tuple)) and len(context_dim) == 1:
            context_dim = context_dim[0]
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.context_dim = context_dim
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def resblock(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attention(ch: int, heads: int, dim_head: int, heads_for_block: int) -> nn.Module:
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim, use_checkpoint=use_checkpoint
                )
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=heads_for_block,
                num_head_channels=dim_head,
                use_new_attention_order=use_new_attention_order,
            )

        def head_layout(ch: int, heads: int) -> tuple[int, int]:
            # Upstream's rules (as of a506df5), including the mutation of num_heads when num_head_channels is
            # set. The initial upstream release also forced num_heads = 1 under ``legacy``; a506df5 has that line
            # commented out, so legacy only changes dim_head. Shapes are the same either way, numbers are not.
            if num_head_channels == -1:
                dim_head = ch // heads
            else:
                heads = ch // num_head_channels
                dim_head = num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            return heads, dim_head

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    num_heads, dim_head = head_layout(ch, num_heads)
                    layers.append(attention(ch, num_heads, dim_head, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                down = (
                    resblock(ch, out_ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2

        num_heads, dim_head = head_layout(ch, num_heads)
        self.middle_block = TimestepEmbedSequential(
            resblock(ch),
            attention(ch, num_heads, dim_head, num_heads),
            resblock(ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    num_heads, dim_head = head_layout(ch, num_heads)
                    layers.append(attention(ch, num_heads, dim_head, num_heads_upsample))
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        resblock(ch, out_ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch),
                conv_nd(dims, model_channels, n_embed, 1),
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise (or x0) for ``x`` at ``timesteps``; ``context`` feeds cross-attention, ``y`` labels."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional")
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        if self.predict_codebook_ids:
            return self.id_predictor(h)
        return self.out(h)

"""Cross-attention transformer blocks of the LDM UNet (Rombach et al. 2022, sec. 3.3; Vaswani et al. 2017).

Module and parameter names follow the upstream ``ldm.modules.attention`` so checkpoints load unchanged. Attention
runs through ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU); the arithmetic is upstream's
``softmax(q k^T * dim_head^-0.5) v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (the output projections start at zero, as upstream) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def preferred_memory_format(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` when ``x`` is laid out that way (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): ``x * gelu(gate)`` from one linear layer of twice the width."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP; ``glu=True`` (the LDM default) uses GEGLU. Keys ``net.0.proj``, ``net.2``."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context`` (self-attention when ``context`` is None)."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)
        attn_mask = None
        if mask is not None:
            # True = may attend (upstream fills the others with -max before the softmax)
            attn_mask = repeat(rearrange(mask, "b ... -> b (...)").bool(), "b m -> b h n m", h=1, n=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over the context, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        # Gradient checkpointing only while training with gradients; never a wrapper at inference.
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: GroupNorm, 1x1 conv in, blocks on (h w) tokens, 1x1 conv out.

    The output keeps the input's memory format (upstream's token->image rearrange leaves a channels_last-strided
    tensor behind a contiguous input, which makes the following convolutions re-layout their weights every call).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, checkpoint=use_checkpoint
                )
                for _ in range(depth)
            ]
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        memory_format = preferred_memory_format(x)
        _, _, height, width = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = rearrange(x, "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = rearrange(x, "b (h w) c -> b c h w", h=height, w=width).contiguous(memory_format=memory_format)
        return self.proj_out(x) + x_in

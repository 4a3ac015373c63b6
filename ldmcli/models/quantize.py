"""Vector quantisation bottleneck of VQ-VAE / VQGAN (van den Oord et al. 2017; Esser et al. 2021), with the
behaviour of taming-transformers' ``VectorQuantizer2``: nearest codebook entry by squared distance,
straight-through gradients, optional remapping of indices to a subset of "used" codes."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ldmcli.errors import UsageError

UnknownIndex = str | int


def _load_used(remap: str | os.PathLike | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(remap, torch.Tensor):
        return remap.detach().clone()
    if isinstance(remap, (str, os.PathLike)):
        try:
            array = np.load(os.fspath(remap), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the codebook remap file {os.fspath(remap)!r}: {e}") from e
        return torch.tensor(array)
    return torch.tensor(np.asarray(remap))


class VectorQuantizer(nn.Module):
    """Maps each ``e_dim`` vector of ``z`` to its nearest of ``n_e`` codebook vectors (``embedding.weight``).

    ``legacy=True`` (the default, as in every published checkpoint) weights the terms of the codebook loss as
    taming did: ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``; ``legacy=False`` swaps the beta.
    ``remap`` (a ``.npy`` path or an index array) restricts indices to the listed "used" codes, registered as the
    buffer ``used``; codes outside it become ``unknown_index`` ("random", "extra" or an int).
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: str | os.PathLike | Sequence[int] | np.ndarray | torch.Tensor | None = None,
        unknown_index: UnknownIndex = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", _load_used(remap))
            self.re_embed = int(self.used.shape[0])
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an integer, not {unknown_index!r}")
            self.unknown_index: UnknownIndex = unknown_index
        else:
            self.re_embed = n_e
            self.unknown_index = unknown_index
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Full codebook indices (batch first) -> positions in ``used``; unknown codes -> ``unknown_index``."""
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            device = generator.device if generator is not None else new.device
            draws = torch.randint(0, self.re_embed, size=new[unknown].shape, generator=generator, device=device)
            new[unknown] = draws.to(new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` (batch first) -> full codebook indices; the "extra" index maps to ``used[0]``."""
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1).clone()
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # the "extra" token
            inds[inds >= self.used.shape[0]] = 0
        back = torch.gather(used[None, :].expand(inds.shape[0], -1), 1, inds)
        return back.reshape(ishape)

    def forward(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """Quantise ``z`` (b, c, h, w). Returns ``(z_q, codebook_loss, (None, None, indices))`` as taming does;
        indices are flat (b*h*w,), (b*h*w, 1) with a remap, or (b, h, w) with ``sane_index_shape``."""
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        z_flattened = z.view(-1, self.e_dim)
        # squared distances (z - e)^2 = z^2 + e^2 - 2 z.e, in upstream's order of operations
        d = (
            torch.sum(z_flattened**2, dim=1, keepdim=True)
            + torch.sum(self.embedding.weight**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flattened, rearrange(self.embedding.weight, "n d -> d n"))
        )
        min_encoding_indices = torch.argmin(d, dim=1)
        z_q = self.embedding(min_encoding_indices).view(z.shape)

        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)

        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = rearrange(z_q, "b h w c -> b c h w").contiguous()

        if self.remap is not None:
            min_encoding_indices = min_encoding_indices.reshape(z.shape[0], -1)
            min_encoding_indices = self.remap_to_used(min_encoding_indices, generator=generator)
            min_encoding_indices = min_encoding_indices.reshape(-1, 1)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
        """Codebook vectors for ``indices``; with ``shape`` = (b, h, w, c) returned as (b, c, h, w)."""
        if self.remap is not None:
            assert shape is not None, "remapped indices need the (b, h, w, c) shape to unmap per batch item"
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = rearrange(z_q.view(*shape), "b h w c -> b c h w").contiguous()
        return z_q


VectorQuantizer2 = VectorQuantizer

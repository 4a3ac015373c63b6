"""The conditioning of the Retrieval-Augmented Diffusion Model (Blattmann et al. 2022), as upstream's
``scripts/knn2img.py`` builds it: the unit-norm CLIP embedding of the query (a prompt's text embedding, or beyond
upstream an image's), optionally followed by the unit-norm embeddings of its k nearest neighbours in a database, as
a cross-attention context ``[B, 1 + k, D]``; the unconditional input for classifier-free guidance is zeros."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ldmcli.errors import UsageError
from ldmcli.retrieval.searcher import Neighbours, Retriever

MAX_KNN = 20


@dataclass
class RdmConditioning:
    """``cond`` ``[B, 1 + k, D]``; ``uncond`` zeros of that shape (None when ``scale == 1``, as upstream);
    ``neighbours`` the retrieval result when neighbours were used."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    neighbours: Neighbours | None = None


def rdm_conditioning(query: torch.Tensor, *, retriever: Retriever | None = None, knn: int = 0,
                     scale: float = 1.0) -> RdmConditioning:
    """Context for the RDM from unit-norm query embeddings ``[B, D]``: the query itself, then (with a
    ``retriever``) its ``knn`` nearest neighbours' embeddings, normalised as upstream's searcher returns them."""
    if query.ndim != 2:
        raise ValueError(f"expected query embeddings [B, D], got {list(query.shape)}")
    c = query[:, None, :]
    neighbours = None
    if retriever is not None:
        if not 1 <= knn <= MAX_KNN:
            raise UsageError(f"--knn must be between 1 and {MAX_KNN}, got {knn}")
        neighbours = retriever.search(c, knn)
        nn_embeddings = torch.from_numpy(np.ascontiguousarray(neighbours.embeddings)).to(c.device, c.dtype)
        c = torch.cat([c, nn_embeddings], dim=1)
    uncond = torch.zeros_like(c) if scale != 1.0 else None
    return RdmConditioning(c, uncond, neighbours)


class RdmConditioner:
    """The conditioner of an ``ldm knn2img`` run for :func:`ldmcli.pipelines.generation.generate`: each job's items are prompts
    (CLIP text embeddings) or image files (CLIP image embeddings); each distinct item is encoded, and searched for
    neighbours, once per run. ``neighbours_of(item)`` gives the neighbours' ``img_id`` for the image records."""

    def __init__(self, clip, *, scale: float, retriever: Retriever | None = None, knn: int = 0,
                 images: dict[str, torch.Tensor] | None = None) -> None:
        self.clip = clip
        self.scale = scale
        self.retriever = retriever
        self.knn = knn
        self.images = images or {}
        self.cache: dict[str, tuple[torch.Tensor, list[str] | None]] = {}

    def _encode(self, items: list[str]) -> None:
        missing = list(dict.fromkeys(i for i in items if i not in self.cache))
        if not missing:
            return
        texts = [i for i in missing if i not in self.images]
        pictures = [i for i in missing if i in self.images]
        rows: dict[str, torch.Tensor] = {}
        if texts:
            rows.update(zip(texts, self.clip.encode_text(texts)))
        for item in pictures:
            rows[item] = self.clip.encode_image(self.images[item][None])[0]
        query = torch.stack([rows[i] for i in missing])
        out = rdm_conditioning(query, retriever=self.retriever, knn=self.knn, scale=1.0)
        ids = out.neighbours.img_ids if out.neighbours is not None else None
        for j, item in enumerate(missing):
            self.cache[item] = (out.cond[j], [str(v) for v in ids[j].tolist()] if ids is not None else None)

    def neighbours_of(self, item: str) -> list[str] | None:
        return self.cache[item][1] if item in self.cache else None

    def __call__(self, job) -> tuple[torch.Tensor, torch.Tensor | None]:
        items = list(job.items)
        self._encode(items)
        cond = torch.stack([self.cache[i][0] for i in items])
        return cond, (torch.zeros_like(cond) if self.scale != 1.0 else None)

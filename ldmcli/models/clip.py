"""CLIP ViT-L/14 text and image encoders (Radford et al. 2021), the retrieval space of the Retrieval-Augmented
Diffusion Models (Blattmann et al. 2022, "Semi-Parametric Neural Image Synthesis").

The weights are OpenAI's, in the ``transformers`` layout (``CLIPModel``), read from a local folder: the data store's
``clip-vit-large-patch14`` asset, or any folder written by ``save_pretrained`` (tests use a tiny random one).

Both embeddings are L2-normalised as upstream's ``FrozenCLIPTextEmbedder`` does for text: the projected pooled
output at the end-of-text token, i.e. OpenAI's ``encode_text``; for images the projected CLS output, OpenAI's
``encode_image``. Images are prepared as upstream's ``FrozenClipImageEmbedder.preprocess``: a kornia bicubic resize
(``align_corners=True``) to the model's input size, ``(x + 1) / 2``, then CLIP's mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ldmcli.errors import LdmError, UsageError

#: The store's name for OpenAI's CLIP ViT-L/14 in the transformers layout.
CLIP_ASSET = "clip-vit-large-patch14"
#: OpenAI CLIP's image normalisation (the constants of upstream's FrozenClipImageEmbedder).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: OpenAI CLIP's context length.
CONTEXT_LENGTH = 77


def resolve_clip_dir(path: str | os.PathLike | None = None) -> Path:
    """An explicit folder, else the CLIP ViT-L/14 asset in the data dir (the pipelines download it through the store
    first; the networks never download)."""
    if path is None:
        from ldmcli import paths

        path = paths.data_dir() / "assets" / CLIP_ASSET
    folder = Path(path)
    if not (folder / "config.json").is_file():
        hint = f" (run 'ldm download {CLIP_ASSET}')" if Path(folder).name == CLIP_ASSET else ""
        raise LdmError(f"no CLIP model at {folder} (expected a transformers folder with config.json){hint}")
    return folder


class ClipEncoder(nn.Module):
    """Frozen CLIP text and image encoders giving unit-norm embeddings of ``dim`` (768 for ViT-L/14)."""

    def __init__(self, model: nn.Module, tokenizer, *, antialias: bool = True) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.antialias = bool(antialias)
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = min(CONTEXT_LENGTH, int(model.config.text_config.max_position_embeddings))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
                        antialias: bool = True) -> "ClipEncoder":
        """Load ``CLIPModel`` and ``CLIPTokenizer`` from a local folder (default: the store's ViT-L/14), in float32."""
        from transformers import CLIPModel, CLIPTokenizer  # heavy import, only when CLIP is needed

        folder = resolve_clip_dir(path)
        try:
            model = CLIPModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise LdmError(f"cannot load the CLIP model from {folder}: {str(e).splitlines()[0]}") from None
        if len(tokenizer) <= 3:  # transformers builds an empty BPE when vocab.json/merges.txt are missing
            raise LdmError(f"the CLIP tokenizer files are missing in {folder} (vocab.json and merges.txt, or "
                           f"tokenizer.json)")
        return cls(model, tokenizer, antialias=antialias).to(device)

    @property
    def dim(self) -> int:
        """Width of the joint embedding space (the projection dimension)."""
        return int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, 77]``: ``<|startoftext|> ... <|endoftext|>``, truncated to fit
        (the end-of-text token is kept), padded after the end-of-text token, which the causal mask makes inert."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, dim]`` (OpenAI's ``encode_text`` divided by its L2 norm)."""
        ids, mask = self.tokenize(texts)
        z = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        return z / torch.linalg.norm(z, dim=1, keepdim=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] to CLIP's input: bicubic resize to the model's size, to [0, 1], then
        CLIP's mean and std (upstream FrozenClipImageEmbedder.preprocess)."""
        import kornia

        x = kornia.geometry.resize(images, (self.image_size, self.image_size), interpolation="bicubic",
                                   align_corners=True, antialias=self.antialias)
        x = (x + 1.0) / 2.0
        return kornia.enhance.normalize(x, self.mean, self.std)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, dim]`` of images ``[B, 3, H, W]`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        x = self.preprocess(images.to(self.device, torch.float32))
        z = self.model.get_image_features(pixel_values=x).pooler_output
        return z / torch.linalg.norm(z, dim=1, keepdim=True)

    @torch.no_grad()
    def encode_image_list(self, images: Sequence[torch.Tensor], *, batch_size: int = 16,
                          callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Embed images of different sizes (each ``[3, H, W]`` in [-1, 1]): each is resized on its own, then the
        model runs in batches of ``batch_size``. ``callback(done, total)`` after each batch."""
        out = []
        total = len(images)
        for start in range(0, total, batch_size):
            batch = [self.preprocess(img[None].to(self.device, torch.float32)) for img in images[start:start + batch_size]]
            z = self.model.get_image_features(pixel_values=torch.cat(batch)).pooler_output
            out.append(z / torch.linalg.norm(z, dim=1, keepdim=True))
            if callback is not None:
                callback(min(start + batch_size, total), total)
        if not out:
            return torch.empty(0, self.dim, device=self.device)
        return torch.cat(out)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a float tensor ``[3, H, W]`` in [-1, 1] (RGB), read by :func:`ldmcli.images.read_rgb` (16-bit
    and float images scaled, transparency over white); unreadable files and pixel formats that cannot be converted
    faithfully raise a one-line UsageError naming the file."""
    from einops import rearrange

    from ldmcli.images import ImageReadError, read_rgb

    try:
        arr = read_rgb(path).astype("float32")
    except ImageReadError as e:
        raise UsageError(str(e)) from None
    return torch.from_numpy(rearrange(arr, "h w c -> c h w").copy()) / 127.5 - 1.0

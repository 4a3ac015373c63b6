"""Conditioners of the latent diffusion models (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3.3): the BERT-tokenised transformer text encoder, the class embedder, the spatial rescaler of
the semantic-synthesis models, and the identity.

Module names follow the upstream checkpoints so their ``cond_stage_model.*`` keys load unchanged. ``BERTEmbedder``
is a pre-norm transformer encoder laid out key for key like the x-transformers ``TransformerWrapper(Encoder)`` the
upstream code used (always 8 heads of 64 dimensions, whatever the width), including its ``to_logits`` projection that
the forward pass never uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldmcli.errors import LdmError

#: x-transformers' defaults, which every upstream BERTEmbedder used.
BERT_HEADS = 8
BERT_DIM_HEAD = 64
BERT_VOCAB_SIZE = 30522
BERT_ASSET = "bert-base-uncased"

Text = str | Sequence[str]


# --------------------------------------------------------------------------------------------------------- tokenizer


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """A WordPiece vocab file (one token per line, the line number is its id) as a token → id dict."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            token = line.rstrip("\n").rstrip("\r")
            vocab.setdefault(token, index)
    if not vocab:
        raise LdmError(f"the BERT vocab file {path} is empty")
    return vocab


def _resolve_vocab(vocab_path: str | os.PathLike | None) -> Path:
    """An explicit vocab path (a file, or a folder holding ``vocab.txt``), else bert-base-uncased in the data dir
    (:func:`ldmcli.loading.load` downloads it before building a text model; the networks never download)."""
    if vocab_path is None:
        from ldmcli import paths

        vocab_path = paths.data_dir() / "assets" / BERT_ASSET
    path = Path(vocab_path)
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.is_file():
        raise LdmError(f"BERT vocab not found at {path} (run 'ldm download {BERT_ASSET}')")
    return path


class BERTTokenizer:
    """The bert-base-uncased WordPiece tokenizer (``transformers.BertTokenizerFast``) built from a local vocab file:
    lower-cased, accents stripped, ``[CLS] ... [SEP]`` padded with ``[PAD]`` (id 0) and truncated to ``max_length``."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, max_length: int = 77) -> None:
        from transformers import BertTokenizerFast  # heavy import, only when text is tokenised

        self.vocab_path = _resolve_vocab(vocab_path)
        self.max_length = int(max_length)
        # transformers 5 ignores ``vocab_file=``; the vocabulary must be passed as a dict.
        self.tokenizer = BertTokenizerFast(vocab=read_vocab(self.vocab_path), do_lower_case=True)

    def __call__(self, text: Text, device: torch.device | str | None = None) -> torch.Tensor:
        """Token ids ``[B, max_length]`` (int64) for one string or a list of strings."""
        if isinstance(text, str):
            text = [text]
        else:
            text = list(text)
            if not all(isinstance(t, str) for t in text):
                raise ValueError("text conditioning must be a string or a list of strings")
        encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                  return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        tokens = encoding["input_ids"]
        return tokens.to(device) if device is not None else tokens

    def encode(self, text: Text) -> torch.Tensor:
        return self(text)


# ------------------------------------------------------------------------------------ x-transformers encoder layout


class _AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions (key ``pos_emb.emb.weight``)."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None, :, :]


class _Attention(nn.Module):
    """Multi-head self-attention: ``to_q/to_k/to_v`` without bias, ``to_out`` with bias, scale ``dim_head ** -0.5``."""

    def __init__(self, dim: int, heads: int = BERT_HEADS, dim_head: int = BERT_DIM_HEAD, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.dropout = float(dropout)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class _FeedForward(nn.Module):
    """``Linear(dim, 4 dim) → GELU → Dropout → Linear(4 dim, dim)`` with x-transformers' key names (``net.0.0``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _EncoderLayers(nn.Module):
    """Pre-norm residual stack alternating attention and feed-forward blocks: ``layers.{2i}`` attention,
    ``layers.{2i+1}`` feed-forward, each ``[LayerNorm, block]`` (the parameter-free residual of x-transformers sits at
    index 2 and contributes no keys)."""

    def __init__(self, dim: int, depth: int, heads: int = BERT_HEADS, dim_head: int = BERT_DIM_HEAD) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _Attention(dim, heads, dim_head)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = block(norm(x)) + x
        return x


class _TransformerWrapper(nn.Module):
    """Token + absolute position embeddings, the encoder stack, a final LayerNorm and the (unused) ``to_logits``."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, emb_dropout: float = 0.0) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = _AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = _EncoderLayers(dim, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)  # kept only so checkpoints load key for key; never used

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, N, dim]`` (the ``return_embeddings=True`` path of x-transformers)."""
        x = self.token_emb(tokens)
        x = x + self.pos_emb(x)
        x = self.emb_dropout(x)
        x = self.attn_layers(x)
        return self.norm(x)


class BERTEmbedder(nn.Module):
    """Text (or token) conditioner of the text-to-image and layout-to-image LDMs: bert-base-uncased WordPiece tokens
    through a trainable pre-norm transformer encoder (``n_layer`` × [self-attention, feed-forward], width
    ``n_embed``, 8 heads of 64). ``encode(texts)`` returns ``[B, max_seq_len, n_embed]``; the unconditional prompt
    is ``""``. With ``use_tokenizer=False`` (layout2img) the inputs are token ids already."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = BERT_VOCAB_SIZE, max_seq_len: int = 77,
                 use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 vocab_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.use_tknz_fn = bool(use_tokenizer)
        self.max_seq_len = int(max_seq_len)
        self.vocab_path = vocab_path
        self._tokenizer: BERTTokenizer | None = None  # built on first use: building a model needs no vocab file
        self.transformer = _TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer, emb_dropout=embedding_dropout)

    @property
    def tokenizer(self) -> BERTTokenizer:
        if not self.use_tknz_fn:
            raise ValueError("this BERTEmbedder takes token ids, not text (use_tokenizer is false)")
        if self._tokenizer is None:
            self._tokenizer = BERTTokenizer(self.vocab_path, max_length=self.max_seq_len)
        return self._tokenizer

    def tokenize(self, text: Text) -> torch.Tensor:
        """Token ids ``[B, max_seq_len]`` on this module's device."""
        return self.tokenizer(text, device=self.transformer.token_emb.weight.device)

    def forward(self, text: Text | torch.Tensor) -> torch.Tensor:
        if self.use_tknz_fn:
            tokens = self.tokenize(text)  # type: ignore[arg-type]
        else:
            if not isinstance(text, torch.Tensor):
                raise ValueError("this BERTEmbedder takes a tensor of token ids (use_tokenizer is false)")
            tokens = text.to(self.transformer.token_emb.weight.device)
        if tokens.shape[-1] > self.max_seq_len:
            raise ValueError(f"{tokens.shape[-1]} tokens given, at most {self.max_seq_len} fit this text encoder")
        return self.transformer(tokens)

    def encode(self, text: Text | torch.Tensor) -> torch.Tensor:
        return self(text)


# ------------------------------------------------------------------------------------------------ other conditioners


class ClassEmbedder(nn.Module):
    """Class-label conditioner (cin256: 1000 ImageNet classes; cin256-v2: 1001, class 1000 being the null label for
    classifier-free guidance). Takes the batch dict (``batch[key]``, as upstream) or the label tensor itself and
    returns ``[B, 1, embed_dim]`` for cross-attention."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class") -> None:
        super().__init__()
        self.key = key
        self.n_classes = int(n_classes)
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor, key: str | None = None) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            labels = batch
        else:
            key = self.key if key is None else key
            if key not in batch:
                raise ValueError(f"class conditioning needs the key {key!r}")
            labels = batch[key]
        labels = torch.as_tensor(labels, device=self.embedding.weight.device)
        if labels.is_floating_point() or labels.ndim != 1:
            raise ValueError("class labels must be a 1-D integer tensor")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"class labels must lie in [0, {self.n_classes - 1}]")
        return self.embedding(labels[:, None])


_INTERPOLATION_MODES = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """Resizes a spatial conditioning map ``n_stages`` times by ``multiplier`` and, with ``out_channels``, maps its
    channels through a 1×1 convolution (semantic synthesis: 182 one-hot classes → 3 channels, ``channel_mapper``)."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError("SpatialRescaler n_stages must be >= 0")
        if method not in _INTERPOLATION_MODES:
            raise ValueError(f"SpatialRescaler method must be one of {', '.join(_INTERPOLATION_MODES)}, not {method!r}")
        self.n_stages = int(n_stages)
        self.method = method
        self.multiplier = float(multiplier)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class IdentityEncoder(nn.Identity):
    """Passes the conditioning through unchanged (bsr_sr's low-resolution image, the RDM's CLIP embeddings)."""

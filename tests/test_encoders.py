"""Conditioners: the bert-base-uncased tokenizer on the real vocab, the x-transformers-compatible BERTEmbedder,
the class embedder and the spatial rescaler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import BERT_VOCAB
from ldmcli import config
from ldmcli.errors import LdmError, UsageError
from ldmcli.models.encoders import BERTEmbedder, BERTTokenizer, ClassEmbedder, IdentityEncoder, SpatialRescaler

# bert-base-uncased ids: [CLS]=101, [SEP]=102, [PAD]=0
ASTRONAUT = [101, 1037, 6302, 1997, 2019, 19748, 5559, 1037, 3586, 102]


@pytest.fixture(scope="module")
def tokenizer() -> BERTTokenizer:
    return BERTTokenizer(BERT_VOCAB)


def test_tokenizer_known_ids(tokenizer):
    tokens = tokenizer(["a photo of an astronaut riding a horse", ""])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int64
    assert tokens[0, :10].tolist() == ASTRONAUT and tokens[0, 10:].eq(0).all()
    assert tokens[1, :2].tolist() == [101, 102] and tokens[1, 2:].eq(0).all()  # the unconditional prompt


def test_tokenizer_lowercases_strips_accents_and_truncates(tokenizer):
    assert torch.equal(tokenizer("A PHOTO of an Astronaut riding a horse"), tokenizer(["a photo of an astronaut "
                                                                                       "riding a horse"]))
    assert tokenizer("Café!")[0, :4].tolist() == [101, 7668, 999, 102]
    long = tokenizer(" ".join(["horse"] * 200))
    assert long.shape == (1, 77) and long[0, 0] == 101 and long[0, -1] == 102 and long[0, 1:-1].eq(3586).all()
    assert BERTTokenizer(BERT_VOCAB, max_length=92)("x").shape == (1, 92)


def test_tokenizer_vocab_sources(tmp_path, monkeypatch):
    folder = tmp_path / "bert-base-uncased"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(BERT_VOCAB.read_bytes())
    assert BERTTokenizer(folder)("a")[0, :3].tolist() == [101, 1037, 102]
    with pytest.raises(LdmError, match="BERT vocab not found"):
        BERTTokenizer(tmp_path / "missing")

    # the default: bert-base-uncased in the data dir (ldmcli.loading.load downloads it first; the network never does)
    from ldmcli import paths

    embedder = BERTEmbedder(n_embed=16, n_layer=1)
    with pytest.raises(LdmError, match="ldm download bert-base-uncased"):
        embedder.tokenize("a")
    installed = paths.data_dir() / "assets" / "bert-base-uncased"
    installed.mkdir(parents=True)
    (installed / "vocab.txt").write_bytes(BERT_VOCAB.read_bytes())
    embedder = BERTEmbedder(n_embed=16, n_layer=1)
    assert embedder.tokenize("a").shape == (1, 77)
    with pytest.raises(ValueError, match="string or a list of strings"):
        embedder.tokenize([1, 2])


def _reference_forward(m: BERTEmbedder, tokens: torch.Tensor) -> torch.Tensor:
    """x-transformers' TransformerWrapper(Encoder) arithmetic spelled out: embeddings + absolute positions,
    pre-norm residual blocks, einsum attention scaled by dim_head ** -0.5, GELU feed-forward, final LayerNorm."""
    t = m.transformer
    x = t.token_emb(tokens) + t.pos_emb.emb(torch.arange(tokens.shape[1]))[None]
    for norm, block in t.attn_layers.layers:
        h = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, 1e-5)
        if hasattr(block, "to_q"):
            b, n, _ = h.shape
            q, k, v = (lin(h).reshape(b, n, 8, 64).transpose(1, 2) for lin in (block.to_q, block.to_k, block.to_v))
            attn = (torch.einsum("bhid,bhjd->bhij", q, k) * 64 ** -0.5).softmax(dim=-1)
            out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, 512)
            x = block.to_out(out) + x
        else:
            lin1, lin2 = block.net[0][0], block.net[2]
            x = lin2(F.gelu(lin1(h))) + x
    return t.norm(x)


def test_bert_embedder_matches_reference_arithmetic():
    torch.manual_seed(0)
    m = BERTEmbedder(n_embed=96, n_layer=2, vocab_size=100, max_seq_len=20, use_tokenizer=False).eval()
    # 8 heads of 64 whatever the width: the attention projections are 96 -> 512
    assert m.transformer.attn_layers.layers[0][1].to_q.weight.shape == (512, 96)
    for p in m.parameters():  # LayerNorms start at 1/0: randomise everything so the test sees every weight
        torch.nn.init.normal_(p, std=0.2)
    tokens = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        out = m.encode(tokens)
        ref = _reference_forward(m, tokens)
    assert out.shape == (3, 20, 96)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # to_logits only exists so checkpoints load: it never touches the output
        m.transformer.to_logits.weight.add_(1.0)
        torch.testing.assert_close(m.encode(tokens), out)


def test_bert_embedder_text_and_errors():
    m = BERTEmbedder(n_embed=32, n_layer=1, vocab_path=BERT_VOCAB)
    assert m.encode(["a photo of a cat", ""]).shape == (2, 77, 32)
    assert m.encode("one prompt").shape == (1, 77, 32)
    tokens_only = BERTEmbedder(n_embed=32, n_layer=1, vocab_size=50, max_seq_len=8, use_tokenizer=False)
    with pytest.raises(ValueError, match="token ids"):
        tokens_only.encode("text")
    with pytest.raises(ValueError, match="at most 8"):
        tokens_only.encode(torch.zeros(1, 9, dtype=torch.long))


def test_bert_keys_follow_x_transformers():
    keys = list(BERTEmbedder(n_embed=16, n_layer=1, vocab_size=10, max_seq_len=4).state_dict())
    assert keys == [
        "transformer.token_emb.weight", "transformer.pos_emb.emb.weight",
        "transformer.attn_layers.layers.0.0.weight", "transformer.attn_layers.layers.0.0.bias",
        "transformer.attn_layers.layers.0.1.to_q.weight", "transformer.attn_layers.layers.0.1.to_k.weight",
        "transformer.attn_layers.layers.0.1.to_v.weight", "transformer.attn_layers.layers.0.1.to_out.weight",
        "transformer.attn_layers.layers.0.1.to_out.bias",
        "transformer.attn_layers.layers.1.0.weight", "transformer.attn_layers.layers.1.0.bias",
        "transformer.attn_layers.layers.1.1.net.0.0.weight", "transformer.attn_layers.layers.1.1.net.0.0.bias",
        "transformer.attn_layers.layers.1.1.net.2.weight", "transformer.attn_layers.layers.1.1.net.2.bias",
        "transformer.norm.weight", "transformer.norm.bias", "transformer.to_logits.weight",
        "transformer.to_logits.bias"]


def test_class_embedder():
    m = ClassEmbedder(embed_dim=8, n_classes=1001, key="class_label")
    labels = torch.tensor([0, 1000, 5])
    out = m({"class_label": labels})
    assert out.shape == (3, 1, 8)
    torch.testing.assert_close(out[:, 0], m.embedding.weight[labels])
    torch.testing.assert_close(m(labels), out)
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        m(torch.tensor([1001]))
    with pytest.raises(ValueError, match="class_label"):
        m({"class": labels})


def test_spatial_rescaler():
    torch.manual_seed(0)
    m = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3)
    assert [k for k in m.state_dict()] == ["channel_mapper.weight"]
    x = torch.randn(2, 182, 64, 48)
    out = m.encode(x)
    assert out.shape == (2, 3, 16, 12)
    half = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    torch.testing.assert_close(out, F.conv2d(half, m.channel_mapper.weight))
    assert SpatialRescaler(n_stages=1, method="nearest")(x).shape == (2, 182, 32, 24)
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="lanczos")


def test_identity_conditioner_has_no_keys():
    x = torch.randn(2, 3, 768)
    m = IdentityEncoder()
    assert m(x) is x and not m.state_dict()


def test_built_ldm_conditions_on_text():
    """The conditioner reached through a built LDM: get_learned_conditioning of prompts → [B, 77, n_embed]."""
    doc = {"ldmcli_config": 1, "kind": "ldm",
           "first_stage": {"type": "kl", "embed_dim": 4, "ddconfig": {
               "ch": 32, "out_ch": 3, "num_res_blocks": 1, "attn_resolutions": [], "in_channels": 3,
               "resolution": 32, "z_channels": 4, "ch_mult": [1, 2]}},
           "unet": {"image_size": 16, "in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1,
                    "attention_resolutions": [2], "channel_mult": [1, 2], "num_heads": 2,
                    "use_spatial_transformer": True, "context_dim": 32},
           "cond_stage": {"type": "bert", "n_embed": 32, "n_layer": 1},
           "diffusion": {"conditioning_key": "crossattn", "image_size": 16, "channels": 4, "use_ema": False}}
    model = config.build_model(config.config_from_dict(doc), bert_vocab=BERT_VOCAB)
    c = model.get_learned_conditioning(["a red bicycle", ""])
    assert c.shape == (2, 77, 32)

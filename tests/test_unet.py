"""UNet, attention and timestep embedding: tiny models of every kind the zoo uses, upstream arithmetic, key names."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange

from conftest import REFERENCE
from ldmcli.errors import UsageError
from ldmcli.models import attention as attention_mod
from ldmcli.models import unet as unet_mod
from ldmcli.models.attention import CrossAttention, SpatialTransformer
from ldmcli.models.unet import (
    AttentionBlock,
    GroupNorm32,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    UNetModel,
    timestep_embedding,
)
from tinymodels import normal_params


def explicit_sdpa(q, k, v, attn_mask=None, scale=None, **_):
    """softmax(q k^T * scale) v spelled out, as the upstream code computes attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if attn_mask is not None:
        sim = sim.masked_fill(~attn_mask, -torch.finfo(sim.dtype).max)
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)


def tiny(**overrides) -> UNetModel:
    kw = dict(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2],
        num_heads=2,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    return normal_params(UNetModel(**kw)).eval()


KINDS = {
    "attention_num_heads": dict(num_heads=4),
    "attention_num_head_channels": dict(num_heads=-1, num_head_channels=16),
    "new_attention_order": dict(use_new_attention_order=True),
    "spatial_transformer": dict(use_spatial_transformer=True, context_dim=24, transformer_depth=2, legacy=False),
    "class_conditional": dict(num_classes=5),
    "scale_shift_resblock_updown": dict(use_scale_shift_norm=True, resblock_updown=True),
    "no_conv_resample": dict(conv_resample=False, attention_resolutions=[1, 2]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unet_kinds_shapes_and_finite(kind):
    m = tiny(**KINDS[kind])
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 999])
    kwargs = {}
    if "context_dim" in KINDS[kind]:
        kwargs["context"] = torch.randn(2, 7, 24)
    if "num_classes" in KINDS[kind]:
        kwargs["y"] = torch.tensor([0, 4])
    with torch.no_grad():
        out = m(x, t, **kwargs)
    assert out.shape == (2, 3, 8, 8)
    assert torch.isfinite(out).all()
    # the timestep matters
    with torch.no_grad():
        out2 = m(x, torch.tensor([500, 3]), **kwargs)
    assert not torch.allclose(out, out2)


def test_class_label_required_iff_class_conditional():
    m = tiny(num_classes=3)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError):
        tiny()(torch.randn(1, 3, 8, 8), torch.tensor([1]), y=torch.tensor([0]))


def test_predict_codebook_ids_head():
    m = tiny(n_embed=11)
    with torch.no_grad():
        out = m(torch.randn(1, 3, 8, 8), torch.tensor([3]))
    assert out.shape == (1, 11, 8, 8)
    assert "id_predictor.1.weight" in m.state_dict()


def test_constructor_validates_like_upstream():
    with pytest.raises(ValueError):
        tiny(use_spatial_transformer=True)  # no context_dim
    with pytest.raises(ValueError):
        tiny(context_dim=8)  # context without transformer
    with pytest.raises(ValueError):
        tiny(num_heads=-1, num_head_channels=-1)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    dim = 10
    emb = timestep_embedding(t, dim)
    assert emb.dtype == torch.float32 and emb.shape == (4, dim)
    half = dim // 2
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(step * freq), abs=1e-4)
            assert emb[row, half + i].item() == pytest.approx(math.sin(step * freq), abs=1e-4)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)
    assert torch.equal(timestep_embedding(t, 3, repeat_only=True), t[:, None].expand(4, 3))


def test_groupnorm32_computes_in_float32_and_casts_back():
    gn = normal_params(GroupNorm32(32, 64))
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = gn.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    ref = F.group_norm(x.float(), 32, gn.weight.float(), gn.bias.float(), 1e-5).to(torch.bfloat16)
    assert torch.equal(out, ref)
    assert gn.eps == 1e-5


def upstream_qkv_legacy(qkv, n_heads):
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


def upstream_qkv_new(qkv, n_heads):
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum(
        "bct,bcs->bts", (q * scale).reshape(bs * n_heads, ch, length), (k * scale).reshape(bs * n_heads, ch, length)
    ).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", w, v.reshape(bs * n_heads, ch, length)).reshape(bs, -1, length)


def test_qkv_attention_matches_upstream_formulas():
    qkv = torch.randn(2, 3 * 4 * 8, 10)
    torch.testing.assert_close(QKVAttentionLegacy(4)(qkv), upstream_qkv_legacy(qkv, 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(QKVAttention(4)(qkv), upstream_qkv_new(qkv, 4), rtol=1e-5, atol=1e-5)
    # the two layouts really differ
    assert not torch.allclose(QKVAttention(4)(qkv), QKVAttentionLegacy(4)(qkv))


def test_cross_attention_sdpa_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = normal_params(CrossAttention(query_dim=32, context_dim=20, heads=4, dim_head=8)).eval()
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 5, 20)
    q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=4)
    k = rearrange(attn.to_k(ctx), "b m (h d) -> b h m d", h=4)
    v = rearrange(attn.to_v(ctx), "b m (h d) -> b h m d", h=4)
    ref = attn.to_out(rearrange(explicit_sdpa(q, k, v, scale=8**-0.5), "b h n d -> b n (h d)"))
    torch.testing.assert_close(attn(x, ctx), ref, rtol=1e-5, atol=1e-5)
    # self-attention when no context; key padding mask
    self_attn = normal_params(CrossAttention(query_dim=32, heads=2, dim_head=16))
    assert self_attn(x).shape == x.shape
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    masked = attn(x, ctx, mask=mask)
    torch.testing.assert_close(masked[0], attn(x[:1], ctx[:1, :3])[0], rtol=1e-5, atol=1e-5)


def test_whole_unet_equals_explicit_attention(monkeypatch):
    """The fused SDPA path gives upstream's softmax(q k^T * scale) v numbers through a whole UNet (fp32, 1e-5)."""
    for overrides in (KINDS["spatial_transformer"], KINDS["attention_num_heads"], KINDS["new_attention_order"]):
        m = tiny(**overrides)
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
        ctx = torch.randn(2, 7, 24) if "context_dim" in overrides else None
        with torch.no_grad():
            fast = m(x, t, context=ctx)
            with monkeypatch.context() as mp:
                mp.setattr(attention_mod.F, "scaled_dot_product_attention", explicit_sdpa)
                mp.setattr(unet_mod.F, "scaled_dot_product_attention", explicit_sdpa)
                slow = m(x, t, context=ctx)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_spatial_transformer_keeps_memory_format_and_values():
    st = normal_params(SpatialTransformer(32, n_heads=2, d_head=16, context_dim=12)).eval()
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 3, 12)
    with torch.no_grad():
        out = st(x, ctx)
        out_cl = st(x.contiguous(memory_format=torch.channels_last), ctx)
    assert out.is_contiguous()
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, out_cl, rtol=1e-5, atol=1e-5)


def test_unet_channels_last_matches_contiguous():
    m = tiny(**KINDS["spatial_transformer"])
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([5, 50]), torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = m(x, t, context=ctx)
        out = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, context=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_unet_runs_close_to_float32():
    m = tiny(**KINDS["spatial_transformer"])
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([5, 50]), torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = m(x, t, context=ctx)
        out = m.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05  # bf16 keeps ~3 significant digits; the tiny net stays within a few percent


def test_checkpointing_only_while_training(monkeypatch):
    """use_checkpoint wraps blocks in torch.utils.checkpoint when training with grads, never in eval."""
    calls = []
    real = unet_mod._checkpoint

    def spy(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(unet_mod, "_checkpoint", spy)
    monkeypatch.setattr(attention_mod, "_checkpoint", spy)
    m = tiny(use_checkpoint=True, **KINDS["spatial_transformer"])
    x, t, ctx = torch.randn(1, 3, 8, 8), torch.tensor([5]), torch.randn(1, 7, 24)
    with torch.no_grad():
        ref = m(x, t, context=ctx)
    assert calls == []
    m.train()
    out = m(x, t, context=ctx)
    assert calls
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)  # dropout is 0


def test_resblock_scale_shift_formula():
    rb = normal_params(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=True)).eval()
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    h = rb.in_layers(x)
    scale, shift = rb.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
    h = rb.out_layers[1:](rb.out_layers[0](h) * (1 + scale) + shift)
    torch.testing.assert_close(rb(x, emb), rb.skip_connection(x) + h)
    assert isinstance(rb.skip_connection, torch.nn.Conv2d) and rb.skip_connection.kernel_size == (1, 1)


def heads(blocks):
    out = []
    for block in blocks:
        for layer in block:
            if isinstance(layer, AttentionBlock):
                out.append(("attn", layer.num_heads, layer.channels // layer.num_heads))
            elif isinstance(layer, SpatialTransformer):
                a = layer.transformer_blocks[0].attn1
                out.append(("st", a.heads, a.to_q.out_features // a.heads))
    return out


def test_head_layout_rules_of_legacy_flag():
    """Upstream's head arithmetic: num_head_channels overrides num_heads; with legacy=True a plain AttentionBlock
    in the decoder uses num_heads_upsample, with legacy=False it uses num_heads."""
    base = dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2], num_heads=4)
    legacy = tiny(**base, num_heads_upsample=2, legacy=True)
    modern = tiny(**base, num_heads_upsample=2, legacy=False)
    assert heads(legacy.input_blocks) == [("attn", 4, 8), ("attn", 4, 16)]
    assert heads(legacy.output_blocks) == [("attn", 2, 32)] * 2 + [("attn", 2, 16)] * 2
    assert heads(modern.output_blocks) == [("attn", 4, 16)] * 2 + [("attn", 4, 8)] * 2
    by_channels = tiny(**base, num_head_channels=8)
    assert heads(by_channels.input_blocks) == [("attn", 4, 8), ("attn", 8, 8)]
    st = tiny(**base, use_spatial_transformer=True, context_dim=8, num_head_channels=16, legacy=False)
    assert heads(st.input_blocks) == [("st", 2, 16), ("st", 4, 16)]
    assert heads([st.middle_block]) == [("st", 4, 16)]


def unet_manifests():
    out = []
    for path in sorted((REFERENCE / "state_dicts").glob("*.json")):
        manifest = json.loads(path.read_text())
        config = yaml.safe_load((REFERENCE / "configs" / manifest["config"]).read_text())["model"]["params"]
        if "unet_config" in config:
            out.append(pytest.param(manifest, config["unet_config"]["params"], id=path.stem))
    return out


@pytest.mark.parametrize(("manifest", "params"), unet_manifests())
def test_zoo_unet_keys_and_shapes_equal_manifest(manifest, params):
    with torch.device("meta"):
        m = UNetModel(**params)
    mine = {f"model.diffusion_model.{k}": list(v.shape) for k, v in m.state_dict().items()}
    ref = {k: v for k, v in manifest["keys"].items() if k.startswith("model.diffusion_model.")}
    assert mine == ref

"""First stages: shapes, posterior, vector quantiser, attention, and state_dict keys equal to upstream's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import REFERENCE
from ldmcli.errors import UsageError
from ldmcli.models import losses
from ldmcli.models.autoencoder import (
    AttnBlock,
    AutoencoderKL,
    Decoder,
    Downsample,
    Encoder,
    LinAttnBlock,
    ResnetBlock,
    Upsample,
    VQModel,
    VQModelInterface,
)
from ldmcli.models.distributions import DiagonalGaussianDistribution
from ldmcli.models.quantize import VectorQuantizer


def tiny_ddconfig(**over) -> dict:
    dd = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    dd.update(over)
    return dd


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- autoencoders


def test_kl_encode_decode_shapes(image):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_ddconfig(), embed_dim=3).eval()
    posterior = model.encode(image)
    assert posterior.mean.shape == (2, 3, 16, 16) and posterior.logvar.shape == (2, 3, 16, 16)
    assert model.decode(posterior.mode()).shape == (2, 3, 32, 32)
    rec, post = model(image, sample_posterior=False)
    assert rec.shape == image.shape
    torch.testing.assert_close(rec, model.decode(post.mean))
    assert model.get_last_layer() is model.decoder.conv_out.weight
    assert model.loss is None and not any(k.startswith("loss") for k in model.state_dict())


def test_kl_forward_sample_is_reproducible_with_generator(image):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_ddconfig(), embed_dim=4).eval()
    with torch.no_grad():
        a, _ = model(image, generator=torch.Generator().manual_seed(7))
        b, _ = model(image, generator=torch.Generator().manual_seed(7))
        c, _ = model(image, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_kl_needs_double_z():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(tiny_ddconfig(double_z=False), embed_dim=4)


def test_vq_encode_decode_shapes(image):
    torch.manual_seed(0)
    model = VQModel(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3).eval()
    quant, emb_loss, (_, _, ind) = model.encode(image)
    assert quant.shape == (2, 3, 16, 16) and emb_loss.ndim == 0 and ind.shape == (2 * 16 * 16,)
    dec, diff, ind2 = model(image, return_pred_indices=True)
    assert dec.shape == image.shape
    torch.testing.assert_close(ind, ind2)
    # decoding the indices equals decoding the quantised latent
    torch.testing.assert_close(model.decode_code(ind.reshape(2, 16, 16)), model.decode(quant))


def test_vq_interface_encodes_before_quantisation(image):
    torch.manual_seed(0)
    full = VQModel(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3).eval()
    iface = VQModelInterface(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3).eval()
    iface.load_state_dict(full.state_dict())
    with torch.no_grad():
        h = iface.encode(image)
        torch.testing.assert_close(h, full.encode_to_prequant(image))
        quant = full.encode(image)[0]
        torch.testing.assert_close(iface.decode(h), full.decode(quant))
        torch.testing.assert_close(iface.decode(h, force_not_quantize=True), full.decode(h))
        assert not torch.allclose(iface.decode(h, force_not_quantize=True), iface.decode(h))
        torch.testing.assert_close(iface(image)[0], full(image)[0])


def test_vq_use_ema_is_refused():
    with pytest.raises(ValueError, match="use_ema"):
        VQModel(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3, use_ema=True)


def test_upstream_bookkeeping_keywords_are_accepted():
    model = VQModel(tiny_ddconfig(double_z=False), n_embed=8, embed_dim=3, ckpt_path="models/x/model.ckpt",
                    ignore_keys=["loss"], image_key="segmentation", monitor="val/rec_loss", colorize_nlabels=5,
                    lr_g_factor=0.5)
    assert model.image_key == "segmentation" and model.monitor == "val/rec_loss" and model.lr_g_factor == 0.5
    assert model.colorize.shape == (3, 5, 1, 1)
    rgb = model.to_rgb(torch.randn(1, 5, 4, 4))
    assert rgb.shape == (1, 3, 4, 4) and rgb.min() >= -1 and rgb.max() <= 1


def test_decoder_options():
    torch.manual_seed(0)
    dd = tiny_ddconfig()
    z = torch.randn(1, 4, 16, 16)
    plain = Decoder(**dd)
    pre = Decoder(**dd, give_pre_end=True)
    pre.load_state_dict(plain.state_dict())
    assert pre(z).shape == (1, 32, 32, 32)
    tanh = Decoder(**dd, tanh_out=True)
    tanh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(tanh(z), torch.tanh(plain(z)))


def test_attn_type_none_and_linear():
    enc = Encoder(**tiny_ddconfig(attn_type="none"))
    assert isinstance(enc.mid.attn_1, torch.nn.Identity)
    assert not any("attn" in k for k in enc.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert enc(x).shape == (1, 8, 16, 16)
    lin = Encoder(**tiny_ddconfig(use_linear_attn=True))
    assert isinstance(lin.mid.attn_1, LinAttnBlock)
    assert "mid.attn_1.to_qkv.weight" in lin.state_dict() and lin(x).shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="attn_type"):
        Encoder(**tiny_ddconfig(attn_type="flash"))


# ---------------------------------------------------------------------------------------------- building blocks


def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    block = AttnBlock(64)
    x = torch.randn(2, 64, 8, 6)
    h = block.norm(x)
    q, k, v = block.q(h), block.k(h), block.v(h)
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
    w = torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5
    w = torch.softmax(w, dim=2)
    out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = Downsample(32, with_conv=True)
    x = torch.randn(1, 32, 8, 8)
    padded = torch.zeros(1, 32, 9, 9)
    padded[:, :, :8, :8] = x
    expected = torch.nn.functional.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), expected)
    assert Downsample(32, with_conv=False)(x).shape == (1, 32, 4, 4)
    up = Upsample(32, with_conv=False)(x)
    torch.testing.assert_close(up[:, :, ::2, ::2], x)
    torch.testing.assert_close(up[:, :, 1::2, 1::2], x)


def test_resnet_block_shortcuts_and_groupnorm_eps():
    block = ResnetBlock(in_channels=32, out_channels=64, dropout=0.0, temb_channels=0)
    assert hasattr(block, "nin_shortcut") and not hasattr(block, "temb_proj")
    assert block.norm1.eps == 1e-6 and block.norm1.num_groups == 32
    conv = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, dropout=0.0, temb_channels=128)
    assert conv.conv_shortcut.kernel_size == (3, 3)
    x = torch.randn(2, 32, 8, 8)
    assert conv(x, torch.randn(2, 128)).shape == (2, 64, 8, 8)
    same = ResnetBlock(in_channels=32, dropout=0.0, temb_channels=0)
    assert not hasattr(same, "nin_shortcut") and same(x).shape == x.shape


# ---------------------------------------------------------------------------------------------- posterior


def test_posterior_statistics():
    mean = torch.randn(2, 3, 4, 4)
    logvar = torch.randn(2, 3, 4, 4)
    logvar[0, 0, 0, 0] = 50.0
    logvar[0, 0, 0, 1] = -50.0
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    clamped = logvar.clamp(-30, 20)
    torch.testing.assert_close(post.logvar, clamped)
    torch.testing.assert_close(post.std, torch.exp(0.5 * clamped))
    torch.testing.assert_close(post.mode(), mean)
    kl = 0.5 * (mean**2 + clamped.exp() - 1 - clamped).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.kl(), kl)
    other = DiagonalGaussianDistribution(torch.cat([torch.zeros_like(mean), torch.zeros_like(logvar)], dim=1))
    torch.testing.assert_close(post.kl(other), kl)
    x = torch.randn_like(mean)
    nll = 0.5 * (np.log(2 * np.pi) + clamped + (x - mean) ** 2 / clamped.exp()).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.nll(x), nll)


def test_posterior_sample_uses_generator():
    params = torch.randn(1, 8, 4, 4)
    post = DiagonalGaussianDistribution(params)
    a = post.sample(generator=torch.Generator().manual_seed(3))
    b = post.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, post.mean + post.std * noise)
    half = DiagonalGaussianDistribution(params.bfloat16()).sample(generator=torch.Generator().manual_seed(3))
    assert half.dtype == torch.bfloat16  # same noise, in the posterior's dtype
    det = DiagonalGaussianDistribution(params, deterministic=True)
    torch.testing.assert_close(det.sample(), det.mean)
    assert det.kl().item() == 0.0


# ---------------------------------------------------------------------------------------------- quantiser


def test_quantizer_picks_nearest_code_and_passes_gradient_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(10, 4, beta=0.25)
    assert vq.embedding.weight.abs().max() <= 1 / 10
    codes = vq.embedding.weight.detach()
    z = torch.randn(2, 4, 3, 5) * 0.1
    z.requires_grad_(True)
    z_q, loss, (_, _, ind) = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, codes).argmin(dim=1)
    assert torch.equal(ind, expected)
    torch.testing.assert_close(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 4), codes[expected])
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_quantizer_legacy_loss_value_and_placement():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 3, beta=0.25)
    z = (torch.randn(1, 3, 2, 2) * 0.2).requires_grad_(True)
    z_q, loss, (_, _, ind) = vq(z)
    e = vq.embedding.weight[ind].detach()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    mse = ((e - flat) ** 2).mean()
    torch.testing.assert_close(loss, (1 + 0.25) * mse)
    loss.backward()
    n = flat.numel()
    # legacy (taming VectorQuantizer2 default): weight 1 on the commitment term, beta on the codebook term
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 3), 2 * (flat - e) / n)
    code_grad = torch.zeros_like(vq.embedding.weight)
    code_grad.index_add_(0, ind, 0.25 * 2 * (e - flat) / n)
    torch.testing.assert_close(vq.embedding.weight.grad, code_grad)

    fixed = VectorQuantizer(6, 3, beta=0.25, legacy=False)
    fixed.load_state_dict(vq.state_dict())
    z2 = z.detach().clone().requires_grad_(True)
    fixed(z2)[1].backward()
    torch.testing.assert_close(z2.grad.permute(0, 2, 3, 1).reshape(-1, 3), 0.25 * 2 * (flat - e) / n)


def test_quantizer_sane_index_shape():
    vq = VectorQuantizer(6, 3, sane_index_shape=True)
    _, _, (_, _, ind) = vq(torch.randn(2, 3, 4, 5))
    assert ind.shape == (2, 4, 5)


def test_quantizer_remap_round_trip(tmp_path):
    torch.manual_seed(0)
    n_e, dim = 8, 2
    used = np.array([1, 3, 4, 6])
    np.save(tmp_path / "used.npy", used)
    vq = VectorQuantizer(n_e, dim, remap=str(tmp_path / "used.npy"), unknown_index="extra", sane_index_shape=True)
    assert vq.re_embed == 5 and vq.unknown_index == 4
    assert "used" in vq.state_dict()
    # latents sitting exactly on codes 0..7
    z = vq.embedding.weight.detach()[torch.arange(n_e)].reshape(1, 2, 4, dim).permute(0, 3, 1, 2)
    z_q, _, (_, _, ind) = vq(z)
    assert ind.tolist() == [[[4, 0, 4, 1], [2, 4, 3, 4]]]  # unknown codes -> the extra index
    back = vq.get_codebook_entry(ind.reshape(-1), shape=(1, 2, 4, dim))
    known = torch.tensor([1, 3, 4, 6])
    flat_back = back.permute(0, 2, 3, 1).reshape(-1, dim)
    torch.testing.assert_close(flat_back[known], vq.embedding.weight[known])
    # as upstream, the extra index decodes as position 0 of ``used``, i.e. code 1
    torch.testing.assert_close(flat_back[0], vq.embedding.weight[1])

    rnd = VectorQuantizer(n_e, dim, remap=torch.tensor(used), unknown_index="random")
    rnd.load_state_dict(vq.state_dict())
    a = rnd(z, generator=torch.Generator().manual_seed(1))[2][2]
    b = rnd(z, generator=torch.Generator().manual_seed(1))[2][2]
    assert a.shape == (8, 1) and torch.equal(a, b)
    assert a.reshape(-1)[known].tolist() == [0, 1, 2, 3]
    assert int(a.max()) < 4

    with pytest.raises(UsageError, match="remap"):
        VectorQuantizer(n_e, dim, remap=str(tmp_path / "missing.npy"))


# ---------------------------------------------------------------------------------------------- upstream keys

FIRST_STAGES = [
    "first_stage-kl-f4", "first_stage-kl-f8", "first_stage-kl-f16", "first_stage-kl-f32", "first_stage-vq-f4",
    "first_stage-vq-f4-noattn", "first_stage-vq-f8", "first_stage-vq-f8-n256", "first_stage-vq-f16",
    "configs-autoencoder-autoencoder_kl_64x64x3", "configs-autoencoder-autoencoder_kl_32x32x4",
    "configs-autoencoder-autoencoder_kl_16x16x16", "configs-autoencoder-autoencoder_kl_8x8x64",
]
LOSSES = {
    "ldm.modules.losses.LPIPSWithDiscriminator": losses.LPIPSWithDiscriminator,
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": losses.VQLPIPSWithDiscriminator,
}
MODELS = {"ldm.models.autoencoder.AutoencoderKL": AutoencoderKL, "ldm.models.autoencoder.VQModel": VQModel}


@pytest.mark.parametrize("name", FIRST_STAGES)
def test_state_dict_matches_upstream(name):
    manifest = json.loads((REFERENCE / "state_dicts" / f"{name}.json").read_text())
    config = yaml.safe_load((REFERENCE / "configs" / manifest["config"]).read_text())["model"]
    params = dict(config["params"])
    lossconfig = params.pop("lossconfig")
    with torch.device("meta"):
        loss = LOSSES[lossconfig["target"]](**lossconfig.get("params", {}))
        model = MODELS[config["target"]](**params, loss=loss)
    state = model.state_dict()
    assert list(state) == list(manifest["keys"])
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if v.dtype != torch.float32}
    assert dtypes == manifest["non_float32_dtypes"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_ldm_embedded_first_stage_has_no_loss_keys():
    manifest = json.loads((REFERENCE / "state_dicts" / "ldm-cin256.json").read_text())
    config = yaml.safe_load((REFERENCE / "configs" / manifest["config"]).read_text())["model"]
    params = dict(config["params"]["first_stage_config"]["params"])
    assert params.pop("lossconfig")["target"] == "torch.nn.Identity"
    with torch.device("meta"):
        model = VQModelInterface(**params)
    expected = {k.removeprefix("first_stage_model."): v for k, v in manifest["keys"].items()
                if k.startswith("first_stage_model.")}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected

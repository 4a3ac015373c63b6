"""Schedules, EMA and LatentDiffusion on tiny models: upstream formulas, buffer names, conditioning routes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmcli.errors import UsageError
from ldmcli.models.autoencoder import AutoencoderKL, VQModelInterface
from ldmcli.models.ddpm import LatentDiffusion
from ldmcli.models.ema import LitEma
from ldmcli.models.schedule import SCHEDULE_BUFFERS, make_beta_schedule, schedule_buffers
from ldmcli.models.unet import UNetModel
from tinymodels import normal_params

DDCONFIG = dict(
    double_z=True,
    z_channels=4,
    resolution=16,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


def unet(in_channels: int = 4, **kw) -> UNetModel:
    params = dict(
        image_size=8,
        in_channels=in_channels,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=[2],
        channel_mult=[1, 2],
        num_heads=2,
    )
    params.update(kw)
    return normal_params(UNetModel(**params), seed=1)


def kl_first_stage() -> AutoencoderKL:
    return normal_params(AutoencoderKL(DDCONFIG, embed_dim=4), seed=2)


def ldm(cond_stage=None, unet_kw=None, **kw) -> LatentDiffusion:
    params = dict(timesteps=100, linear_start=0.0015, linear_end=0.0155, image_size=8, channels=4)
    params.update(kw)
    return LatentDiffusion(unet(**(unet_kw or {})), kl_first_stage(), cond_stage, **params)


# ------------------------------------------------------------------------------------------------- schedule
def reference_betas(schedule: str, n: int, start: float, end: float, s: float = 8e-3) -> list[float]:
    if schedule == "linear":
        a, b = math.sqrt(start), math.sqrt(end)
        return [(a + (b - a) * i / (n - 1)) ** 2 for i in range(n)]
    if schedule == "sqrt_linear":
        return [start + (end - start) * i / (n - 1) for i in range(n)]
    if schedule == "sqrt":
        return [math.sqrt(start + (end - start) * i / (n - 1)) for i in range(n)]
    f = [math.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
    return [min(max(1 - f[i + 1] / f[i], 0.0), 0.999) for i in range(n)]


def reference_buffers(betas: list[float], v: float) -> dict[str, list[float]]:
    acp, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        acp.append(prod)
    prev = [1.0] + acp[:-1]
    pv = [(1 - v) * b * (1 - p) / (1 - a) + v * b for b, a, p in zip(betas, acp, prev)]
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": [math.sqrt(a) for a in acp],
        "sqrt_one_minus_alphas_cumprod": [math.sqrt(1 - a) for a in acp],
        "log_one_minus_alphas_cumprod": [math.log(1 - a) for a in acp],
        "sqrt_recip_alphas_cumprod": [math.sqrt(1 / a) for a in acp],
        "sqrt_recipm1_alphas_cumprod": [math.sqrt(1 / a - 1) for a in acp],
        "posterior_variance": pv,
        "posterior_log_variance_clipped": [math.log(max(x, 1e-20)) for x in pv],
        "posterior_mean_coef1": [b * math.sqrt(p) / (1 - a) for b, a, p in zip(betas, acp, prev)],
        "posterior_mean_coef2": [(1 - p) * math.sqrt(1 - b) / (1 - a) for b, a, p in zip(betas, acp, prev)],
    }


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sqrt_linear", "sqrt"])
def test_schedule_buffers_match_float64_reference(schedule):
    n, start, end = 1000, 0.00085, 0.012
    betas = make_beta_schedule(schedule, n, linear_start=start, linear_end=end)
    assert betas.dtype == np.float64
    ref_betas = reference_betas(schedule, n, start, end)
    np.testing.assert_allclose(betas, ref_betas, rtol=1e-9, atol=0)  # cosine: 1 - ratio cancels
    v = 0.3 if schedule == "sqrt_linear" else 0.0
    buffers = schedule_buffers(betas, v_posterior=v)
    assert tuple(buffers) == SCHEDULE_BUFFERS
    ref = reference_buffers(ref_betas, v)
    for name in SCHEDULE_BUFFERS:
        assert buffers[name].dtype == torch.float32
        expected = torch.tensor(ref[name], dtype=torch.float64).float()
        torch.testing.assert_close(buffers[name], expected, rtol=1e-6, atol=1e-30, msg=name)


def test_unknown_schedule_is_a_usage_error():
    with pytest.raises(ValueError):
        make_beta_schedule("quadratic", 10)


def test_model_schedule_buffers_and_lvlb_weights():
    m = ldm()
    sd = m.state_dict()
    for name in SCHEDULE_BUFFERS:
        assert sd[name].shape == (100,) and sd[name].dtype == torch.float32
    assert "lvlb_weights" not in sd and "logvar" not in sd and "scale_factor" not in sd
    assert m.num_timesteps == 100
    assert m.device == torch.device("cpu")
    b, pv, acp = m.betas, m.posterior_variance, m.alphas_cumprod
    expected = b**2 / (2 * pv * (1 - b) * (1 - acp))
    torch.testing.assert_close(m.lvlb_weights[1:], expected[1:])
    assert m.lvlb_weights[0] == m.lvlb_weights[1]
    x0 = ldm(parameterization="x0")
    expected = 0.5 * torch.sqrt(x0.alphas_cumprod) / (2.0 - x0.alphas_cumprod)
    torch.testing.assert_close(x0.lvlb_weights[1:], expected[1:])
    given = ldm(given_betas=np.linspace(1e-4, 0.02, 50))
    assert given.num_timesteps == 50
    torch.testing.assert_close(given.betas, torch.linspace(1e-4, 0.02, 50, dtype=torch.float64).float())


# ------------------------------------------------------------------------------------------------------ EMA
def test_lit_ema_names_dtypes_and_update_math():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    net[0].bias.requires_grad = False
    ema = LitEma(net, decay=0.9)
    sd = ema.state_dict()
    assert set(sd) == {"decay", "num_updates", "0weight", "10weight", "10bias"}
    assert sd["decay"].dtype == torch.float32 and sd["decay"].shape == ()
    assert sd["num_updates"].dtype == torch.int32 and int(sd["num_updates"]) == 0
    shadow0 = ema.get_buffer("0weight").clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema(net)
    decay = min(0.9, (1 + 1) / (10 + 1))
    expected = shadow0 - (1 - decay) * (shadow0 - net[0].weight)
    torch.testing.assert_close(ema.get_buffer("0weight"), expected)
    assert int(ema.num_updates) == 1
    for _ in range(200):
        ema(net)
    # after warm-up the configured decay is the smaller one
    assert int(ema.num_updates) == 201
    fixed = LitEma(net, decay=0.5, use_num_upates=False)
    assert int(fixed.num_updates) == -1
    s = fixed.get_buffer("10bias").clone()
    with torch.no_grad():
        net[1][0].bias.sub_(2.0)
    fixed(net)
    torch.testing.assert_close(fixed.get_buffer("10bias"), s - 0.5 * (s - net[1][0].bias))
    assert int(fixed.num_updates) == -1


def test_ema_keys_in_model_and_ema_scope_swaps_and_restores():
    m = ldm()
    sd = m.state_dict()
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    assert sd["model_ema.num_updates"].dtype == torch.int32
    assert not any(k.startswith("model_ema.") and "first_stage" in k for k in sd)
    weight = m.model.diffusion_model.input_blocks[0][0].weight
    trained = weight.detach().clone()
    ema_value = torch.full_like(trained, 0.5)
    m.model_ema.get_buffer("diffusion_modelinput_blocks00weight").copy_(ema_value)
    with m.ema_scope():
        assert torch.equal(weight, ema_value)
    assert torch.equal(weight, trained)
    with pytest.raises(RuntimeError):
        with m.ema_scope("x"):
            raise RuntimeError("boom")
    assert torch.equal(weight, trained)
    plain = ldm(use_ema=False)
    assert not any(k.startswith("model_ema") for k in plain.state_dict())
    with plain.ema_scope():
        pass


# -------------------------------------------------------------------------------------- diffusion math
def test_q_sample_and_predict_start_from_noise():
    m = ldm()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 42, 99])
    acp = torch.tensor(reference_buffers(reference_betas("linear", 100, 0.0015, 0.0155), 0)["alphas_cumprod"])
    a = acp[t].float()[:, None, None, None]
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    xt = m.q_sample(x0, t, noise)
    torch.testing.assert_close(xt, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.predict_start_from_noise(xt, t, noise), x0, rtol=1e-4, atol=1e-4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(m.q_sample(x0, t, generator=g1), m.q_sample(x0, t, generator=g2))


# ------------------------------------------------------------------------------------- conditioning routes
class Recorder(torch.nn.Module):
    """Stands in for a UNet and returns what it was called with."""

    def forward(self, x, t, context=None, y=None):
        return {"x": x, "t": t, "context": context, "y": y}


def routed(conditioning_key, cond, **kw):
    m = LatentDiffusion(Recorder(), kl_first_stage(), torch.nn.Identity(), conditioning_key=conditioning_key,
                        timesteps=10, use_ema=False, **kw)
    return m.apply_model(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), cond)


def test_apply_model_routes_each_conditioning_key():
    c_img, ctx, ctx2 = torch.ones(2, 3, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 2, 16)
    out = routed("concat", c_img)
    assert out["x"].shape == (2, 7, 8, 8) and torch.equal(out["x"][:, 4:], c_img) and out["context"] is None
    out = routed("crossattn", [ctx, ctx2])
    assert torch.equal(out["context"], torch.cat([ctx, ctx2], 1)) and out["x"].shape == (2, 4, 8, 8)
    out = routed("hybrid", {"c_concat": [c_img], "c_crossattn": [ctx]})
    assert out["x"].shape == (2, 7, 8, 8) and torch.equal(out["context"], ctx)
    labels = torch.tensor([3, 1])
    out = routed("adm", labels)
    assert torch.equal(out["y"], labels) and out["context"] is None
    m = LatentDiffusion(Recorder(), kl_first_stage(), None, timesteps=10, use_ema=False)
    assert m.model.conditioning_key is None
    out = m.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1]), None)
    assert out["context"] is None and out["y"] is None


def test_apply_model_with_real_unets_equals_direct_calls():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 77])
    ctx = torch.randn(2, 5, 16)
    cross = dict(use_spatial_transformer=True, context_dim=16)
    m = ldm(torch.nn.Identity(), unet_kw=cross, conditioning_key="crossattn")
    with torch.no_grad():
        torch.testing.assert_close(m.apply_model(x, t, ctx), m.model.diffusion_model(x, t, context=ctx))
    m = ldm(torch.nn.Identity(), unet_kw=dict(in_channels=7), conditioning_key="concat")
    c = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m.apply_model(x, t, c), m.model.diffusion_model(torch.cat([x, c], 1), t))
    m = ldm(torch.nn.Identity(), unet_kw=dict(num_classes=10), conditioning_key="adm")
    y = torch.tensor([2, 9])
    with torch.no_grad():
        torch.testing.assert_close(m.apply_model(x, t, y), m.model.diffusion_model(x, t, y=y))


def test_conditioning_key_defaults_as_upstream():
    assert ldm(torch.nn.Identity()).model.conditioning_key == "concat"
    assert ldm(torch.nn.Identity(), concat_mode=False).model.conditioning_key == "crossattn"
    assert ldm(None, conditioning_key="crossattn").model.conditioning_key is None
    assert ldm("__is_unconditional__").cond_stage_model is None
    with pytest.raises(ValueError):
        ldm(torch.nn.Identity(), conditioning_key="film")


# ----------------------------------------------------------------------------------------- first stage
def test_first_stage_frozen_and_scale_factor():
    m = ldm(scale_factor=0.5)
    fs = m.first_stage_model
    assert not any(p.requires_grad for p in fs.parameters())
    m.train()
    assert m.training and not fs.training and m.model.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = m.encode_first_stage(x)
    g = torch.Generator().manual_seed(7)
    z = m.get_first_stage_encoding(posterior, generator=g)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, 0.5 * (posterior.mean + posterior.std * noise))
    with torch.no_grad():
        torch.testing.assert_close(m.decode_first_stage(z), fs.decode(z / 0.5))
    assert m.get_first_stage_encoding(torch.ones(1)).item() == 0.5
    assert "scale_factor" not in m.state_dict()
    by_std = ldm(scale_by_std=True, scale_factor=0.25)
    assert by_std.state_dict()["scale_factor"].item() == 0.25


def test_vq_interface_decode_quantizes_and_is_first_stage_conditioner():
    vq = normal_params(VQModelInterface(DDCONFIG | {"double_z": False}, n_embed=16, embed_dim=4), seed=4)
    m = LatentDiffusion(unet(in_channels=7), vq, "__is_first_stage__", timesteps=10, use_ema=False,
                        conditioning_key="concat")
    assert m.cond_stage_model is m.first_stage_model
    sd = m.state_dict()
    assert "cond_stage_model.quant_conv.weight" in sd and "first_stage_model.quant_conv.weight" in sd
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    h = m.encode_first_stage(x)
    assert isinstance(h, torch.Tensor) and h.shape == (1, 4, 8, 8)
    torch.testing.assert_close(m.get_learned_conditioning(x), vq.encode(x))
    with torch.no_grad():
        torch.testing.assert_close(m.decode_first_stage(h), vq.decode(h))
        unquantized = m.decode_first_stage(h, force_not_quantize=True)
        torch.testing.assert_close(unquantized, vq.decode(h, force_not_quantize=True))
    assert not torch.allclose(unquantized, m.decode_first_stage(h))


def test_get_learned_conditioning_uses_encode_mode_or_forward():
    fs = kl_first_stage()
    m = LatentDiffusion(unet(in_channels=8), kl_first_stage(), fs, timesteps=10, use_ema=False)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(m.get_learned_conditioning(x), fs.encode(x).mode())
    lin = torch.nn.Linear(3, 16)
    m = ldm(lin, conditioning_key="crossattn", unet_kw=dict(use_spatial_transformer=True, context_dim=16))
    c = torch.randn(2, 5, 3)
    torch.testing.assert_close(m.get_learned_conditioning(c), lin(c))
    assert not lin.weight.requires_grad  # a frozen conditioner
    trainable = torch.nn.Linear(3, 16)
    ldm(trainable, cond_stage_trainable=True, conditioning_key="crossattn",
        unet_kw=dict(use_spatial_transformer=True, context_dim=16))
    assert trainable.weight.requires_grad


# ----------------------------------------------------------------------------------------------- losses
def test_p_losses_simple_and_vlb_terms():
    m = ldm(torch.nn.Identity(), conditioning_key="crossattn",
            unet_kw=dict(use_spatial_transformer=True, context_dim=16), original_elbo_weight=0.1)
    x0, noise, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    t = torch.tensor([5, 60])
    m.train()
    loss, logs = m.p_losses(x0, ctx, t, noise=noise)
    eps = m.apply_model(m.q_sample(x0, t, noise), t, ctx)
    per_example = ((eps - noise) ** 2).mean([1, 2, 3])
    expected = per_example.mean() + 0.1 * (m.lvlb_weights[t] * per_example).mean()
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    torch.testing.assert_close(logs["train/loss_simple"], F.mse_loss(eps, noise))
    loss.backward()
    assert m.model.diffusion_model.out[2].weight.grad is not None
    m.eval()
    with torch.no_grad():
        _, logs = m.p_losses(x0, ctx, t, noise=noise)
    assert "val/loss" in logs
    l1 = ldm(loss_type="l1", parameterization="x0")
    with torch.no_grad():
        loss, _ = l1.p_losses(x0, None, t, noise=noise)
        out = l1.apply_model(l1.q_sample(x0, t, noise), t, None)
    torch.testing.assert_close(loss, (out - x0).abs().mean())


def test_forward_draws_steps_from_generator_and_learns_logvar():
    m = ldm(learn_logvar=True, logvar_init=0.5)
    assert "logvar" in m.state_dict()
    x0 = torch.randn(2, 4, 8, 8)
    a, logs = m(x0, None, generator=torch.Generator().manual_seed(0))
    b, _ = m(x0, None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert "train/loss_gamma" in logs and logs["logvar"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ldm(parameterization="v")


def test_schedule_stays_float32_when_the_networks_are_cast():
    m = ldm(scale_by_std=True, scale_factor=0.3)
    before = m.alphas_cumprod.clone()
    m.to(torch.bfloat16)
    assert m.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert m.first_stage_model.decoder.conv_out.weight.dtype == torch.bfloat16
    for name in ("alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "lvlb_weights", "scale_factor"):
        assert getattr(m, name).dtype == torch.float32, name
    assert torch.equal(m.alphas_cumprod, before)
    assert m.state_dict()["betas"].dtype == torch.float32
    x, t = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([7])
    with torch.no_grad():
        assert m.apply_model(x, t, None).dtype == torch.bfloat16

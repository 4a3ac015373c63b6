"""Patch-wise (``split_input_params``) apply_model / encode / decode: upstream's weights, fold and normalisation."""

from __future__ import annotations

import pytest
import torch

from ldmcli.models.ddpm import LatentDiffusion
from ldmcli.models.patches import NOTEBOOK_SPLIT, SplitInputParams, delta_border, patch_starts
from tinymodels import build_tiny

from test_ddpm import kl_first_stage


def split(**kw):
    return {**NOTEBOOK_SPLIT, **kw}


# ------------------------------------------------------------------------------- weights written out by hand
def test_delta_border_and_weighting_by_hand():
    # 5x5 patch: coordinates / 4 = 0, .25, .5, .75, 1; distance = min(y, x, 1 - y, 1 - x)
    expected = torch.tensor([
        [0, 0, 0, 0, 0],
        [0, .25, .25, .25, 0],
        [0, .25, .5, .25, 0],
        [0, .25, .25, .25, 0],
        [0, 0, 0, 0, 0],
    ])
    assert torch.equal(delta_border(5, 5), expected)
    # 3x4: y / 2 = 0, .5, 1 and x / 3 = 0, 1/3, 2/3, 1
    third = 1 / 3
    assert torch.allclose(delta_border(3, 4), torch.tensor([[0, 0, 0, 0], [0, third, third, 0], [0, 0, 0, 0.]]))

    m = LatentDiffusion(torch.nn.Identity(), kl_first_stage(), None, timesteps=10, use_ema=False)
    m.split_input_params = split(clip_min_weight=0.01, clip_max_weight=0.3)
    w = m.get_weighting(5, 5, 2, 3, "cpu")
    assert w.shape == (1, 25, 6)  # upstream's (1, h * w, Ly * Lx)
    clipped = expected.clamp(0.01, 0.3).reshape(25)
    assert torch.allclose(w[0, :, 4], clipped)
    assert w[0, 0, 0].item() == pytest.approx(0.01) and w[0, 12, 0].item() == pytest.approx(0.3)
    # tie_braker: times the clipped distance of the patch in its 3x3 grid: centre 0.5 -> clip 0.4, edges 0.02
    m.split_input_params = split(tie_braker=True, clip_min_tie_weight=0.02, clip_max_tie_weight=0.4)
    w = m.get_weighting(5, 5, 3, 3, "cpu")
    base = expected.clamp(0.01, 0.5).reshape(25)
    assert torch.allclose(w[0, :, 4], base * 0.4) and torch.allclose(w[0, :, 0], base * 0.02)


def test_patch_starts_add_a_last_patch_where_upstream_leaves_a_gap():
    assert patch_starts(1024, 128, 64) == list(range(0, 897, 64))  # upstream: (1024 - 128) // 64 + 1 = 15
    assert patch_starts(10, 4, 4) == [0, 4, 6]  # upstream covers 0..8 only (NaN in the last 2 rows)
    assert patch_starts(8, 8, 8) == [0]


# ---------------------------------------------------------------------- fold/unfold reference (upstream form)
class Conv(torch.nn.Module):
    """A stand-in UNet: one 3x3 (or 1x1) convolution of [x, concat], independent of t."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

    def forward(self, x, t, context=None, y=None):
        return self.conv(x)


def conv_ldm(k: int) -> LatentDiffusion:
    return LatentDiffusion(Conv(8, 4, k), kl_first_stage(), torch.nn.Identity(), conditioning_key="concat",
                           cond_stage_key="LR_image", timesteps=10, use_ema=False)


def upstream_fold(fn, x, c, ks, stride, params: SplitInputParams):
    """Upstream's arithmetic spelled with nn.Unfold/nn.Fold: weight every patch output, fold, divide by the folded
    weights (valid where (size - ks) is a multiple of stride)."""
    h, w = x.shape[-2:]
    ly, lx = (h - ks) // stride + 1, (w - ks) // stride + 1
    unfold = torch.nn.Unfold(kernel_size=ks, stride=stride)
    fold = torch.nn.Fold(output_size=(h, w), kernel_size=ks, stride=stride)
    weighting = delta_border(ks, ks).clip(params.clip_min_weight, params.clip_max_weight)
    weighting = weighting.view(1, ks * ks, 1).repeat(1, 1, ly * lx)
    if params.tie_braker:
        ties = delta_border(ly, lx).clip(params.clip_min_tie_weight, params.clip_max_tie_weight)
        weighting = weighting * ties.view(1, 1, ly * lx)
    normalization = fold(weighting).view(1, 1, h, w)
    weighting = weighting.view(1, 1, ks, ks, ly * lx)
    xs = unfold(x).view(x.shape[0], -1, ks, ks, ly * lx)
    cs = unfold(c).view(c.shape[0], -1, ks, ks, ly * lx)
    o = torch.stack([fn(xs[..., i], cs[..., i]) for i in range(ly * lx)], dim=-1) * weighting
    return fold(o.view(o.shape[0], -1, ly * lx)) / normalization


@pytest.mark.parametrize("tie", [False, True])
def test_apply_model_matches_upstream_fold(tie):
    m = conv_ldm(3)
    x, c, t = torch.randn(2, 4, 20, 20), torch.randn(2, 4, 20, 20), torch.tensor([3, 5])
    m.split_input_params = split(ks=(8, 8), stride=(4, 4), tie_braker=tie, patch_batch=3)
    ours = m.apply_model(x, t, c)
    ref = upstream_fold(lambda xp, cp: m.model(xp, t, c_concat=[cp]), x, c, 8, 4, SplitInputParams.from_dict(
        m.split_input_params))
    assert torch.allclose(ours, ref, atol=1e-5)
    del m.split_input_params
    assert not hasattr(m, "split_input_params")
    assert not torch.allclose(m.apply_model(x, t, c), ours, atol=1e-3)  # the patches' borders show


def test_patch_wise_equals_whole_where_it_must():
    m = conv_ldm(1)  # pointwise: every patch gives the whole image's values, the weights normalise away
    x, c, t = torch.randn(1, 4, 10, 10), torch.randn(1, 4, 10, 10), torch.tensor([1])
    whole = m.apply_model(x, t, c)
    m.split_input_params = split(ks=(4, 4), stride=(4, 4))  # 10 = 4 + 4 + 2: a last patch flush with the edge
    assert torch.allclose(m.apply_model(x, t, c), whole, atol=1e-6)

    m = conv_ldm(3)  # 3x3: differs only on pixels at an inner patch border of some covering patch
    whole = m.apply_model(x, t, c)
    m.split_input_params = split(ks=(6, 6), stride=(4, 4))
    patched = m.apply_model(x, t, c)
    assert torch.isfinite(patched).all()
    border = torch.zeros(10, 10, dtype=torch.bool)
    for y0 in patch_starts(10, 6, 4):
        for x0 in patch_starts(10, 6, 4):
            for edge in (y0, y0 + 5):
                if 0 < edge < 9:
                    border[edge, x0 : x0 + 6] = True
            for edge in (x0, x0 + 5):
                if 0 < edge < 9:
                    border[y0 : y0 + 6, edge] = True
    diff = (patched - whole).abs().amax(dim=(0, 1))
    assert diff[~border].max() < 1e-5
    assert diff[border].max() > 1e-3


def test_tiny_sr_one_patch_equals_whole_image_path(tmp_path):
    m = build_tiny("sr", tmp_path).eval()
    x, lr, t = torch.randn(1, 3, 8, 8), torch.rand(1, 3, 8, 8) * 2 - 1, torch.tensor([500])
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        whole_eps, whole_dec, whole_enc = m.apply_model(x, t, lr), m.decode_first_stage(x), m.encode_first_stage(img)
        m.split_input_params = split(ks=(128, 128), stride=(64, 64), vqf=4)  # larger than the input: shrinks to it
        assert torch.allclose(m.apply_model(x, t, lr), whole_eps, atol=1e-5)
        assert torch.allclose(m.decode_first_stage(x), whole_dec, atol=1e-5)
        assert torch.allclose(m.encode_first_stage(img), whole_enc, atol=1e-5)
        assert m.split_input_params["original_image_size"] == (32, 32)

        seen = []
        m.split_input_params = split(ks=(4, 4), stride=(2, 2), vqf=4, patch_batch=2, decode_patch_batch=3,
                                     progress=lambda *a: seen.append(a))
        eps, dec = m.apply_model(x, t, lr), m.decode_first_stage(x)
        m.split_input_params = split(ks=(16, 16), stride=(8, 8), vqf=4, progress=lambda *a: seen.append(a))
        enc = m.encode_first_stage(img)
    assert eps.shape == whole_eps.shape and dec.shape == (1, 3, 32, 32) and enc.shape == (1, 3, 8, 8)
    assert all(torch.isfinite(v).all() for v in (eps, dec, enc))
    assert not torch.allclose(dec, whole_dec, atol=1e-3) and not torch.allclose(enc, whole_enc, atol=1e-3)
    assert seen[-1] == ("encode", 9, 9) and ("unet", 9, 9) in seen and ("decode", 9, 9) in seen
    assert ("unet", 2, 9) in seen and ("decode", 3, 9) in seen  # patches per forward pass


def test_patch_batch_does_not_change_the_numbers(tmp_path):
    m = build_tiny("sr", tmp_path).eval()
    x, lr, t = torch.randn(2, 3, 12, 12), torch.rand(2, 3, 12, 12), torch.tensor([10, 900])
    out = []
    with torch.no_grad():
        for batch in (1, 4):
            m.split_input_params = split(ks=(8, 8), stride=(4, 4), patch_batch=batch, decode_patch_batch=batch)
            out.append((m.apply_model(x, t, lr), m.decode_first_stage(x)))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5) and torch.allclose(out[0][1], out[1][1], atol=1e-5)


def test_crossattn_context_goes_to_every_patch():
    seen = []

    class Ctx(torch.nn.Module):
        def forward(self, x, t, context=None, y=None):
            seen.append((x.shape[0], t.shape, context.shape))
            return x * context.mean()

    m = LatentDiffusion(Ctx(), kl_first_stage(), torch.nn.Identity(), conditioning_key="crossattn",
                        timesteps=10, use_ema=False)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    whole = m.apply_model(x, torch.tensor([1, 2]), ctx)
    m.split_input_params = split(ks=(4, 4), stride=(4, 4), patch_batch=4)
    assert torch.allclose(m.apply_model(x, torch.tensor([1, 2]), ctx), whole, atol=1e-6)
    assert seen[-1] == (8, torch.Size([8]), torch.Size([8, 5, 16]))


def test_bad_split_input_params():
    m = conv_ldm(1)
    with pytest.raises(ValueError, match="unknown split_input_params"):
        m.split_input_params = split(kernel=3)
    with pytest.raises(ValueError, match="ks"):
        m.split_input_params = split(ks=(0, 4))
    with pytest.raises(ValueError, match="patch_batch"):
        m.split_input_params = split(patch_batch=0)
    with pytest.raises(ValueError, match="clip_min_weight"):
        m.split_input_params = split(clip_min_weight=0.0)
    assert not hasattr(m, "split_input_params")
    m.split_input_params = split(ks=(4, 4), stride=(4, 4), vqf=4)
    with pytest.raises(ValueError, match="concat"):
        m.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 4, 4, 4))
    m.split_input_params = None
    assert not hasattr(m, "split_input_params")


def test_encode_needs_whole_latent_pixels(tmp_path):
    m = build_tiny("sr", tmp_path).eval()
    m.split_input_params = split(ks=(16, 16), stride=(6, 6), vqf=4)
    with pytest.raises(ValueError, match="multiples of 4"), torch.no_grad():
        m.encode_first_stage(torch.randn(1, 3, 32, 32))


def test_notebook_pipeline_on_tiny_sr(tmp_path):
    """Upstream's notebook flow: a low-res image as concat conditioning, DDIM with eta 1 under split_input_params,
    patch-wise decode, crop back to 4x the input."""
    from ldmcli import DDIMSampler
    from ldmcli.conditioning import superres as sr

    m = build_tiny("sr", tmp_path).eval()
    lowres = (torch.rand(10, 13, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    plan = sr.plan_upscale(10, 13, multiple=2)
    assert plan.padded_size == (10, 14) and plan.latent_shape == (3, 10, 14) and plan.output_size == (40, 52)
    c = sr.pad_to_multiple(sr.lowres_condition(lowres), 2)
    m.split_input_params = split(ks=(8, 8), stride=(4, 4), vqf=4)  # the notebook's settings, scaled to the tiny model
    with m.ema_scope():
        z, _ = DDIMSampler(m).sample(S=3, batch_size=1, shape=plan.latent_shape, conditioning=c, eta=1.0,
                                     verbose=False, generator=torch.Generator().manual_seed(1))
    images = sr.crop_output(m.decode_first_stage(z), plan)
    assert images.shape == (1, 3, 40, 52) and torch.isfinite(images).all()

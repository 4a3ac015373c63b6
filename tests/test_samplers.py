"""Sampler math on analytic denoisers (Gaussian data, where the exact eps is known), upstream's grids and quirks,
guidance batching, and the DPM-Solver++ accuracy check on a small model trained here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldmcli.models.schedule import make_beta_schedule
from ldmcli.sampling import (
    CLEAN,
    SAMPLERS,
    SPACINGS,
    DiscreteSchedule,
    InvalidSamplerSettings,
    SamplerSettings,
    classifier_free_guidance,
    ddim_timesteps,
    dpmpp_timesteps,
    eps_from_x0,
    full_timesteps,
    model_denoiser,
    sample_latents,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)
from ldmcli.sampling.accuracy import solver_errors
from ldmcli.sampling.compat import DDIMSampler, PLMSSampler

SCHEDULE = DiscreteSchedule.from_betas(make_beta_schedule("linear", 1000, 0.0015, 0.0195))
MU, STD = 0.5, 0.3  # the data distribution N(MU, STD^2), per dimension


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact E[eps | x_t] for data ~ N(MU, STD^2): x_t ~ N(sqrt(a) MU, a STD^2 + 1 - a)."""
    a = SCHEDULE.alphas_cumprod.double()[t].reshape(-1, *([1] * (x.ndim - 1)))
    eps = torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * MU) / (a * STD**2 + 1 - a)
    return eps.to(x.dtype)


def gaussian_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact E[x0 | x_t] for the same data."""
    a = SCHEDULE.alphas_cumprod.double()[t].reshape(-1, *([1] * (x.ndim - 1)))
    return ((x.double() - torch.sqrt(1 - a) * gaussian_eps(x.double(), t)) / torch.sqrt(a)).to(x.dtype)


def ode_solution(x_T: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data keeps the standardised value (x - sqrt(a) MU) / std_t."""
    ac = SCHEDULE.alphas_cumprod.double()
    a, b = ac[t_from], ac[t_to]
    z = (x_T.double() - torch.sqrt(a) * MU) / torch.sqrt(a * STD**2 + 1 - a)
    return torch.sqrt(b) * MU + torch.sqrt(b * STD**2 + 1 - b) * z


def test_ddim_grid_is_upstreams_walked_from_the_top():
    """Upstream evaluates range(0, N, N // S) + 1 and ends at alphas_cumprod[0]'s level: descending, plus that end."""
    assert ddim_timesteps(10).tolist() == list(range(901, 0, -100)) + [0]
    assert ddim_timesteps(50)[-4:].tolist() == [41, 21, 1, 0] and len(ddim_timesteps(50)) == 51
    # 1000 // 300 == 3: upstream's grid then has 334 points, the last of which (1000) is out of range
    assert len(ddim_timesteps(300)) == 334 and ddim_timesteps(300)[0] == 997
    assert ddim_timesteps(1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    with pytest.raises(ValueError):
        ddim_timesteps(1001)


def test_ddim_parameters_follow_upstreams_dtypes():
    """What makes DDIM/PLMS bit-equal to upstream: alphas are the float32 buffer values, the first previous alpha is
    alphas_cumprod[0], sqrt(1 - alpha) is numpy's float32 sqrt (torch's CPU kernel can differ in the last bit),
    sigmas are float64."""
    from ldmcli.sampling.samplers import ddim_parameters, ddim_sqrt_one_minus_alphas

    grid = ddim_timesteps(50)
    sigmas, alphas, alphas_prev = ddim_parameters(SCHEDULE.alphas_cumprod, grid, eta=1.0)
    assert alphas.dtype == torch.float32 and torch.equal(alphas, SCHEDULE.alphas_cumprod[grid[:-1]])
    assert alphas_prev.dtype == np.float64 and alphas_prev[-1] == SCHEDULE.alphas_cumprod[0].item()
    assert alphas_prev.tolist() == SCHEDULE.alphas_cumprod[grid[1:]].tolist()
    assert sigmas.dtype == torch.float64
    sqrt = ddim_sqrt_one_minus_alphas(alphas)
    assert sqrt.dtype == torch.float32 and np.array_equal(sqrt.numpy(), np.sqrt(1.0 - alphas.numpy()))
    expected = np.sqrt((1 - alphas_prev) / (1 - alphas.double().numpy()) * (1 - alphas.double().numpy() / alphas_prev))
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-6)


def test_ddim_step_matches_the_formula_in_float64():
    """One DDIM step (eta 0): x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps, a_prev = alphas_cumprod[0]."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(gaussian_eps, x, SCHEDULE, [501, 1, 0])
    ac = SCHEDULE.alphas_cumprod.double()
    ref = x.double()
    for t, prev in ((501, ac[1]), (1, ac[0])):
        e = gaussian_eps(ref, torch.full((2,), t))
        x0 = (ref - torch.sqrt(1 - ac[t]) * e) / torch.sqrt(ac[t])
        ref = torch.sqrt(prev) * x0 + torch.sqrt(1 - prev) * e
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def _ode_error(sampler, steps: int) -> float:
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    if sampler == "dpmpp":
        out = sample_dpmpp_2m(gaussian_eps, x, SCHEDULE, dpmpp_timesteps(SCHEDULE, steps))
        exact = ode_solution(x, 999, 0)
    else:
        grid = ddim_timesteps(steps)  # from t = grid[0] down to the level of alphas_cumprod[0]
        out = (sample_ddim if sampler == "ddim" else sample_plms)(gaussian_eps, x, SCHEDULE, grid)
        exact = ode_solution(x, int(grid[0]), 0)
    return ((out.double() - exact).norm() / exact.norm()).item()


def test_deterministic_samplers_solve_the_gaussian_ode():
    """DDIM converges at first order, PLMS and DPM-Solver++ much faster (measured: DDIM 0.055 at 50 steps and 0.0069
    at 500; PLMS 0.0064 at 50 and 0.00027 at 100; DPM-Solver++ 0.0026 at 25 and 0.0011 at 50)."""
    assert 6 < _ode_error("ddim", 50) / _ode_error("ddim", 500) < 10
    assert _ode_error("ddim", 500) < 0.01
    assert _ode_error("plms", 100) < 1e-3
    assert _ode_error("dpmpp", 25) < 4e-3
    assert _ode_error("dpmpp", 50) < 0.5 * _ode_error("dpmpp", 25)


def _chain_law(steps: list[tuple[int, float, float]]) -> tuple[float, float]:
    """The exact mean and std after a linear Gaussian chain started from N(0, 1): for each (t, alpha_prev, sigma)
    x <- sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z, with the exact x0_hat(x_t) and
    eps_hat(x_t)."""
    ac = SCHEDULE.alphas_cumprod.double().numpy()
    mean, var = 0.0, 1.0
    for t, a_prev, sigma in steps:
        a = ac[t]
        k = math.sqrt(a) * STD**2 / (a * STD**2 + 1 - a)  # d x0_hat / d x_t
        c_eps = math.sqrt(max(1 - a_prev - sigma**2, 0.0))
        coef = math.sqrt(a_prev) * k + c_eps * (1 - math.sqrt(a) * k) / math.sqrt(1 - a)
        x0_mean = MU + k * (mean - math.sqrt(a) * MU)
        mean = math.sqrt(a_prev) * x0_mean + c_eps * (mean - math.sqrt(a) * x0_mean) / math.sqrt(1 - a)
        var = coef**2 * var + sigma**2
    return mean, math.sqrt(var)


def test_ddpm_and_stochastic_ddim_sample_the_data_distribution():
    """Means and stds match the exact law of each discrete chain (which shrinks the variance slightly: 0.291 for
    DDPM where the data has 0.3) to sampling error (std of the
    estimates about 0.0015 and 0.0008)."""
    ac = SCHEDULE.alphas_cumprod.double().numpy()
    x = torch.randn(1, 20000, generator=torch.Generator().manual_seed(2))
    out = sample_ddpm(gaussian_eps, x, SCHEDULE, full_timesteps(1000), generator=torch.Generator().manual_seed(3))
    ac_prev = np.append(1.0, ac[:-1])
    var = (1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)  # DDPM's posterior variance = DDIM's sigma^2 at eta 1
    mean, std = _chain_law([(t, ac_prev[t], math.sqrt(var[t]) if t > 0 else 0.0) for t in range(999, -1, -1)])
    assert abs(out.mean().item() - mean) < 0.005 and abs(out.std().item() - std) < 0.005, (out.std(), std)

    grid = ddim_timesteps(50)
    x = torch.randn(1, 100000, generator=torch.Generator().manual_seed(2))
    out = sample_ddim(gaussian_eps, x, SCHEDULE, grid, eta=1.0, generator=torch.Generator().manual_seed(4))
    evaluated, prevs = grid[:-1], ac[grid[1:]]
    sigmas = np.sqrt((1 - prevs) / (1 - ac[evaluated]) * (1 - ac[evaluated] / prevs))
    mean, std = _chain_law([(evaluated[i], prevs[i], sigmas[i]) for i in range(len(evaluated))])
    assert abs(out.mean().item() - mean) < 0.004 and abs(out.std().item() - std) < 0.004, (out.std(), std)


def test_ddpm_last_step_adds_no_noise():
    seen = []
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    sample_ddpm(gaussian_eps, x, SCHEDULE, [1, 0, CLEAN], callback=seen.append)
    assert [s.t for s in seen] == [1, 0]
    # at t = 0 the result is the posterior mean, i.e. x0_hat (posterior_mean_coef2[0] == 0)
    torch.testing.assert_close(seen[-1].x, seen[-1].pred_x0)


def test_per_sample_generators_make_images_independent_of_their_batch():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(6))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sample_ddim(gaussian_eps, x, SCHEDULE, ddim_timesteps(10), eta=1.0, generator=gens([7, 8, 9]))
    alone = sample_ddim(gaussian_eps, x[1:2], SCHEDULE, ddim_timesteps(10), eta=1.0, generator=gens([8]))
    assert torch.equal(batch[1:2], alone)
    batch = sample_ddpm(gaussian_eps, x, SCHEDULE, full_timesteps(20), generator=gens([7, 8, 9]))
    alone = sample_ddpm(gaussian_eps, x[2:], SCHEDULE, full_timesteps(20), generator=gens([9]))
    assert torch.equal(batch[2:], alone)


def test_plms_first_step_evaluates_twice_and_takes_no_eta():
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return gaussian_eps(x, t)

    sample_plms(counting, torch.zeros(1, 4), SCHEDULE, ddim_timesteps(10))
    assert calls[:3] == [901, 801, 801] and len(calls) == 11
    with pytest.raises(TypeError, match="eta"):  # PLMS is deterministic: it has no eta to reject
        sample_plms(counting, torch.zeros(1, 4), SCHEDULE, ddim_timesteps(10), eta=0.5)


class _RecordingModel:
    """A fake LatentDiffusion: apply_model returns cond (broadcast) and records every call."""

    parameterization = "eps"

    def __init__(self):
        self.calls = []
        for name, value in vars(SCHEDULE).items():
            setattr(self, name, value)
        self.num_timesteps = 1000

    def apply_model(self, x, t, cond):
        self.calls.append((x.shape[0], cond.clone()))
        return cond.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()


def test_guidance_batches_uncond_first_in_one_call():
    model = _RecordingModel()
    cond, uncond = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    eps = classifier_free_guidance(model.apply_model, cond, uncond, scale=4.0)
    out = eps(torch.zeros(2, 3), torch.tensor([10, 10]))
    assert len(model.calls) == 1
    batch, c_in = model.calls[0]
    assert batch == 4 and c_in.tolist() == [0.5, 0.5, 2.0, 3.0]
    expected = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out, expected[:, None].expand(2, 3))


def test_guidance_scale_one_skips_the_unconditional_half():
    model = _RecordingModel()
    eps = model_denoiser(model, torch.tensor([2.0]), torch.tensor([0.0]), scale=1.0)
    eps(torch.zeros(1, 3), torch.tensor([5]))
    assert [(b, c.tolist()) for b, c in model.calls] == [(1, [2.0])]


def test_guidance_handles_dict_conditioning():
    seen = {}

    def apply(x, t, cond):
        seen.update(cond)
        return torch.zeros_like(x)

    cond = {"c_crossattn": [torch.ones(1, 2)], "c_concat": [torch.full((1, 2), 2.0)]}
    uncond = {"c_crossattn": [torch.zeros(1, 2)], "c_concat": [torch.full((1, 2), 2.0)]}
    classifier_free_guidance(apply, cond, uncond, 3.0)(torch.zeros(1, 2), torch.tensor([1]))
    assert seen["c_crossattn"][0][:, 0].tolist() == [0.0, 1.0]


def test_x0_parameterised_models_sample_like_eps_models():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    via_x0 = sample_ddim(eps_from_x0(gaussian_x0, SCHEDULE), x, SCHEDULE, ddim_timesteps(20))
    via_eps = sample_ddim(gaussian_eps, x, SCHEDULE, ddim_timesteps(20))
    torch.testing.assert_close(via_x0, via_eps, rtol=1e-4, atol=1e-4)

    class X0Model(_RecordingModel):
        parameterization = "x0"

        def apply_model(self, x, t, cond):
            return gaussian_x0(x, t)

    out = sample_ddim(model_denoiser(X0Model()), x, SCHEDULE, ddim_timesteps(20))
    torch.testing.assert_close(out, via_eps, rtol=1e-4, atol=1e-4)


def test_compat_samplers_follow_upstreams_interface():
    model = _RecordingModel()
    model.apply_model = lambda x, t, c: gaussian_eps(x, t)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    steps = []
    samples, inter = DDIMSampler(model).sample(
        S=10, batch_size=2, shape=[3, 4, 4], conditioning=None, eta=0.0, x_T=x_T, callback=steps.append,
        verbose=False, log_every_t=5,
    )
    assert steps == list(range(10))
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + 3  # x_T, index 9, 5 and 0
    torch.testing.assert_close(samples, sample_ddim(gaussian_eps, x_T, SCHEDULE, ddim_timesteps(10)))
    samples, _ = PLMSSampler(model).sample(S=10, batch_size=2, shape=[3, 4, 4], x_T=x_T)
    torch.testing.assert_close(samples, sample_plms(gaussian_eps, x_T, SCHEDULE, ddim_timesteps(10)))
    with pytest.raises(ValueError, match="ddim_eta must be 0"):
        PLMSSampler(model).sample(S=10, batch_size=2, shape=[3, 4, 4], eta=1.0)
    with pytest.raises(ValueError, match="mask"):
        DDIMSampler(model).sample(S=10, batch_size=2, shape=[3, 4, 4], mask=torch.ones(1))


def test_dpmpp_grid():
    grid = dpmpp_timesteps(SCHEDULE, 20)
    assert grid[0] == 999 and grid[-1] == 0 and len(grid) == 21 and np.all(np.diff(grid) < 0)
    assert dpmpp_timesteps(SCHEDULE, 4, spacing="time").tolist() == [999, 749, 500, 250, 0]
    assert len(dpmpp_timesteps(SCHEDULE, 2000)) <= 1000
    with pytest.raises(ValueError):
        dpmpp_timesteps(SCHEDULE, 10, spacing="karras")


# ------------------------------------------------------------------------------------------ the sampler contract


def test_every_registered_grid_is_descending_and_ends_where_the_sampler_ends():
    for name, spec in SAMPLERS.items():
        for spacing in spec.spacings:
            grid = SPACINGS[spacing](SCHEDULE, 10)
            assert grid[0] <= 999 and grid[-1] in (0, CLEAN) and np.all(np.diff(grid) < 0), (name, spacing)
        assert np.array_equal(spec.grid_fn(SCHEDULE, 10), SPACINGS[spec.spacings[0]](SCHEDULE, 10)), name
    assert SPACINGS["full"](SCHEDULE, 10)[-2:].tolist() == [0, CLEAN]


def test_samplers_refuse_grids_against_the_contract():
    x = torch.zeros(1, 4)
    for sample in (sample_ddim, sample_plms, sample_dpmpp_2m):
        with pytest.raises(ValueError, match="descending"):
            sample(gaussian_eps, x, SCHEDULE, [1, 101, 201])
        with pytest.raises(ValueError, match="two points"):
            sample(gaussian_eps, x, SCHEDULE, [500])
        with pytest.raises(ValueError, match="lie in"):
            sample(gaussian_eps, x, SCHEDULE, [1000, 0])
    with pytest.raises(ValueError, match="one timestep at a time"):
        sample_ddpm(gaussian_eps, x, SCHEDULE, [10, 5, CLEAN])


def test_ending_at_clean_is_a_final_denoising_step():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(11))
    for sample in (sample_ddim, sample_dpmpp_2m):
        seen = []
        out = sample(gaussian_eps, x, SCHEDULE, [999, 500, 0, CLEAN], callback=seen.append)
        torch.testing.assert_close(out, seen[-1].pred_x0)
        torch.testing.assert_close(out, gaussian_x0(seen[-2].x, torch.zeros(3, dtype=torch.long)))


class _GaussianModel:
    """A LatentDiffusion-like wrapper around the analytic eps (conditioning ignored), counting its calls."""

    parameterization = "eps"
    num_timesteps = 1000

    def __init__(self):
        for name, value in vars(SCHEDULE).items():
            setattr(self, name, value)
        self.calls = 0

    def apply_model(self, x, t, cond):
        self.calls += 1
        return gaussian_eps(x, t)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_latents_runs_each_registered_sampler_as_its_function(name):
    spec = SAMPLERS[name]
    settings = SamplerSettings(name, 10, 0.0, 1.0)
    settings.validate()
    model = _GaussianModel()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(12))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    steps = []
    out = sample_latents(model, x, None, None, settings, generator=gens, callback=steps.append)
    grid = settings.timesteps(SCHEDULE)
    assert model.calls == spec.model_calls(grid) == settings.model_calls(SCHEDULE)
    assert len(steps) == settings.num_steps(SCHEDULE) == len(grid) - 1 and steps[-1].total == len(grid) - 1
    assert [s.t for s in steps] == grid[:-1].tolist()
    options = {"generator": [torch.Generator().manual_seed(s) for s in (1, 2)]} if spec.stochastic else {}
    torch.testing.assert_close(out, spec.sample_fn(gaussian_eps, x, SCHEDULE, grid, **options), rtol=0, atol=0)


def test_settings_errors_are_value_errors_that_name_no_flag():
    from ldmcli.errors import UsageError

    for settings, words in [
        (SamplerSettings("euler"), "unknown sampler 'euler'"),
        (SamplerSettings("ddim", 0), "steps must be between 1 and 1000, got 0"),
        (SamplerSettings("dpmpp", 1001), "steps must be between 1 and 1000"),
        (SamplerSettings("ddim", 10, -1.0), "eta must be >= 0"),
        (SamplerSettings("plms", 10, 0.5), "eta applies to DDIM only"),
        (SamplerSettings("auto", 10, 0.5), "eta applies to DDIM only"),
        (SamplerSettings("ddim", 10, 0.0, float("nan")), "guidance scale"),
        (SamplerSettings("plms", 10, spacing="logsnr"), "spacing 'logsnr' does not apply to plms"),
        (SamplerSettings("auto", 10, spacing="time"), "auto chooses"),
    ]:
        with pytest.raises(InvalidSamplerSettings, match=words) as info:
            settings.validate()
        assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)
        assert "--" not in str(info.value)
    SamplerSettings("ddpm", 0).validate()  # ancestral sampling walks every timestep whatever the steps
    SamplerSettings("ddim", 20, spacing="logsnr").validate()
    with pytest.raises(InvalidSamplerSettings, match="between 1 and 100"):
        SamplerSettings("ddim", 101).validate(100)


def test_auto_resolves_to_a_registered_deterministic_sampler_for_every_scale():
    for scale in (1.0, 3.0, 5.0, 7.5, 20.0):
        auto = SamplerSettings("auto", 50, 0.0, scale)
        auto.validate()
        chosen = auto.resolve()
        assert chosen.sampler in SAMPLERS and not SAMPLERS[chosen.sampler].stochastic and chosen.scale == scale
        assert chosen.spacing in SAMPLERS[chosen.sampler].spacings and chosen.resolve() == chosen
        assert auto.num_steps(SCHEDULE) == chosen.num_steps(SCHEDULE) <= chosen.steps
        assert np.array_equal(auto.timesteps(SCHEDULE), chosen.timesteps(SCHEDULE))
    plain = SamplerSettings("ddim", 50)
    assert plain.resolve() is plain


# ------------------------------------------------------------------------------------- DPM-Solver++ acceptance


class _TinyEpsNet(torch.nn.Module):
    """An MLP eps-model on 2-d points with a low-frequency sinusoidal embedding of t / 1000."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.freqs = torch.exp(torch.linspace(0, math.log(30), 8))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 16, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = (t.float() / 1000)[:, None] * self.freqs[None]
        return self.net(torch.cat([x, torch.cos(angles), torch.sin(angles)], dim=1))


def test_dpmpp_20_steps_beats_ddim_50_against_a_1000_step_ddim_solution(capsys):
    """Acceptance (issue 4): on a small model trained here (eps-prediction, the LDM linear schedule, a mixture of three
    2-d Gaussians), DPM-Solver++(2M) with 20 steps lands closer to the 1000-step DDIM (eta 0) solution than DDIM with
    50 steps does. All three solve the same ODE, from t = 999 to the level of t = 0 (so DDIM-50 here uses 50 evenly
    spaced steps over that span, not upstream's grid, which starts at 981). Measured: 0.0139 vs 0.0224 RMS (other
    seeds: 0.0158 vs 0.0228, 0.0100 vs 0.0184); with time-uniform instead of logSNR-uniform steps DPM-Solver++ is far
    worse (0.09), hence the logSNR default."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.3, -1.2]])
    net = _TinyEpsNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ac = SCHEDULE.alphas_cumprod
    for _ in range(600):
        x0 = centres[torch.randint(0, 3, (128,), generator=gen)] + 0.3 * torch.randn(128, 2, generator=gen)
        t = torch.randint(0, 1000, (128,), generator=gen)
        noise = torch.randn(128, 2, generator=gen)
        a = ac[t][:, None]
        loss = torch.nn.functional.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x_T = torch.randn(256, 2, generator=gen)
    errors = solver_errors(net, x_T, SCHEDULE, dpmpp_steps=20, ddim_steps=50)
    with capsys.disabled():
        print(f"\n[dpm-solver++ acceptance] RMS error vs 1000-step DDIM: DPM-Solver++(2M) 20 steps "
              f"{errors['dpmpp']:.4f}, DDIM 50 steps {errors['ddim']:.4f} "
              f"(ratio {errors['dpmpp'] / errors['ddim']:.2f})")
    assert errors["dpmpp"] < errors["ddim"]
    time_spaced = solver_errors(net, x_T, SCHEDULE, spacing="time")
    assert time_spaced["dpmpp"] > errors["dpmpp"]  # why the default grid is uniform in logSNR

"""The shared noise schedule and the DDIM sampler: analytic oracles, round trips, and step-by-step parity with
diffusers' DDIMScheduler (DESIGN cause 4: first step at t = T-1, eps re-derived after clipping, consecutive
timestep pairs for any step count; cause 6: clipping reported). Everything numerical runs in float64."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from configs.schema import DiffusionConfig
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.sampler import clip_x0, ddim_sample
from model.schedule import NoiseSchedule

F64 = torch.float64
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction")


def schedule(prediction_type: str = "epsilon", beta_schedule: str = "linear", T: int = 1000, snr_gamma=0.0):
    return NoiseSchedule(DiffusionConfig(num_train_timesteps=T, beta_schedule=beta_schedule,
                                         prediction_type=prediction_type, snr_gamma=snr_gamma))


def reference_alpha_bar(beta_schedule: str = "linear", T: int = 1000) -> torch.Tensor:
    """alpha_bar_t from diffusers' own betas, computed independently of NoiseSchedule; index t+1, with 1 at t=-1."""
    betas = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule).betas.to(F64)
    return torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - betas, 0)])


def oracle(x0: torch.Tensor, prediction_type: str, T: int = 1000):
    """The perfect denoiser for a known x0: the exact eps (or v) such that x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""
    ab_ref = reference_alpha_bar(T=T)

    def denoise(x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        ab = ab_ref[t + 1].reshape(-1, *[1] * (x_t.ndim - 1))
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return denoise


def random_denoiser(channels: int = 3, seed: int = 0):
    """A fixed random nonlinear function of (x_t, t): channel mixing, tanh, and a t-dependent offset."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels, generator=g, dtype=F64)
    b = torch.randn(channels, 1, 1, generator=g, dtype=F64)

    def denoise(x_t, t):
        mixed = torch.einsum("oc,bchw->bohw", w, x_t)
        return 1.5 * torch.tanh(mixed) + 0.3 * x_t + b * torch.cos(t.to(F64) / 300).reshape(-1, 1, 1, 1)

    return denoise


def trajectory(**kw):
    """Run ddim_sample and return (final x0, list of per-step callback dicts)."""
    infos = []
    out = ddim_sample(callback=infos.append, **kw)
    return out, infos


# ================================================================ schedule

@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_betas_equal_diffusers_and_the_analytic_formula(beta_schedule):
    T, b0, b1 = 1000, 1e-4, 0.02
    s = schedule(beta_schedule=beta_schedule)
    ddpm = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=b0, beta_end=b1)
    assert s.betas.dtype == F64 and s.betas.shape == (T,)
    torch.testing.assert_close(s.betas, ddpm.betas.to(F64), rtol=0, atol=0)
    if beta_schedule == "linear":
        analytic = torch.linspace(b0, b1, T, dtype=F64)
    elif beta_schedule == "scaled_linear":
        analytic = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=F64) ** 2
    else:  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        analytic = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=F64)
    torch.testing.assert_close(s.betas, analytic, rtol=1e-6, atol=1e-9)  # diffusers builds them in float32
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0), rtol=0, atol=0)
    # the sampler's alpha_bar agrees with what diffusers' DDIM would use for the same betas
    ddim = DDIMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=b0, beta_end=b1)
    torch.testing.assert_close(s.alphas_cumprod, ddim.alphas_cumprod.to(F64), rtol=2e-5, atol=1e-7)


def test_alpha_bar_indexing():
    s = schedule()
    ab = reference_alpha_bar()
    assert s.alpha_bar(-1).item() == 1.0
    t = torch.tensor([-1, 0, 1, 500, 999])
    torch.testing.assert_close(s.alpha_bar(t), ab[t + 1], rtol=0, atol=0)
    assert s.alpha_bar(torch.tensor(999)).item() < 1e-4 < s.alpha_bar(torch.tensor(0)).item()


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_add_noise_target_split_output_round_trip(prediction_type):
    s = schedule(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = 2 * torch.randn(6, 2, 4, 5, 5, generator=g, dtype=F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ab = reference_alpha_bar()[t + 1].reshape(-1, 1, 1, 1, 1)
    x_t = s.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, rtol=0, atol=1e-12)
    target = s.target(x0, noise, t)
    expected = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-12)
    x0_back, eps_back = s.split_output(target, x_t, t)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_back, noise, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.eps_from_x0(x0, x_t, t), noise, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_add_noise_and_target_match_diffusers(prediction_type):
    s = schedule(prediction_type)
    ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 8, 3, 4, 4, generator=g).unbind(0)
    t = torch.tensor([0, 10, 100, 400, 700, 900, 990, 999])
    torch.testing.assert_close(s.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(s.target(x0, noise, t), ddpm.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_min_snr_weights(prediction_type):
    gamma = 5.0
    t = torch.arange(1000)
    assert torch.equal(schedule(prediction_type).loss_weights(t), torch.ones(1000))  # snr_gamma = 0: off
    w = schedule(prediction_type, snr_gamma=gamma).loss_weights(t)
    # diffusers' compute_snr works from its float32 alphas_cumprod; the formula is what is checked here
    ac = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(F64)
    snr = ac / (1 - ac)
    expected = torch.clamp(snr, max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert w.dtype == torch.float32 and w.shape == (1000,)
    torch.testing.assert_close(w.to(F64), expected, rtol=1e-5, atol=0)
    if prediction_type == "epsilon":  # weight 1 where snr <= gamma (noisy t), gamma/snr < 1 where cleaner
        assert torch.all(w[snr <= gamma] == 1) and torch.all(w[snr > gamma] < 1)
        assert (snr <= gamma).any() and (snr > gamma).any()
    else:
        assert torch.all(w < 1) and torch.all(w > 0)


# ---------------------------------------------------------------- timesteps

@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_are_n_distinct_descending_valid_for_every_n(T, spacing):
    """For every step count: n model-call timesteps, strictly descending, inside [0, T-1]. Before the fix,
    trailing spacing gave n+1 timesteps ending at t = -1 for n = 61, 103, 121, ... of 1000 (float np.arange)."""
    s = schedule(T=T)
    for n in range(1, T + 1):
        ts = s.timesteps(n, spacing)
        assert len(ts) == n, (n, ts[-3:])
        assert all(a > b for a, b in zip(ts, ts[1:])), n
        assert 0 <= ts[-1] and ts[0] <= T - 1, (n, ts[0], ts[-1])
        if spacing == "trailing":
            assert ts[0] == T - 1
        if spacing == "linspace" and n > 1:  # n = 1 gives [0] as in diffusers (pure noise taken as x_0)
            assert ts[0] == T - 1 and ts[-1] == 0


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_equal_diffusers_wherever_diffusers_is_valid(spacing):
    """Equal to DDIMScheduler.set_timesteps for the same spacing, except where diffusers' own list is broken
    (trailing: n+1 entries with a -1 for some n), where ours is still the n-entry schedule."""
    s = schedule()
    ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    broken = []
    for n in range(1, 1001):
        ddim.set_timesteps(n)
        theirs = ddim.timesteps.tolist()
        if len(theirs) == n and min(theirs) >= 0:
            assert s.timesteps(n, spacing) == theirs, n
        else:
            broken.append(n)
            assert theirs[:n] == s.timesteps(n, spacing), n  # same schedule, minus diffusers' stray -1
    if spacing == "trailing":
        assert 61 in broken
    else:
        assert broken == []


def test_first_model_timestep_trailing_vs_leading():
    """20 of 1000 steps: trailing starts at t = 999 (pure noise, Lin et al. 2024). Leading starts at 950, i.e.
    the sampler would feed pure noise as if it were x_950: the sampler-mismatch bug (DESIGN cause 4) that the
    diagnosis looks for."""
    s = schedule()
    assert s.timesteps(20) == list(range(999, 0, -50))
    assert s.timesteps(20, "leading") == list(range(950, -1, -50))
    assert s.timesteps(20, "linspace")[:2] == [999, 946]


@pytest.mark.parametrize("n", [1, 7, 13, 20, 61, 999, 1000])
def test_step_pairs_are_consecutive_and_end_at_minus_one(n):
    s = schedule()
    ts = s.timesteps(n)
    pairs = s.step_pairs(n)
    assert [t for t, _ in pairs] == ts
    assert [tp for _, tp in pairs] == ts[1:] + [-1]
    assert s.alpha_bar(pairs[-1][1]).item() == 1.0


def test_timesteps_reject_bad_arguments():
    s = schedule()
    for n in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            s.timesteps(n)
    with pytest.raises(ValueError, match="spacing"):
        s.timesteps(10, "karras")


# ================================================================ sampler: oracle

@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 7, 20, 50, 1000])
def test_oracle_denoiser_recovers_x0(prediction_type, steps):
    s = schedule(prediction_type)
    g = torch.Generator().manual_seed(steps)
    x0 = 1.5 * torch.randn(3, 4, 6, 6, generator=g, dtype=F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    out = ddim_sample(oracle(x0, prediction_type), noise, s, steps, eta=0.0)
    assert out.dtype == F64
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_oracle_with_eta_lands_on_x0_and_keeps_the_marginals(prediction_type, eta):
    """With eta > 0 each x_t must be a draw from q(x_t | x0) = N(sqrt(ab) x0, (1 - ab) I) (DDIM eq. 16 keeps the
    marginals); the last step (to ab = 1) has sigma = 0 and lands on x0."""
    s = schedule(prediction_type)
    n_samples, dim, steps = 2000, 16, 10
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-2, 2, dim, dtype=F64).expand(n_samples, dim).contiguous()
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    out, infos = trajectory(denoise=oracle(x0, prediction_type), noise=noise, schedule=s, num_steps=steps, eta=eta,
                            generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    assert len(infos) == steps
    x_finals = [infos[i + 1]["x_t"] for i in range(steps - 1)] + [out]
    stochastic = 0
    for info, x_next in zip(infos, x_finals):
        ab = s.alpha_bar(info["t"]).item()
        r = (info["x_t"] - ab ** 0.5 * x0[0]) / (1 - ab) ** 0.5  # should be standard normal, iid
        assert abs(r.mean().item()) < 0.02, (info["t"], r.mean().item())
        assert abs(r.std().item() - 1) < 0.02, (info["t"], r.std().item())
        assert (r.mean(0).abs() < 0.1).all() and ((r.std(0) - 1).abs() < 0.08).all()
        # a stochastic step: x_{t_prev} is not the deterministic (eta = 0) update
        ab_prev = s.alpha_bar(info["t_prev"]).item()
        deterministic = ab_prev ** 0.5 * info["x0_pred"] + (1 - ab_prev) ** 0.5 * info["eps_pred"]
        stochastic += int(not torch.allclose(x_next, deterministic))
    assert stochastic == steps - 1  # every step but the last (sigma = 0 there)


# ================================================================ sampler: parity with diffusers

@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("clip", ["none", "static"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_trajectory_equals_diffusers_ddim(prediction_type, clip, eta):
    """20 of 1000 steps, trailing, against DDIMScheduler(set_alpha_to_one=True, clip_sample=<on/off>,
    clip_sample_range=bound).step(..., use_clipped_model_output=True). For eta > 0 diffusers gets the SAME noise:
    the sampler draws one randn(x.shape) per step with sigma > 0 from its generator; the reference loop draws
    the same sequence from a generator with the same seed and passes it as variance_noise. float64 throughout:
    diffusers' alphas_cumprod (float32) is replaced by the schedule's float64 one after checking they agree."""
    steps, bound, seed = 20, 1.0, 123
    s = schedule(prediction_type)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type=prediction_type, timestep_spacing="trailing", set_alpha_to_one=True,
                        steps_offset=0, clip_sample=clip == "static", clip_sample_range=bound, thresholding=False)
    torch.testing.assert_close(ref.betas.to(F64), s.betas, rtol=0, atol=0)
    torch.testing.assert_close(ref.alphas_cumprod.to(F64), s.alphas_cumprod, rtol=2e-5, atol=1e-7)
    ref.alphas_cumprod = s.alphas_cumprod.clone()
    ref.set_timesteps(steps)

    denoise = random_denoiser()
    noise = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(7), dtype=F64)
    out, infos = trajectory(denoise=denoise, noise=noise, schedule=s, num_steps=steps, eta=eta, spacing="trailing",
                            clip=clip, clip_bound=bound, generator=torch.Generator().manual_seed(seed))

    assert [i["t"] for i in infos] == ref.timesteps.tolist()
    g_ref = torch.Generator().manual_seed(seed)
    sample = noise.clone()
    for i, t in enumerate(ref.timesteps):
        torch.testing.assert_close(infos[i]["x_t"], sample, rtol=1e-10, atol=1e-10)
        last = i == steps - 1
        z = torch.zeros_like(sample) if (eta == 0 or last) else torch.randn(sample.shape, generator=g_ref, dtype=F64)
        model_out = denoise(sample, torch.full((sample.shape[0],), int(t)))
        res = ref.step(model_out, t, sample, eta=eta, use_clipped_model_output=True, variance_noise=z)
        torch.testing.assert_close(infos[i]["x0_pred"], res.pred_original_sample, rtol=1e-10, atol=1e-10)
        sample = res.prev_sample
        assert sample.dtype == F64
    torch.testing.assert_close(out, sample, rtol=1e-10, atol=1e-10)
    if clip == "static":
        assert sum(i["num_clipped"] for i in infos) > 0  # the comparison exercised clipping


# ================================================================ sampler: mechanics

@pytest.mark.parametrize("steps, spacing", [(7, "trailing"), (13, "trailing"), (61, "trailing"),
                                            (1000, "trailing"), (7, "leading"), (7, "linspace")])
def test_sampler_visits_the_schedule_pairs(steps, spacing):
    """Model calls at exactly the schedule's timesteps, each step to the next one in the schedule, the last to
    t = -1 (alpha_bar = 1). Before the timestep fix, 61 steps called the model at t = -1 and divided by zero."""
    s = schedule()
    seen = []

    def denoise(x_t, t):
        seen.append(int(t[0]))
        assert (t == t[0]).all()
        return random_denoiser()(x_t, t)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    out, infos = trajectory(denoise=denoise, noise=noise, schedule=s, num_steps=steps, spacing=spacing,
                            clip="static", clip_bound=1.0)
    assert seen == s.timesteps(steps, spacing) == [i["t"] for i in infos]
    assert [i["t_prev"] for i in infos] == seen[1:] + [-1]
    assert [i["step"] for i in infos] == list(range(steps))
    assert min(seen) >= 0 and torch.isfinite(out).all()
    torch.testing.assert_close(out, infos[-1]["x0_pred"], rtol=0, atol=1e-12)  # alpha_bar(-1) = 1: lands on x0


def test_first_model_call_is_t999_for_20_trailing_and_950_for_leading():
    s = schedule()
    noise = torch.randn(1, 3, 4, 4, dtype=F64)
    _, trailing = trajectory(denoise=random_denoiser(), noise=noise, schedule=s, num_steps=20, spacing="trailing")
    _, leading = trajectory(denoise=random_denoiser(), noise=noise, schedule=s, num_steps=20, spacing="leading")
    assert trailing[0]["t"] == 999 and len(trailing) == 20
    assert leading[0]["t"] == 950  # the bug DESIGN cause 4 names: pure noise treated as x_950


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_clipping_bounds_x0_and_eps_is_rederived(prediction_type, mode):
    s = schedule(prediction_type)
    bound, pct = 1.0, 0.9
    noise = 2 * torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    out, infos = trajectory(denoise=random_denoiser(), noise=noise, schedule=s, num_steps=10, clip=mode,
                            clip_bound=bound, clip_percentile=pct)
    total = 0
    for info in infos:
        raw, x0, eps, x_t = info["x0_pred_raw"], info["x0_pred"], info["eps_pred"], info["x_t"]
        if mode == "static":
            limit = torch.full((raw.shape[0],), bound, dtype=F64)
        else:
            limit = torch.quantile(raw.abs().flatten(1), pct, dim=1).clamp(min=bound)
        limit = limit.reshape(-1, 1, 1, 1)
        over = raw.abs() > limit
        assert (x0.abs() <= limit + 1e-12).all()
        torch.testing.assert_close(x0, raw.clamp(-limit, limit), rtol=0, atol=0)
        assert info["num_clipped"] == int(over.sum())
        assert info["clip_fraction"] == pytest.approx(int(over.sum()) / raw.numel())
        # the pair (x0, eps) is consistent with x_t after clipping (DDIM eq. 12 needs it)
        ab = s.alpha_bar(info["t"]).item()
        torch.testing.assert_close(x_t, ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps, rtol=0, atol=1e-10)
        total += info["num_clipped"]
    assert total > 0 and (out.abs() <= infos[-1]["x0_pred"].abs().max() + 1e-12).all()


def test_clip_none_reports_zero_and_keeps_the_network_eps():
    s = schedule("epsilon")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    denoise = random_denoiser()
    _, infos = trajectory(denoise=denoise, noise=noise, schedule=s, num_steps=5, clip="none")
    for info in infos:
        assert info["num_clipped"] == 0 and info["clip_fraction"] == 0
        assert torch.equal(info["x0_pred"], info["x0_pred_raw"])
        assert torch.equal(info["eps_pred"], info["output"])
    assert infos[0]["x0_pred_raw"].abs().max() > 4  # (so clipping would have fired had it been on)


def test_clip_x0_function():
    x = torch.tensor([[[-5.0, -1.0, 0.5, 3.0]], [[0.1, -0.2, 0.3, 0.4]]], dtype=F64)  # (2, 1, 4)
    y, mask = clip_x0(x, "static", 2.0, 0.995)
    assert torch.equal(y, torch.tensor([[[-2.0, -1.0, 0.5, 2.0]], [[0.1, -0.2, 0.3, 0.4]]], dtype=F64))
    assert mask.tolist() == [[[True, False, False, True]], [[False, False, False, False]]]
    y, mask = clip_x0(x, "none", 2.0, 0.995)
    assert torch.equal(y, x) and not mask.any()
    # dynamic: per sample s = max(bound, quantile(|x0|, p)); the second sample is inside the floor: untouched
    y, mask = clip_x0(x, "dynamic", 0.5, 0.5)
    s0 = torch.quantile(torch.tensor([5.0, 1.0, 0.5, 3.0], dtype=F64), 0.5).item()  # 2.0
    assert torch.equal(y[0], x[0].clamp(-s0, s0)) and torch.equal(y[1], x[1])
    assert mask.tolist() == [[[True, False, False, True]], [[False, False, False, False]]]
    with pytest.raises(ValueError, match="clip mode"):
        clip_x0(x, "percentile", 1.0, 0.9)


def test_generator_seed_determines_the_sample():
    s = schedule()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(seed, eta=0.7):
        return ddim_sample(random_denoiser(), noise, s, 10, eta=eta, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    assert torch.equal(run(5, eta=0.0), run(6, eta=0.0))  # eta = 0 draws nothing: deterministic given x_T

"""The quality switches of issue 14, each against an oracle: the residual target (what is diffused is the change
from the last past latent), residual decoding (the last frame's VAE error added back where nothing moved), and
zero-terminal-SNR betas."""
from __future__ import annotations

import pytest
import torch

from configs.loader import ConfigError
from diagnosis.checks import OracleNet
from helpers import LATENT_CHANNELS, smooth_frames, tiny_config, tiny_kl_vae
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.schedule import NoiseSchedule
from model.vae import FrozenVAE
from model.video_prediction_diffusion import VideoPredictionDiffusion

B, TP, TF, h, w = 2, 2, 2, 8, 8
RESIDUAL = {"diffusion.target": "residual", "diffusion.residual_scale": 2.0}


@pytest.fixture(scope="module")
def vae() -> FrozenVAE:
    return FrozenVAE(tiny_kl_vae(seed=0))


def build(vae, **overrides) -> VideoPredictionDiffusion:
    torch.manual_seed(0)
    return VideoPredictionDiffusion(tiny_config(**overrides), vae)


def latents(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, TP, LATENT_CHANNELS, h, w, generator=g),
            torch.randn(B, TF, LATENT_CHANNELS, h, w, generator=g))


# ---------------------------------------------------------------- residual target

def test_residual_target_round_trips_and_is_zero_when_nothing_moves(vae):
    model = build(vae, **RESIDUAL)
    past, future = latents()
    assert torch.allclose(model.from_x0(model.to_x0(future, past), past), future, atol=1e-6)
    still = past[:, -1:].expand_as(future)
    assert model.to_x0(still, past).abs().max() == 0
    assert torch.equal(model.to_x0(future, past), (future - past[:, -1:]) * 2.0)
    absolute = build(vae)
    assert torch.equal(absolute.to_x0(future, past), future)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_trains_the_residual(vae, prediction_type):
    """A net that outputs the exact target for the residual has zero loss; one exact for the absolute latents
    does not (the loss really noises the residual)."""
    model = build(vae, **RESIDUAL, **{"diffusion.prediction_type": prediction_type, "diffusion.snr_gamma": 0.0})
    past, future = latents()
    residual_oracle = OracleNet(model.to_x0(future, past), model.schedule)
    absolute_oracle = OracleNet(future, model.schedule)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert model.loss(past, future, generator=g(), net=residual_oracle) < 1e-8
    assert model.loss(past, future, generator=g(), net=absolute_oracle) > 1e-2


def test_sampler_with_a_perfect_residual_denoiser_returns_the_future_latents(vae):
    model = build(vae, **RESIDUAL, **{"sampler.clip_x0": "none"})
    past, future = latents(1)
    out = model.predict_latents(past, net=OracleNet(model.to_x0(future, past), model.schedule),
                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, future, atol=1e-4)


# ---------------------------------------------------------------- residual decoding

def test_residual_decoding_of_a_still_prediction_is_the_last_frame_exactly(vae):
    """Predict "nothing moves" (the last past latent): full, masked and copy residual decoding give the camera's
    last frame, not its VAE reconstruction; off gives the reconstruction."""
    frames = smooth_frames(B, TP + TF, 16, 16)
    past_frames = frames[:, :TP]
    past = vae.encode(past_frames)
    still = past[:, -1:].expand(B, TF, *past.shape[2:])
    last = past_frames[:, -1:].expand(B, TF, *past_frames.shape[2:])
    for mode in ("full", "masked", "copy"):
        out = build(vae).decode_future(still, past_frames, past, mode=mode)
        assert torch.allclose(out, last, atol=1e-4), mode  # batched decodes differ by float rounding
    off = build(vae).decode_future(still, past_frames, past, mode="off")
    assert torch.allclose(off, vae.decode(still), atol=1e-6)
    assert (off - last).abs().max() > 1e-2  # the tiny VAE's reconstruction is not the frame


@pytest.mark.parametrize("mode", ["masked", "copy"])
def test_masked_residual_decoding_leaves_changed_pixels_to_the_model(vae, mode):
    model = build(vae, **{"sampler.residual_decode": mode, "sampler.residual_decode_threshold": 0.05})
    frames = smooth_frames(B, TP + TF, 16, 16)
    past_frames, past = frames[:, :TP], vae.encode(frames[:, :TP])
    future = vae.encode(frames[:, TP:])  # other frames: most pixels change by more than the threshold
    pred = vae.decode(future)
    base = vae.decode(past[:, -1:])
    moved = ((pred - base).abs().amax(2, keepdim=True) >= 0.05).expand_as(pred)
    out = model.decode_future(future, past_frames, past)
    assert moved.float().mean() > 0.3
    assert torch.allclose(out[moved], pred[moved], atol=1e-6)
    assert not torch.allclose(out[~moved], pred[~moved], atol=1e-4)


def test_copy_decoding_shrinks_a_small_predicted_change_towards_the_last_frame(vae):
    """copy: where the decoded prediction changed by c < threshold from D(z_last), the output is the camera's last
    frame moved towards the decoded prediction by c / threshold of the way (all of it at the threshold)."""
    tau = 0.2
    frames = smooth_frames(B, TP, 16, 16)
    past_frames, past = frames, vae.encode(frames)
    g = torch.Generator().manual_seed(4)
    future = past[:, -1:] + 0.002 * torch.randn(B, TF, *past.shape[2:], generator=g)  # a little sampling noise
    pred, base = vae.decode(future), vae.decode(past[:, -1:])
    change = (pred - base).abs().amax(2, keepdim=True)
    small = (change < tau).expand_as(pred)
    assert small.float().mean() > 0.9 and change.max() > 1e-3
    last = past_frames[:, -1:].expand_as(pred)
    model = build(vae, **{"sampler.residual_decode_threshold": tau})
    copy = model.decode_future(future, past_frames, past, mode="copy")
    masked = model.decode_future(future, past_frames, past, mode="masked")
    expect = last + (change / tau).clamp(max=1) * (pred - last)
    assert torch.allclose(copy[small], expect.clamp(-1, 1)[small], atol=1e-5)
    assert not torch.allclose(copy[small], masked[small], atol=1e-3)  # masked keeps the change: another output


def test_predict_uses_the_configured_decoding(vae):
    frames = smooth_frames(1, TP, 16, 16)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    off = build(vae).predict(frames, generator=g())
    full = build(vae, **{"sampler.residual_decode": "full"}).predict(frames, generator=g())
    past = vae.encode(frames)
    correction = frames[:, -1:] - vae.decode(past[:, -1:])
    assert torch.allclose(full, (off + correction).clamp(-1, 1), atol=1e-5)


# ---------------------------------------------------------------- zero terminal SNR

def test_zero_terminal_snr_ends_in_pure_noise_and_needs_v_prediction():
    cfg = tiny_config(**{"diffusion.prediction_type": "v_prediction", "diffusion.zero_terminal_snr": True})
    s = NoiseSchedule(cfg.diffusion)
    assert float(s.alpha_bar(torch.tensor(s.num_train_timesteps - 1))) < 1e-12
    plain = NoiseSchedule(tiny_config(**{"diffusion.prediction_type": "v_prediction"}).diffusion)
    assert float(plain.alpha_bar(torch.tensor(plain.num_train_timesteps - 1))) > 1e-5
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        tiny_config(**{"diffusion.zero_terminal_snr": True})


def test_zero_terminal_snr_sampler_recovers_x0_with_a_perfect_denoiser(vae):
    model = build(vae, **{"diffusion.prediction_type": "v_prediction", "diffusion.zero_terminal_snr": True,
                          "sampler.clip_x0": "none"})
    past, future = latents(2)
    out = model.predict_latents(past, net=OracleNet(future, model.schedule), generator=torch.Generator())
    assert torch.isfinite(out).all() and torch.allclose(out, future, atol=1e-4)
    loss = model.loss(past, future, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- training timesteps

class _RecordingOracle(OracleNet):
    """The perfect denoiser, remembering which timesteps the loss drew."""

    def __init__(self, *a):
        super().__init__(*a)
        self.ts = []

    def forward(self, x_t, past, t, cond=None, cond_keep=None):
        self.ts.append(t.clone())
        return super().forward(x_t, past, t, cond, cond_keep)


def test_uniform_timesteps_are_the_draw_every_run_was_trained_with(vae):
    """The default draw is the generator's first B uniforms times T: switching the lever in did not move the
    random stream of existing runs (the demo's CPU table reproduces to the last digit)."""
    model = build(vae, **{"diffusion.prediction_type": "v_prediction"})
    past, future = latents()
    oracle = _RecordingOracle(future, model.schedule)
    model.loss(past, future, generator=torch.Generator().manual_seed(5), net=oracle)
    expected = (torch.rand(B, generator=torch.Generator().manual_seed(5)) * 1000).long()
    assert torch.equal(oracle.ts[0], expected)


def test_logit_normal_timesteps_centre_where_asked_and_keep_the_minimiser(vae):
    """t / T = sigmoid(logit(median) + s z): the median of many draws is the asked median, the spread grows with s,
    and a perfect denoiser still has zero loss (only how often each t is drawn changes)."""
    medians, spreads = {}, {}
    for m, s in [(0.25, 0.5), (0.7, 0.5), (0.25, 1.5)]:
        model = build(vae, **{"diffusion.prediction_type": "v_prediction", "diffusion.timestep_sampling": "logit_normal",
                              "diffusion.timestep_median": m, "diffusion.timestep_logit_std": s})
        past, future = latents()
        oracle = _RecordingOracle(future, model.schedule)
        g = torch.Generator().manual_seed(0)
        losses = [model.loss(past, future, generator=g, net=oracle) for _ in range(400)]
        assert max(losses) < 1e-8
        ts = torch.cat(oracle.ts).double() / 1000
        medians[(m, s)], spreads[(m, s)] = ts.median().item(), (ts.quantile(0.9) - ts.quantile(0.1)).item()
        assert abs(medians[(m, s)] - m) < 0.03, medians
    assert spreads[(0.25, 1.5)] > 2 * spreads[(0.25, 0.5)], spreads


@pytest.mark.parametrize("key,value", [("timestep_sampling", "beta"), ("timestep_logit_std", 0.0),
                                       ("timestep_median", 1.0), ("timestep_median", float("nan"))])
def test_bad_timestep_sampling_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"diffusion.{key}"):
        tiny_config(**{f"diffusion.{key}": value})


# ---------------------------------------------------------------- loss weight where the picture changes

class Bumped(torch.nn.Module):
    """A perfect denoiser (OracleNet) whose output is off by 1 at one latent cell of every window and frame."""

    def __init__(self, oracle: torch.nn.Module, y: int, x: int):
        super().__init__()
        self.oracle, self.y, self.x = oracle, y, x

    def forward(self, x_t, past, t, cond=None, cond_keep=None):
        out = self.oracle(x_t, past, t, cond, cond_keep).clone()
        out[..., 0, self.y, self.x] += 1.0
        return out


@pytest.mark.parametrize("target", ["absolute", "residual"])
def test_change_weight_makes_an_error_where_the_picture_changes_cost_more(vae, target):
    """The future equals the last past latent except in a 2x2 patch: an error there costs (1 + change_weight)
    times the same error on the still part, the weights are normalised (a still error costs 1 / sum of weights),
    and weight 0 is plain MSE."""
    lam, past = 3.0, latents()[0]
    future = past[:, -1:].repeat(1, TF, 1, 1, 1)
    future[..., 2:4, 2:4] += 2.0  # above change_threshold (0.5) in every channel
    kw = {"diffusion.target": target, "diffusion.prediction_type": "v_prediction", "diffusion.snr_gamma": 0.0}
    model = build(vae, **kw, **{"diffusion.change_weight": lam})
    plain = build(vae, **kw)
    oracle = OracleNet(model.to_x0(future, past), model.schedule)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    moving = model.loss(past, future, generator=g(), net=Bumped(oracle, 2, 3))
    still = model.loss(past, future, generator=g(), net=Bumped(oracle, 6, 6))
    assert moving / still == pytest.approx(1 + lam, rel=1e-4)
    cells = TF * LATENT_CHANNELS * h * w
    total = cells + lam * TF * LATENT_CHANNELS * 4  # sum of the weights over one window
    assert still == pytest.approx(TF / total, rel=1e-4)  # one unit error per frame, weight 1 each
    assert plain.loss(past, future, generator=g(), net=Bumped(oracle, 2, 3)) == pytest.approx(TF / cells, rel=1e-4)
    weights = model.change_weights(past, future)
    assert weights.shape == (B, TF, 1, h, w) and int((weights > 1).sum()) == B * TF * 4


@pytest.mark.parametrize("key, value", [("change_weight", -1.0), ("change_threshold", 0.0)])
def test_change_weight_settings_are_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_config(**{f"diffusion.{key}": value})

"""The composed model (frozen VAE + conditional UNet + one schedule) and the UNet's input checks: the loss is
the schedule's weighted MSE and trains every UNet parameter; predictions have the right shape and range, depend on
the past, and are reproducible; guidance combines the branches as documented."""
from __future__ import annotations

import pytest
import torch

from helpers import LATENT_CHANNELS, smooth_frames, tiny_config, tiny_kl_vae, tiny_vae_folder
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.unet import ConditionalUNet
from model.vae import FrozenVAE
from model.video_prediction_diffusion import VideoPredictionDiffusion

B, TP, TF, H, W = 2, 2, 2, 16, 16
h, w = H // 2, W // 2  # latent size for the two-level tiny VAE
COND = {"data.cond_keys": ["speed"]}  # cond_dim = 1 key x 2 future frames


@pytest.fixture(scope="module")
def vae() -> FrozenVAE:
    return FrozenVAE(tiny_kl_vae(seed=0))


def build(vae: FrozenVAE, seed: int = 0, **overrides) -> VideoPredictionDiffusion:
    torch.manual_seed(seed)  # the UNet's random init
    return VideoPredictionDiffusion(tiny_config(**overrides), vae)


def latents(seed: int = 0, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TP, LATENT_CHANNELS, h, w, generator=g), \
        torch.randn(batch, TF, LATENT_CHANNELS, h, w, generator=g)


class RecordingNet(torch.nn.Module):
    """Stands in for the UNet: records its inputs; output is a fixed function of all of them."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, noisy, past, t, cond=None, cond_keep=None):
        self.calls.append(dict(noisy=noisy, past=past, t=t, cond=cond, cond_keep=cond_keep))
        out = self.scale * noisy + 0.3 * past.mean(1, keepdim=True) + 1e-3 * t.reshape(-1, 1, 1, 1, 1)
        if cond is not None:
            keep = torch.ones(len(t)) if cond_keep is None else cond_keep
            out = out + (keep.reshape(-1, 1) * cond).sum(1).reshape(-1, 1, 1, 1, 1)
        return out


# ---------------------------------------------------------------- loss

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_finite_and_every_unet_parameter_gets_a_gradient(vae, prediction_type):
    model = build(vae, **COND, **{"diffusion.prediction_type": prediction_type})
    past, future = latents()
    cond = torch.randn(B, 2)
    loss = model.loss(past, future, cond, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    params = dict(model.unet.named_parameters())
    assert any(n.startswith("cond_proj.") for n in params)
    for name in ("unet.conv_in.weight", "unet.conv_out.weight", "cond_proj.0.weight", "cond_proj.2.weight"):
        assert name in params
    no_grad = [n for n, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == []
    assert all(p.grad is None for p in model.vae.parameters())  # the VAE is never trained


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", 0.0), ("v_prediction", 0.0),
                                                        ("epsilon", 5.0), ("v_prediction", 5.0)])
def test_loss_is_the_weighted_mse_to_the_schedule_target(vae, prediction_type, snr_gamma):
    """Recover the drawn noise from the net's input x_t, rebuild target and min-SNR weight by hand, and compare."""
    model = build(vae, **{"diffusion.prediction_type": prediction_type, "diffusion.snr_gamma": snr_gamma})
    net = RecordingNet()
    past, future = latents(1, batch=8)
    loss = model.loss(past, future, generator=torch.Generator().manual_seed(3), net=net)
    (call,) = net.calls
    t = call["t"]
    assert t.dtype == torch.long and t.shape == (8,) and t.min() >= 0 and t.max() <= 999
    assert torch.equal(call["past"], past)
    ab = model.schedule.alpha_bar(t).float().reshape(-1, 1, 1, 1, 1)
    eps = (call["noisy"] - ab.sqrt() * future) / (1 - ab).sqrt()
    target = eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * future
    per_sample = (net(call["noisy"], past, t) - target).pow(2).mean((1, 2, 3, 4))
    snr = (ab / (1 - ab)).flatten().double()
    if snr_gamma == 0:
        weight = torch.ones(8, dtype=torch.float64)
    else:
        weight = snr.clamp(max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = (per_sample.double() * weight).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=2e-3)
    assert eps.std().item() == pytest.approx(1.0, abs=0.1)  # the recovered noise is standard normal


def test_loss_is_reproducible_with_a_generator(vae):
    model = build(vae, **COND)
    past, future = latents()
    cond = torch.randn(B, 2)

    def loss(seed):
        return model.loss(past, future, cond, generator=torch.Generator().manual_seed(seed)).item()

    assert loss(0) == loss(0)
    assert loss(0) != loss(1)


def test_past_and_condition_dropout_in_training(vae):
    model = build(vae, **COND, **{"diffusion.past_dropout": 0.5, "diffusion.cond_dropout": 0.5})
    net = RecordingNet()
    past, future = latents(2, batch=64)
    model.loss(past, future, torch.randn(64, 2), generator=torch.Generator().manual_seed(0), net=net)
    (call,) = net.calls
    dropped = (call["past"] == 0).flatten(1).all(1)
    assert torch.equal(call["past"][~dropped], past[~dropped])  # kept samples are untouched
    assert 10 < int(dropped.sum()) < 54
    keep = call["cond_keep"]
    assert keep.shape == (64,) and set(keep.tolist()) == {0.0, 1.0} and 10 < int(keep.sum()) < 54
    net.calls.clear()
    build(vae, **COND).loss(past, future, torch.randn(64, 2), generator=torch.Generator().manual_seed(0), net=net)
    assert net.calls[0]["cond_keep"] is None and torch.equal(net.calls[0]["past"], past)  # dropout off


def test_batch_loss_from_cached_latents_equals_encoding_frames(vae):
    model = build(vae)
    frames = smooth_frames(B, TP + TF)
    mean, std = vae.encode_moments(frames)
    from_frames = model.batch_loss({"frames": frames}, generator=torch.Generator().manual_seed(4))
    from_cache = model.batch_loss({"latent_mean": mean, "latent_std": std, "cond": torch.zeros(B, 0)},
                                  generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(from_cache, from_frames, rtol=1e-5, atol=1e-6)
    past, future = model.split_latents(mean)
    assert torch.equal(past, mean[:, :TP]) and torch.equal(future, mean[:, TP:])


# ---------------------------------------------------------------- conditioning in the UNet

def test_cond_keep_zero_removes_the_conditioning(vae):
    unet = build(vae, **COND).unet.eval()
    x, past = torch.randn(B, TF, LATENT_CHANNELS, h, w), torch.randn(B, TP, LATENT_CHANNELS, h, w)
    t = torch.tensor([10, 700])
    c1, c2 = torch.randn(B, 2), torch.randn(B, 2)
    off = torch.zeros(B)
    with torch.no_grad():
        assert torch.equal(unet(x, past, t, c1, off), unet(x, past, t, c2, off))
        assert not torch.allclose(unet(x, past, t, c1), unet(x, past, t, c2))
        mixed = unet(x, past, t, c1, torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(mixed[0], unet(x, past, t, c1)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[1], unet(x, past, t, c2, off)[1], rtol=1e-5, atol=1e-6)


def test_each_future_frame_knows_its_index(vae):
    """DESIGN cause 5: swapping two noisy future frames must not just swap the outputs (joint prediction on
    stacked channels gives every frame its own channel slot)."""
    unet = build(vae).unet.eval()
    x, past = torch.randn(B, TF, LATENT_CHANNELS, h, w), torch.randn(B, TP, LATENT_CHANNELS, h, w)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        out = unet(x, past, t)
        swapped = unet(x[:, [1, 0]], past, t)[:, [1, 0]]
    assert (out - swapped).abs().max() > 1e-3


def test_unet_rejects_wrong_shapes(vae):
    unet = build(vae, **COND).unet
    t = torch.tensor([1, 2])
    ok_future, ok_past = torch.zeros(B, TF, LATENT_CHANNELS, h, w), torch.zeros(B, TP, LATENT_CHANNELS, h, w)
    cond = torch.zeros(B, 2)
    with torch.no_grad():
        assert unet(ok_future, ok_past, t, cond).shape == ok_future.shape
    bad = [
        (torch.zeros(B, TF, LATENT_CHANNELS + 1, h, w), torch.zeros(B, TP, LATENT_CHANNELS + 1, h, w)),  # channels
        (torch.zeros(B, TF + 1, LATENT_CHANNELS, h, w), ok_past),  # future frames
        (ok_future, torch.zeros(B, TP + 1, LATENT_CHANNELS, h, w)),  # past frames
        (ok_future, torch.zeros(B, TP, LATENT_CHANNELS, h, w + 2)),  # past vs future size
        (ok_future, torch.zeros(B + 1, TP, LATENT_CHANNELS, h, w)),  # batch
    ]
    for future, past in bad:
        with pytest.raises(AssertionError):
            unet(future, past, t, cond)
    with pytest.raises(ValueError, match="divisible"):  # was a skip-connection size mismatch deep in diffusers
        unet(torch.zeros(B, TF, LATENT_CHANNELS, 7, 7), torch.zeros(B, TP, LATENT_CHANNELS, 7, 7), t, cond)
    for bad_cond in (None, torch.zeros(B, 3), torch.zeros(B)):
        with pytest.raises(ValueError, match="conditioning vector"):
            unet(ok_future, ok_past, t, bad_cond)


def test_model_rejects_a_vae_with_other_latent_channels(vae):
    cfg = tiny_config()
    unet = ConditionalUNet(cfg.unet, LATENT_CHANNELS, TP, TF)
    other = FrozenVAE(tiny_kl_vae(latent_channels=8))
    with pytest.raises(ValueError, match="latent channels"):
        VideoPredictionDiffusion(cfg, other, unet)
    assert VideoPredictionDiffusion(tiny_config(), other).unet.latent_channels == 8  # built to match: fine


def test_model_rejects_a_frame_size_the_unet_cannot_halve(vae):
    deep = {"unet.block_out_channels": [8, 8, 8, 8], "unet.attention": [False] * 4}
    VideoPredictionDiffusion(tiny_config(**deep), vae)  # 16 px -> 8 latent cells: fine for 4 levels
    with pytest.raises(ValueError, match="divisible by 8"):
        VideoPredictionDiffusion(tiny_config(**deep, **{"data.height": 24}), vae)  # 12 latent cells


def test_from_config_loads_the_vae_by_path(tmp_path):
    cfg = tiny_config(tiny_vae_folder(tmp_path, latent_channels=8))
    model = VideoPredictionDiffusion.from_config(cfg)
    assert model.vae.latent_channels == 8 and model.unet.latent_channels == 8
    assert model.unet.unet.config.in_channels == 8 * (TP + TF) and model.unet.unet.config.out_channels == 8 * TF


# ---------------------------------------------------------------- prediction

def test_predict_shape_range_and_reproducibility(vae):
    model = build(vae)
    past_frames = smooth_frames(B, TP, seed=1)
    model.unet.train()

    def predict(seed, frames=past_frames, **kw):
        return model.predict(frames, generator=torch.Generator().manual_seed(seed), **kw)

    out = predict(0)
    assert out.shape == (B, TF, 3, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert model.unet.training  # restored after sampling in eval mode
    assert torch.equal(predict(0), out)
    assert not torch.allclose(predict(1), out)
    # with eta > 0 too (the generator also drives the per-step noise)
    assert torch.equal(predict(0, eta=1.0), predict(0, eta=1.0))


def test_predict_is_reproducible_with_posterior_sampling(vae):
    """With vae.latent = sample the past frames' latents are a posterior draw: it must come from the caller's
    generator too, or the same seed gives a different prediction."""
    model = build(vae)
    model.vae = FrozenVAE(tiny_kl_vae(seed=0), latent="sample")
    frames = smooth_frames(B, TP, seed=1)
    a = model.predict(frames, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global RNG must not matter
    b = model.predict(frames, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_prediction_depends_on_the_past(vae):
    model = build(vae)
    a, b = smooth_frames(B, TP, seed=1), smooth_frames(B, TP, seed=2)
    past_a, past_b = vae.encode(a), vae.encode(b)

    def lat(past):
        return model.predict_latents(past, generator=torch.Generator().manual_seed(0))

    assert not torch.allclose(lat(past_a), lat(past_b), atol=1e-4)
    pa = model.predict(a, generator=torch.Generator().manual_seed(0))
    pb = model.predict(b, generator=torch.Generator().manual_seed(0))
    assert (pa - pb).abs().max() > 1e-3


def test_predict_latents_uses_the_configured_sampler(vae):
    model = build(vae, **{"sampler.num_inference_steps": 5, "sampler.clip_x0": "static", "sampler.clip_bound": 0.5})
    infos = []
    past = vae.encode(smooth_frames(B, TP))
    out = model.predict_latents(past, generator=torch.Generator().manual_seed(0), callback=infos.append)
    assert out.shape == (B, TF, LATENT_CHANNELS, h, w)
    assert [i["t"] for i in infos] == model.schedule.timesteps(5) and infos[0]["t"] == 999
    assert out.abs().max() <= 0.5 + 1e-6 and sum(i["num_clipped"] for i in infos) > 0
    infos.clear()
    model.predict_latents(past, steps=3, callback=infos.append, clip="none")
    assert len(infos) == 3 and all(i["num_clipped"] == 0 for i in infos)


def test_guidance_runs_and_changes_the_prediction(vae):
    model = build(vae, **COND, **{"diffusion.past_dropout": 0.2, "diffusion.cond_dropout": 0.2,
                                  "sampler.guidance_past": 2.0, "sampler.guidance_cond": 1.5})
    frames, cond = smooth_frames(B, TP), torch.randn(B, 2)
    guided = model.predict(frames, cond, generator=torch.Generator().manual_seed(0))
    plain = model.predict(frames, cond, generator=torch.Generator().manual_seed(0), guidance_past=1.0,
                          guidance_cond=1.0)
    assert guided.shape == plain.shape == (B, TF, 3, H, W) and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain)


def test_guidance_with_a_net_that_reuses_its_output_buffer_needs_copy_out(vae):
    """A CUDA-graph replay (speed.sampler_compile in a reduce-overhead or max-autotune mode) returns the same static
    buffer at every call, so guidance's second call overwrote the first call's output. Here a net that writes into
    one buffer plays that part on the CPU: guided by hand it gives the wrong numbers; through performance.copy_out,
    which CompiledNets applies in those modes, the numbers of a plain net."""
    from model import performance
    model = build(vae, **COND)
    net = RecordingNet()
    buffer = {}

    def replay(*args):  # the static-output semantics of a graph replay
        out = net(*args)
        buffer.setdefault("out", torch.empty_like(out)).copy_(out)
        return buffer["out"]

    past, x_t = latents(5)
    cond, t = torch.randn(B, 2), torch.tensor([999, 999])
    guide = dict(guidance_past=3.0, guidance_cond=2.5)
    with torch.no_grad():
        expected = model.denoiser(past, cond, net, **guide)(x_t, t)
        shared = model.denoiser(past, cond, replay, **guide)(x_t, t)
        copied = model.denoiser(past, cond, performance.copy_out(replay), **guide)(x_t, t)
    assert not torch.allclose(shared, expected)  # the hazard is real for this formula
    torch.testing.assert_close(copied, expected, rtol=0, atol=0)
    assert performance.GRAPH_MODES == ("reduce-overhead", "max-autotune")


@pytest.mark.parametrize("g_past, g_cond", [(1.0, 1.0), (3.0, 1.0), (1.0, 2.5)])
def test_guidance_formula(vae, g_past, g_cond):
    """out = uncond + g (cond - uncond) (Ho & Salimans 2022), the unconditional branch dropping the past frames
    (zeros) or the conditioning vector (cond_keep = 0), as in training."""
    model = build(vae, **COND)
    net = RecordingNet()
    past, x_t = latents(5)
    cond, t = torch.randn(B, 2), torch.tensor([999, 999])
    out = model.denoiser(past, cond, net, guidance_past=g_past, guidance_cond=g_cond)(x_t, t)
    full = net(x_t, past, t, cond)
    no_past = net(x_t, torch.zeros_like(past), t, cond)
    no_cond = net(x_t, past, t, cond, torch.zeros(B))
    expected = full.clone()
    if g_past != 1.0:
        expected = no_past + g_past * (full - no_past)
    if g_cond != 1.0:
        expected = no_cond + g_cond * (full - no_cond)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    n_calls = 1 + (g_past != 1.0) + (g_cond != 1.0)
    assert len(net.calls) == n_calls + 3  # + the three reference calls above

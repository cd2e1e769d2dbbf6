"""The sliding-window prediction path (model/sliding.py) and the evaluation built on it (training/evaluation.py).

Oracles: a denoiser that extrapolates latents linearly makes the exact frame every window should predict known (a clip
whose latents are linear in time), so the window/horizon/rollout bookkeeping is checked to float precision; seeding is
checked by predicting the same windows in other batches, subsets and round counts.
"""
from __future__ import annotations

import pytest
import torch

from helpers import one_torch_thread, smooth_frames, tiny_config, tiny_kl_vae  # noqa: F401 (fixture)
from model import FrozenVAE, VideoPredictionDiffusion
from model.sliding import WindowKey, by_frame, precision_context, predict_windows, slide, window_seed, window_starts
from training.distributed import DistInfo
from training.evaluation import evaluate, format_table

TP, TF = 2, 2


class LinearExtrapolation(torch.nn.Module):
    """An epsilon-prediction 'UNet' whose implied x0 is the past latents continued on a straight line:
    x0[j] = last + (j + 1) * (last - previous). Exact DDIM then returns exactly that, whatever x_T."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t, past, t, cond=None, cond_keep=None):
        last, prev = past[:, -1:], past[:, -2:-1]
        steps = torch.arange(1, x_t.shape[1] + 1, dtype=x_t.dtype).reshape(1, -1, 1, 1, 1)
        x0 = last + steps * (last - prev)
        ab = self.schedule.alpha_bar(t).to(x_t.dtype).reshape(-1, 1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoPredictionDiffusion(tiny_config(**{"sampler.clip_x0": "none"}), FrozenVAE(tiny_kl_vae()))


def linear_latents(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 8, 8, generator=g), 0.1 * torch.randn(4, 8, 8, generator=g)
    return a + torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1) * b  # (n, C, h, w)


@pytest.mark.parametrize("rounds", [1, 3])
def test_every_window_predicts_exactly_the_frames_after_it(model, rounds):
    """Window s, horizon h predicts frame s + t_past + h - 1 (rounds feed predictions back); by_frame puts it there."""
    n = 11
    lat = linear_latents(n)
    net = LinearExtrapolation(model.schedule)
    frames = torch.zeros(n, 3, 16, 16)  # not read: the latents are given and nothing is decoded
    batches = list(slide(model, net, frames, "clip", moments=(lat, None), rounds=rounds, batch_size=4, decode=False))
    starts = [s for b in batches for s in b.starts]
    assert starts == window_starts(n, TP) == list(range(n - TP))
    pred = torch.cat([b.latents for b in batches])  # (W, H, C, h, w)
    H = rounds * TF
    assert pred.shape == (n - TP, H, 4, 8, 8)
    whole = linear_latents(n + H)  # the line continued past the clip's end
    for w, s in enumerate(starts):
        assert torch.allclose(pred[w], whole[s + TP:s + TP + H], atol=2e-4), (s, (pred[w] - whole[s + TP:s + TP + H]).abs().max())
    per_frame = by_frame(starts, pred, n, TP)  # (n, H, C, h, w)
    for f in range(n):
        for h in range(H):
            if f - TP - h >= 0:
                assert torch.allclose(per_frame[f, h], lat[f], atol=2e-4)
            else:
                assert per_frame[f, h].isnan().all()


def test_by_frame_places_scalars_by_horizon():
    starts, Tp, n = [0, 1, 2, 5], 3, 9
    values = torch.tensor([[10.0 * s + h for h in range(2)] for s in starts])  # (W, 2)
    out = by_frame(starts, values, n, Tp)
    assert out[3, 0] == 0 and out[3, 1].isnan()
    assert out[4, 0] == 10 and out[4, 1] == 1 and out[5, 1] == 11 and out[8, 0] == 50
    assert out[:3].isnan().all() and out[6, 0].isnan() and out[7, 1].isnan()  # start 3 and 4 were not predicted


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_noise_is_seeded_per_window_not_per_batch(eta):
    """The same window gives the same prediction in a batch of 1 or 4, in a subset of windows, and with more rounds
    (its first round); another clip name or sample index gives another prediction."""
    torch.manual_seed(0)
    m = VideoPredictionDiffusion(tiny_config(**{"sampler.eta": eta}), FrozenVAE(tiny_kl_vae()))
    frames = smooth_frames(1, 9, seed=2)[0]

    def run(**kw):
        batches = list(slide(m, m.unet, frames, "clip_a", seed=5, **kw))
        return {s: b.frames[i] for b in batches for i, s in enumerate(b.starts)}

    one, four = run(batch_size=1), run(batch_size=4)
    subset = run(batch_size=3, starts=[6, 2, 4])
    longer = run(batch_size=2, rounds=2)
    for s in one:
        assert torch.allclose(one[s], four[s], atol=1e-5)
        assert torch.allclose(longer[s][:TF], one[s], atol=1e-5)
    for s in (2, 4, 6):
        assert torch.allclose(subset[s], one[s], atol=1e-5)
    other = next(slide(m, m.unet, frames, "clip_b", seed=5, starts=[2]))
    second = next(slide(m, m.unet, frames, "clip_a", seed=5, starts=[2], sample=1))
    assert not torch.allclose(other.frames[0], one[2], atol=1e-3)
    assert not torch.allclose(second.frames[0], one[2], atol=1e-3)
    assert window_seed(5, WindowKey("a", 1)) == window_seed(5, WindowKey("a", 1)) != window_seed(5, WindowKey("a", 2))


def window_items(frames: torch.Tensor, clip: str, span: int) -> list[dict]:
    return [{"frames": frames[s:s + span], "cond": torch.zeros(0), "clip": clip,
             "frame_indices": torch.arange(s, s + span)} for s in range(frames.shape[0] - span + 1)]


def test_evaluation_predicts_what_the_slide_predicts(model):
    """The trainer's evaluation and the whole-clip tools share one path: the metric evaluate() reports for a window
    is the metric of slide()'s prediction of that window, and it does not depend on the batch size."""
    from training.evaluation import frame_metrics
    frames = smooth_frames(1, 8, seed=4)[0]
    items = window_items(frames, "c0", TP + TF)
    info = DistInfo(device=torch.device("cpu"))
    nets = {"model": model.unet}
    res = [evaluate(model, items, [i], info, nets, steps=3, batch_size=1, seed=9) for i in range(len(items))]
    together = evaluate(model, items, list(range(len(items))), info, nets, steps=3, batch_size=3, seed=9)
    preds = {s: p for b in slide(model, model.unet, frames, "c0", steps=3, seed=9) for s, p in zip(b.starts, b.frames)}
    for s, r in enumerate(res):
        psnr, _ = frame_metrics(preds[s][None, :TF], frames[None, s + TP:s + TP + TF])
        assert r["psnr"]["model"] == pytest.approx(psnr[0].tolist(), abs=1e-3)
    mean = [sum(r["psnr"]["model"][h] for r in res) / len(res) for h in range(TF)]
    assert together["psnr"]["model"] == pytest.approx(mean, abs=1e-3)


def test_k_sample_rows_follow_the_protocol(model):
    """K samples: sample 0 is the one-sample headline (unchanged by K); best of K is at least the mean over samples
    (in the horizon mean it was chosen by); a deterministic predictor scores the same in every row."""
    frames = smooth_frames(1, 8, seed=6)[0]
    items = window_items(frames, "c1", TP + TF)
    info, idx = DistInfo(device=torch.device("cpu")), list(range(len(items)))
    one = evaluate(model, items, idx, info, {"model": model.unet}, steps=2, batch_size=4, seed=1)
    four = evaluate(model, items, idx, info, {"model": model.unet}, steps=2, batch_size=4, seed=1, samples=4)
    assert four["psnr"]["model"] == one["psnr"]["model"] and four["samples"] == 4
    for m in ("psnr", "ssim"):
        best, avg = sum(four[m]["model.k4_best"]), sum(four[m]["model.k4_mean"])
        assert best >= avg - 1e-6
    assert set(four["protocol"]) == set(four["psnr"])
    assert "best of 4" in format_table(four)

    still = evaluate(model, items, idx, info, {"lin": LinearExtrapolation(model.schedule)}, steps=2, batch_size=4,
                     samples=3)
    rows = ["lin", "lin.k3_mean", "lin.k3_best", "lin.k3_avg"]
    for m in ("psnr", "ssim"):
        for r in rows[1:]:
            assert still[m][r] == pytest.approx(still[m]["lin"], abs=1e-3)


def test_evaluation_over_rollout_horizons(model):
    """rounds=2 scores 2 * t_future horizons on windows of t_past + 2 * t_future frames; its first t_future horizons are
    the one-round numbers."""
    frames = smooth_frames(1, 9, seed=7)[0]
    info = DistInfo(device=torch.device("cpu"))
    long_items = window_items(frames, "c2", TP + 2 * TF)
    short_items = [dict(it, frames=it["frames"][:TP + TF], frame_indices=it["frame_indices"][:TP + TF])
                   for it in long_items]
    idx = list(range(len(long_items)))
    two = evaluate(model, long_items, idx, info, {"model": model.unet}, steps=2, batch_size=2, rounds=2)
    one = evaluate(model, short_items, idx, info, {"model": model.unet}, steps=2, batch_size=2)
    assert len(two["psnr"]["model"]) == 2 * TF and two["rounds"] == 2
    assert two["psnr"]["model"][:TF] == pytest.approx(one["psnr"]["model"], abs=1e-3)
    assert two["psnr"]["copy_last"][:TF] == pytest.approx(one["psnr"]["copy_last"], abs=1e-3)


def test_precision_switch():
    assert precision_context("cpu", "bf16").__class__.__name__ == "nullcontext"
    with pytest.raises(ValueError, match="precision"):
        precision_context("cpu", "fp16")


def test_decoding_one_sample_several_ways_equals_one_evaluation_per_way(model):
    """decodes=: the windows are sampled once and decoded every way; each way's table is what a whole evaluation with
    that sampler.residual_decode / threshold in the config gives (same seeds, so the same samples), K-sample rows
    included, and the top-level table is the first way's."""
    frames = smooth_frames(1, 8, seed=8)[0]
    items = window_items(frames, "c3", TP + TF)
    info, idx = DistInfo(device=torch.device("cpu")), list(range(len(items)))
    ways = {"off": ("off", 0.1), "copy@0.3": ("copy", 0.3), "masked@0.05": ("masked", 0.05)}
    both = evaluate(model, items, idx, info, {"model": model.unet}, steps=2, batch_size=3, seed=2, samples=2,
                    decodes=ways)
    s = model.cfg.sampler
    saved = s.residual_decode, s.residual_decode_threshold
    try:
        for name, (mode, threshold) in ways.items():
            s.residual_decode, s.residual_decode_threshold = mode, threshold
            alone = evaluate(model, items, idx, info, {"model": model.unet}, steps=2, batch_size=3, seed=2, samples=2)
            for m in ("psnr", "ssim"):
                assert set(both["decode"][name][m]) == set(alone[m])
                for row, values in alone[m].items():
                    assert both["decode"][name][m][row] == pytest.approx(values, abs=1e-4), (name, m, row)
    finally:
        s.residual_decode, s.residual_decode_threshold = saved
    assert both["psnr"] == both["decode"]["off"]["psnr"]
    assert both["psnr"]["model"] != both["decode"]["copy@0.3"]["psnr"]["model"]  # the ways differ on this model

"""Motion-compensated copying (`sampler.residual_decode: warp`, model/motion.py) against analytic oracles: a frame
moved by a known shift is found and undone, a blurred and moved prediction comes back as the sharp last frame moved,
and with no motion searched the mode is exactly copy decoding."""
from __future__ import annotations

import pytest
import torch

from configs.loader import ConfigError
from helpers import smooth_frames, tiny_config, tiny_kl_vae
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.motion import block_match, motion_compensated_copy, warp
from model.vae import FrozenVAE
from model.video_prediction_diffusion import VideoPredictionDiffusion


def textured(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Frames in [-1, 1] with texture everywhere, so every shift but the true one costs something."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def shifted(frames: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out(p) = frames(p + d) where p + d is inside; the rest left as is (tests only read the interior)."""
    out = frames.clone()
    h, w = frames.shape[-2:]
    ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., ys, xs] = frames[..., yd, xd]
    return out


@pytest.mark.parametrize("dy, dx", [(0, 0), (2, -3), (-4, 1)])
def test_block_match_finds_a_known_shift_and_warp_undoes_it(dy, dx):
    reference = textured(2, 24, 24)
    target = shifted(reference, dy, dx)
    disp, cost = block_match(target, reference, radius=5, window=3)
    inner = (slice(None), slice(6, 18), slice(6, 18))  # away from the border the shift leaves unknown
    assert (disp[:, 0][inner] == dy).all() and (disp[:, 1][inner] == dx).all()
    assert cost[:, 0][inner].max() < 1e-6
    assert torch.equal(warp(reference, disp)[:, :, 6:18, 6:18], target[:, :, 6:18, 6:18])


def test_block_match_prefers_no_motion_on_a_flat_frame():
    flat = torch.full((1, 3, 12, 12), 0.3)
    disp, cost = block_match(flat, flat.clone(), radius=3, window=3)
    assert disp.abs().max() == 0 and cost.max() == 0


def disc(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r).float()


def test_a_blurred_moved_object_comes_back_sharp_where_the_prediction_put_it():
    """The last frame holds a sharp disc; the 'prediction' is that disc moved by (3, 2) and blurred (what a model's
    soft outlines look like). Warp decoding returns the sharp disc at the moved place; copy decoding cannot."""
    h = w = 32
    background, colour = torch.tensor([-0.6, -0.5, -0.4]), torch.tensor([0.9, -0.8, 0.2])

    def paint(mask):
        return (background.view(3, 1, 1) + mask * (colour - background).view(3, 1, 1))[None, None]

    last = paint(disc(h, w, 12, 12, 6))  # (1, 1, 3, H, W)
    truth = paint(disc(h, w, 15, 14, 6))
    blur = torch.nn.functional.avg_pool2d(truth[0], 5, stride=1, padding=2, count_include_pad=False)[None]
    shape = disc(h, w, 15, 14, 6).bool()
    assert ((blur[0, 0, 0] > 0.15) != shape).sum() > 0  # the blur really lost the outline
    out = motion_compensated_copy(blur, last, last, radius=5, window=9, threshold=1.5)
    assert torch.equal(out[0, 0, 0] > 0.15, shape)  # red above half-way: exactly the moved disc
    assert (out - truth).abs().mean() < (blur - truth).abs().mean() / 5
    # m < 1 where the best match still differs (the blurred rim): a larger threshold trusts the match more
    sure = motion_compensated_copy(blur, last, last, radius=5, window=9, threshold=50.0)
    assert (sure - truth).abs().amax() < 0.01


def test_warp_with_no_motion_searched_is_copy_decoding():
    """radius 0, a 1-pixel window: m = 1 - |D(z) - D(z_last)| / threshold per pixel, exactly copy decoding."""
    vae = FrozenVAE(tiny_kl_vae(seed=0))
    frames = smooth_frames(2, 4, 16, 16)
    past_frames, past = frames[:, :2], vae.encode(frames[:, :2])
    future = vae.encode(frames[:, 2:])
    model = VideoPredictionDiffusion(tiny_config(**{"sampler.residual_decode_threshold": 0.3,
                                                    "sampler.warp_radius": 0, "sampler.warp_window": 1}), vae)
    copy = model.decode_future(future, past_frames, past, mode="copy")
    moved = model.decode_future(future, past_frames, past, mode="warp")
    assert torch.allclose(moved, copy, atol=1e-6)
    assert not torch.allclose(copy, model.decode_future(future, past_frames, past, mode="off"), atol=1e-3)


def test_warp_settings_are_checked():
    with pytest.raises(ConfigError) as e:
        tiny_config(**{"sampler.warp_window": 4, "sampler.warp_radius": -1})
    assert "sampler.warp_window" in str(e.value) and "sampler.warp_radius" in str(e.value)

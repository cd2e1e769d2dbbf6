"""Motion-compensated copying (`sampler.residual_decode: warp`, model/motion.py) against analytic oracles: a frame
moved by a known shift is found and undone, a blurred and moved prediction comes back as the sharp last frame moved,
and with no motion searched the mode is exactly copy decoding. Motion anchors (`diffusion.motion_anchor`,
`extrapolate`): an object moving at a constant velocity is carried on exactly, a still scene stays as it is, and the
anchor target diffuses the correction of the anchors. Segment motion: colour regions are the connected components a
breadth-first search finds, a flat object too large for per-pixel matching moves whole and leaves no smear, and the
object in front stays in front; with edge 'stop' a whole object stops whole at the picture's edge."""
from __future__ import annotations

import pytest
import torch

import json

from configs.loader import ConfigError
from helpers import smooth_frames, tiny_config, tiny_kl_vae
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.motion import (block_match, colour_segments, extrapolate, fill_holes, motion_compensated_copy,
                          segment_copy, warp)
from model.vae import FrozenVAE
from model.video_prediction_diffusion import VideoPredictionDiffusion
from trainer_helpers import explain, make_world, run_cli, write_yaml


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


# ---------------------------------------------------------------- motion anchors: constant-velocity extrapolation

def disc_frame(cy: float, cx: float, size: int = 40, radius: float = 5.0) -> torch.Tensor:
    """(1, 3, size, size): a coloured disc of `radius` centred at (cy, cx) on a flat grey background."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    frame = torch.full((1, 3, size, size), -0.5)
    for c, v in enumerate((0.9, -0.9, 0.3)):
        frame[0, c][inside] = v
    return frame


@pytest.mark.parametrize("vy, vx, gap", [(1, 2, 3), (-2, 1, 1), (1 / 3, -2 / 3, 3)])
def test_extrapolate_carries_a_moving_disc_on_at_its_velocity(vy, vx, gap):
    """A disc that moved by gap * v between the two frames is, k frames on, the disc moved by round(k * v) more:
    exactly, background filled back in where it left (a flat background comes back exactly), whole-pixel motions
    finer than a pixel per frame included (gap 3: a third of a pixel per frame)."""
    earlier, last = disc_frame(15, 14), disc_frame(15 + gap * vy, 14 + gap * vx)
    ahead = extrapolate(last, earlier, gap, horizons=4, radius=6, window=9)
    assert ahead.shape == (1, 4, 3, 40, 40)
    for k in range(1, 5):
        dy, dx = round(k * vy), round(k * vx)
        expected = disc_frame(15 + gap * vy + dy, 14 + gap * vx + dx)
        assert (ahead[:, k - 1] - expected).abs().max() == 0, f"horizon {k}"


def test_extrapolate_of_a_still_scene_is_the_scene():
    frame = textured(2, 24, 24)
    ahead = extrapolate(frame, frame.clone(), 2, horizons=3, radius=4, window=5)
    assert torch.equal(ahead, frame.unsqueeze(1).expand(2, 3, 3, 24, 24))


def test_fill_holes_fills_from_around_and_leaves_the_rest():
    """A hole in a linear ramp comes back close to the ramp (within the values around it, and within 3 pixels' worth
    of its slope: filling from the outside in is not a harmonic fill), known pixels are untouched, and a frame without
    holes is returned as it was."""
    ramp = torch.linspace(-1, 1, 20).view(1, 1, 1, 20).expand(1, 3, 20, 20).clone()
    hole = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    hole[..., 6:12, 6:12] = True
    filled = fill_holes(ramp.masked_fill(hole, 5.0), hole)
    assert torch.equal(filled[~hole.expand_as(filled)], ramp[~hole.expand_as(ramp)])
    inner = filled[..., 6:12, 6:12]
    assert inner.min() >= ramp[..., 5].min() and inner.max() <= ramp[..., 12].max()
    step = 2 / 19  # the ramp's change per pixel
    assert (inner - ramp[..., 6:12, 6:12]).abs().max() < 3 * step
    assert torch.equal(fill_holes(ramp, torch.zeros_like(hole)), ramp)


def components(frame: torch.Tensor, tol: float) -> list[set[int]]:
    """The oracle for colour_segments: 8-connected components of a (3, H, W) frame by breadth-first search, pixels
    joined when their colours differ by less than tol (max over RGB), as flat indices."""
    _, h, w = frame.shape
    seen, parts = set(), []
    for start in range(h * w):
        if start in seen:
            continue
        part, todo = {start}, [start]
        seen.add(start)
        while todo:
            y, x = divmod(todo.pop(), w)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    q = ny * w + nx
                    if (0 <= ny < h and 0 <= nx < w and q not in seen
                            and (frame[:, y, x] - frame[:, ny, nx]).abs().max() < tol):
                        seen.add(q)
                        part.add(q)
                        todo.append(q)
        parts.append(part)
    return parts


def test_colour_segments_are_the_connected_components_of_similar_colours():
    """On frames of a few colour levels in blobs (regions of every shape, spirals of one colour included),
    colour_segments gives exactly the components a breadth-first search finds, each labelled by one of its pixels."""
    g = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, 3, (3, 1, 6, 6), generator=g).float()
    frames = torch.nn.functional.interpolate(coarse, size=(18, 18), mode="nearest").expand(3, 3, 18, 18) * 0.6 - 0.6
    frames = frames + 0.01 * torch.rand(frames.shape, generator=g)  # small steps inside a level: joined at tol 0.1
    spiral = torch.full((18, 18), -0.6)
    y, x, dy, dx = 0, 0, 0, 1
    for _ in range(18 * 18 // 2):  # a one-colour path that winds to the centre: labels must travel its whole length
        spiral[y, x] = 0.6
        if not (0 <= y + 2 * dy < 18 and 0 <= x + 2 * dx < 18 and spiral[y + 2 * dy, x + 2 * dx] < 0):
            dy, dx = dx, -dy
            if not (0 <= y + 2 * dy < 18 and 0 <= x + 2 * dx < 18 and spiral[y + 2 * dy, x + 2 * dx] < 0):
                break
        y, x = y + dy, x + dx
    frames = torch.cat([frames, spiral.expand(1, 3, 18, 18)])
    labels = colour_segments(frames, 0.1)
    for frame, lab in zip(frames, labels):
        flat = lab.reshape(-1)
        expected = components(frame, 0.1)
        assert len(set(flat.tolist())) == len(expected)
        for part in expected:
            ids = flat[sorted(part)]
            assert bool((ids == ids[0]).all()) and int(ids[0]) in part


def square_frame(squares, size=40, background=-0.5):
    """(1, 3, size, size): flat squares [(top, left, side, rgb), ...] drawn in order (later ones in front) on a flat
    background."""
    frame = torch.full((1, 3, size, size), background)
    for top, left, side, rgb in squares:
        for c, v in enumerate(rgb):
            frame[0, c, top:top + side, left:left + side] = v
    return frame


def test_segment_motion_moves_a_large_flat_object_whole_and_leaves_no_smear():
    """A flat square wider than the matching box, moving a pixel per frame: per-pixel matching finds its inside
    (which matches at any shift) still and leaves it behind; segment motion carries the whole square on, exactly,
    and the place it left is background again."""
    red, gap = (0.9, -0.8, -0.6), 3
    earlier = square_frame([(10, 8, 14, red)])
    last = square_frame([(10, 8 + gap, 14, red)])
    ahead = extrapolate(last, earlier, gap, horizons=4, radius=4, window=5, motion="segment", segment_tol=0.15)
    for k in range(1, 5):
        assert torch.equal(ahead[:, k - 1], square_frame([(10, 8 + gap + k, 14, red)])), f"horizon {k}"
    pixel = extrapolate(last, earlier, gap, horizons=4, radius=4, window=5)
    assert not torch.equal(pixel[:, 3], square_frame([(10, 8 + gap + 4, 14, red)]))


def test_segment_motion_keeps_the_object_in_front_in_front():
    """Two squares moving into each other, the red one in front: in the last frame it hides a corner of the green
    one, whose visible outline then matches worse (the red pixels at its cut edge were green before), so where they
    meet the green one goes behind, as in the truth (drawing the pixel of the highest index on top, as pixel motion
    does, would put green, the right-hand one, in front)."""
    red, green, gap = (0.9, -0.8, -0.6), (-0.7, 0.8, -0.5), 2

    def scene(t):  # red moves right, green left, a pixel per frame; red drawn last
        return square_frame([(16, 18 - t, 12, green), (12, 6 + t, 12, red)], size=48)
    ahead = extrapolate(scene(gap), scene(0), gap, horizons=4, radius=4, window=5, motion="segment", segment_tol=0.15)
    for k in range(1, 5):
        assert torch.equal(ahead[:, k - 1], scene(gap + k)), f"horizon {k}"


def test_edge_stop_keeps_a_whole_object_whole_at_the_edge_and_lets_the_rest_go():
    """edge 'stop': a square wholly inside the last frame, moving right two pixels per frame, runs into the right
    edge at horizon 2: from there it stays whole against the edge (the same pixels, its place behind it background
    again), where 'exit' carries it out, cut. A square already touching the bottom edge (one entering the picture)
    moving down is not held: it leaves as with 'exit'."""
    red, blue, gap = (0.9, -0.8, -0.6), (-0.8, -0.6, 0.9), 2

    def scene(t):  # red: 10 px square, left edge at 20 + 2t of a 40 px frame; blue: bottom rows, sliding down
        return square_frame([(8, 20 + 2 * t, 10, red), (30 + t, 2, 10, blue)])
    last, earlier = scene(gap), scene(0)
    stop = extrapolate(last, earlier, gap, horizons=4, radius=4, window=5, motion="segment", segment_tol=0.15,
                       edge="stop")
    exit_ = extrapolate(last, earlier, gap, horizons=4, radius=4, window=5, motion="segment", segment_tol=0.15)
    for k in range(1, 5):
        left = min(20 + 2 * (gap + k), 30)  # 30: the square's right column on the frame's last one
        assert torch.equal(stop[:, k - 1], square_frame([(8, left, 10, red), (30 + gap + k, 2, 10, blue)])), k
        assert torch.equal(exit_[:, k - 1], scene(gap + k)), k  # square_frame cuts what runs over the edge
    assert (exit_[0, 3, 0] == red[0]).sum() == 10 * 8  # cut: 8 of its 10 columns left at horizon 4
    assert (stop[0, 3, 0] == red[0]).sum() == 10 * 10


def test_segment_copy_pastes_the_whole_object_where_the_prediction_drew_it():
    """The last frame holds a flat square; the 'prediction' draws it moved by (3, 2), blurred, with a green fringe
    (a model's blotch). Segment copy decoding pastes the last frame's square whole at the moved place (to the
    quarter pixel that matches the blur best): inside it the square's colour, nothing red a pixel beyond it. A prediction that drew a different object there (a green
    square) matches too badly for any paste and stays as copy decoding leaves it; a still prediction is the last
    frame itself."""
    red, green = (0.9, -0.8, -0.6), (-0.7, 0.8, -0.5)
    last = square_frame([(10, 8, 12, red)])[:, None]  # (1, 1, 3, H, W)
    truth = square_frame([(13, 10, 12, red)])
    fringe = square_frame([(13, 10, 12, red), (12, 9, 14, green), (13, 10, 12, red)])  # green rim around it
    blotch = torch.nn.functional.avg_pool2d(0.5 * (truth + fringe), 5, stride=1, padding=2,
                                            count_include_pad=False)[:, None]
    out = segment_copy(blotch, last, last, radius=5, tol=0.15, threshold=50.0, copy_threshold=0.2)
    square = torch.zeros(40, 40, dtype=torch.bool)
    square[13:25, 10:22] = True
    ring = torch.nn.functional.max_pool2d(square[None, None].float(), 3, 1, 1)[0, 0].bool()  # one pixel around
    inner = ~torch.nn.functional.max_pool2d((~square)[None, None].float(), 3, 1, 1)[0, 0].bool()  # one pixel in
    is_red = out[0, 0, 0] > 0.5
    assert is_red[inner].all() and not is_red[~ring].any()  # the square, up to the fraction of a pixel it is placed at
    assert torch.allclose(out[0, 0][:, inner], truth[0][:, inner], atol=0.02)  # m = 1 - cost / 50: nearly 1
    assert (out - truth).abs().mean() < (blotch - truth).abs().mean() / 2  # the blurred fringe outside stays
    other = square_frame([(13, 10, 12, green)])[:, None]
    left = segment_copy(other, last, last, radius=5, tol=0.15, threshold=0.8, copy_threshold=0.2)
    assert not (left[0, 0, 0] > 0.5).any()  # no red pasted over the green square
    still = segment_copy(last, last, last, radius=5, tol=0.15, threshold=0.8, copy_threshold=0.2)
    assert torch.equal(still, last)


def test_segment_copy_places_an_object_to_a_fraction_of_a_pixel():
    """The prediction draws the square moved by (3, 2.5): half-way between two whole-pixel places, its edge columns
    half red (an antialiased outline). The pasted square lands there too, outline included; a whole-pixel paste
    could not."""
    red = (0.9, -0.8, -0.6)
    last = square_frame([(10, 8, 12, red)])[:, None]
    half = 0.5 * (square_frame([(13, 10, 12, red)]) + square_frame([(13, 11, 12, red)]))[:, None]
    out = segment_copy(half, last, last, radius=5, tol=0.15, threshold=50.0, copy_threshold=0.2)
    assert (out - half).abs().amax() < 0.02
    whole = square_frame([(13, 10, 12, red)])[:, None]
    assert (whole - half).abs().amax() > 0.5  # the nearest whole-pixel place is far off at the outline


def test_extrapolate_settings_are_checked():
    with pytest.raises(ValueError, match="motion"):
        extrapolate(textured(1, 8, 8), textured(1, 8, 8), 1, 1, 1, 3, motion="blocks")
    with pytest.raises(ValueError, match="edge"):
        extrapolate(textured(1, 8, 8), textured(1, 8, 8), 1, 1, 1, 3, motion="segment", segment_tol=0.1, edge="wrap")
    with pytest.raises(ValueError, match="segment"):
        extrapolate(textured(1, 8, 8), textured(1, 8, 8), 1, 1, 1, 3, edge="stop")


ANCHORS = {"diffusion.motion_anchor": True, "diffusion.anchor_gap": 1, "diffusion.anchor_radius": 2,
           "diffusion.anchor_window": 3}


def test_motion_anchor_model_sees_the_anchors_and_the_anchor_target_is_their_correction():
    """With motion_anchor the UNet is conditioned on past + one anchor per future frame; with target anchor, x0 is
    the future minus the anchors (zero when everything moves on as it did) and round-trips; a still past gives
    anchors that are the last past frame's decoding, re-encoded."""
    vae = FrozenVAE(tiny_kl_vae(seed=0))
    torch.manual_seed(0)
    model = VideoPredictionDiffusion(tiny_config(**ANCHORS, **{"diffusion.target": "anchor"}), vae)
    assert model.unet.t_past == 4  # 2 past + 2 anchors
    frames = smooth_frames(2, 4, 16, 16)
    past, future = vae.encode(frames[:, :2]), vae.encode(frames[:, 2:])
    anchors = model.anchor_latents(past)
    assert anchors.shape == future.shape
    assert model.to_x0(anchors, past).abs().max() == 0
    assert torch.allclose(model.from_x0(model.to_x0(future, past), past), future, atol=1e-6)
    assert model.context(past, anchors).shape == (2, 4, *past.shape[2:])
    still = past[:, -1:].expand_as(past).contiguous()
    decoded_last = vae.decode(still[:, -1:]).expand(2, 2, 3, 16, 16)
    assert torch.allclose(model.anchor_latents(still), vae.encode_moments(decoded_last)[0], atol=1e-5)
    loss = model.loss(past, future, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.predict(frames[:, :2], steps=2).shape == (2, 2, 3, 16, 16)


def test_motion_anchor_settings_are_checked():
    with pytest.raises(ConfigError) as e:
        tiny_config(**{"diffusion.target": "anchor"})
    assert "motion_anchor" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tiny_config(**(ANCHORS | {"diffusion.anchor_gap": 2, "diffusion.anchor_window": 4}))
    assert "diffusion.anchor_gap" in str(e.value) and "diffusion.anchor_window" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tiny_config(**(ANCHORS | {"diffusion.anchor_motion": "object", "diffusion.anchor_segment_tol": 2.5}))
    assert "diffusion.anchor_motion" in str(e.value) and "diffusion.anchor_segment_tol" in str(e.value)
    with pytest.raises(ConfigError, match="anchor_edge: stop needs"):
        tiny_config(**(ANCHORS | {"diffusion.anchor_edge": "stop"}))  # per-pixel motion has no objects
    with pytest.raises(ConfigError, match="diffusion.anchor_edge"):
        tiny_config(**(ANCHORS | {"diffusion.anchor_motion": "segment", "diffusion.anchor_edge": "bounce"}))


@pytest.mark.parametrize("motion", ["pixel", "segment"])
def test_a_motion_anchor_run_trains_loads_and_rolls_out(tmp_path, motion):
    """The real command line trains a run with motion anchors (per pixel or per colour region) and the anchor
    target; tools/evaluate.py loads it from its checkpoint (the UNet built for past + anchors, the anchor settings
    from its config) and rolls it out twice (anchors from predicted latents)."""
    from tools import evaluate
    world = make_world(tmp_path)
    raw = world.config(tmp_path / "runs", **{f"{k}": v for k, v in ANCHORS.items()},
                       **{"diffusion.target": "anchor", "diffusion.anchor_motion": motion, "train.max_steps": 3,
                          "eval.clips": 2})
    proc = run_cli(["--config", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert proc.returncode == 0, explain(proc)
    out = tmp_path / "ev"
    assert evaluate.main(["--run", str(tmp_path / "runs" / "run"), "--out", str(out), "--rollout", "2",
                          "--windows", "2"]) == 0
    psnr = json.loads((out / "evaluate.json").read_text())["psnr"]["model"]
    assert len(psnr) == 4 and all(v == v and v > 0 for v in psnr)  # four horizons, finite


def test_latent_cache_anchors_are_the_models_own_computed_once(tmp_path):
    """attach_anchors hands out, per window, what anchor_latents gives for the window's cached past (to float16),
    and a batch carrying them trains on the same loss as one whose anchors the model computes itself (target anchor
    and v-prediction, so other anchors change the loss)."""
    import numpy as np
    from configs.loader import config_from_dict
    from data import build_windows, discover_clips
    from data.latent_cache import LatentWindowDataset, build_or_load
    from training.distributed import DistInfo

    world = make_world(tmp_path)
    cfg = config_from_dict(world.config(tmp_path / "runs", **ANCHORS, **{"diffusion.target": "anchor",
                                                                   "diffusion.prediction_type": "v_prediction",
                                                                   "data.window_stride": 1}))
    clips = discover_clips(cfg.data)
    torch.manual_seed(0)
    model = VideoPredictionDiffusion.from_config(cfg)
    folder = build_or_load(clips, cfg.data, model.vae, tmp_path / "cache", DistInfo(), num_workers=0,
                           log=lambda *a: None)
    windows = build_windows(clips, cfg.data)
    ds = LatentWindowDataset(clips, cfg.data, windows, folder, list(range(len(clips))), with_std=False)
    assert "latent_anchors" not in ds[0]
    calls, decoded = [], []
    ds.attach_anchors(lambda past, frames: calls.append(len(past)) or model.anchor_latents(past, frames),
                      lambda z: decoded.append(z.shape[1]) or model.vae.decode(z), model.anchor_positions,
                      batch_size=3, show_progress=False)
    assert sum(calls) == len(windows) and max(calls) == 3  # every window once, in batches
    # each cached frame that is some window's anchor frame decoded once, not twice per window
    needed = {(w.clip, list(w.frames)[p]) for w in windows for p in model.anchor_positions}
    assert sum(decoded) == len(needed) < 2 * len(windows)
    for i in (0, len(windows) - 1):
        item = ds[i]
        past = item["latent_mean"][None, :cfg.data.t_past].float()
        expected = model.anchor_latents(past)[0].to(torch.float16)
        assert item["latent_anchors"].dtype == torch.float16
        assert torch.allclose(item["latent_anchors"].float(), expected.float(), atol=2e-3)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ("latent_mean", "latent_anchors")}
    own = model.batch_loss({"latent_mean": batch["latent_mean"]}, generator=torch.Generator().manual_seed(1))
    given = model.batch_loss(batch, generator=torch.Generator().manual_seed(1))
    assert np.isclose(own.item(), given.item(), rtol=1e-2), (own.item(), given.item())
    wrong = model.batch_loss({"latent_mean": batch["latent_mean"],  # the given anchors are the ones used
                              "latent_anchors": batch["latent_anchors"] + 3.0},
                             generator=torch.Generator().manual_seed(1))
    assert not np.isclose(wrong.item(), given.item(), rtol=1e-2)

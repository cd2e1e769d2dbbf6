"""Motion-compensated copying of the last past frame, for `sampler.residual_decode: warp`.

The diffusion model decides where things go; its decoded prediction D(z) is often right about place and wrong about
look (outlines soften, small objects turn into blotches from t+3 on, the VAE redraws texture). Block matching, as a
video codec's motion search does, finds for every pixel of D(z) the displacement d at which the decoded last past
frame D(z_last) looks the same around it; the output takes the camera's own pixel x_last(p + d) there, where the
match is good, and keeps D(z) where nothing in the last frame explains it (new content, disocclusion).

Written by hand because no library in our dependencies does dense block matching: torchvision's optical flow is
RAFT, which needs downloaded weights and is far heavier than an exhaustive search over a few hundred shifts.

`copy_decode` is the same with no motion (`sampler.residual_decode: copy`), `segment_copy` with one motion per
colour region, whole objects pasted where the prediction drew them (`sampler.residual_decode: segment`).

`extrapolate` goes the other way, for `diffusion.motion_anchor`: it measures each pixel's velocity between two past
frames and carries the last frame on at that velocity, a prediction without bounces or collisions that the model
sees beside the past.

Spaces: frames in [-1, 1], (N, 3, H, W); displacements in whole pixels, (N, 2, H, W) as (dy, dx), meaning the
pixel at p comes from p + d in the reference frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# tie-break towards small motions, per pixel of |dy| + |dx|, in the matching cost's units (mean abs change in
# [-1, 1]): on a flat background many shifts match equally, and the nearest one is the honest answer
_SHIFT_PENALTY = 2e-3


def box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of x (N, 1, H, W) over the size x size box around each pixel, the part inside the frame: a row pass then
    a column pass (the same numbers as one 2-D pool, in a third less time at size 9)."""
    x = F.avg_pool2d(x, (1, size), stride=1, padding=(0, size // 2), count_include_pad=False)
    return F.avg_pool2d(x, (size, 1), stride=1, padding=(size // 2, 0), count_include_pad=False)


def shifted_changes(target: torch.Tensor, reference: torch.Tensor, radius: int):
    """For each shift d = (dy, dx) with |dy|, |dx| <= radius, row by row: (dy, dx, max_rgb |target(p) -
    reference(p + d)| as (N, 1, H, W)) for target and reference (N, 3, H, W) in [-1, 1]. Outside the frame the
    reference reads as a colour 4 units away from any pixel, so a shift that reaches outside costs >= 2 there and
    never wins against one that stays inside."""
    h, w, r = target.shape[-2], target.shape[-1], radius
    padded = F.pad(reference, (r, r, r, r), value=5.0)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yield dy, dx, (target - padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]).abs().amax(dim=1, keepdim=True)


def block_match(target: torch.Tensor, reference: torch.Tensor, radius: int,
                window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pixel p of target (N, 3, H, W), the shift d with |dy|, |dx| <= radius minimising the mean over a
    window x window box around p of max_rgb |target(q) - reference(q + d)|; reference (N, 3, H, W) in the same space.
    Returns (displacement (N, 2, H, W) long as (dy, dx), cost (N, 1, H, W): that mean at the chosen shift, without
    the tie-break). Shifts that reach outside the reference never win against one that stays inside."""
    assert target.shape == reference.shape and target.ndim == 4, f"{tuple(target.shape)} vs {tuple(reference.shape)}"
    assert radius >= 0 and window >= 1 and window % 2 == 1, f"radius {radius}, window {window} (odd)"
    n, _, h, w = target.shape
    best = torch.full((n, 1, h, w), float("inf"), device=target.device)
    disp_y = torch.zeros((n, 1, h, w), dtype=torch.long, device=target.device)
    disp_x = torch.zeros_like(disp_y)
    for dy, dx, change in shifted_changes(target, reference, radius):
        cost = box_mean(change, window) + _SHIFT_PENALTY * (abs(dy) + abs(dx))
        better = cost < best
        best = torch.where(better, cost, best)
        disp_y = torch.where(better, dy, disp_y)
        disp_x = torch.where(better, dx, disp_x)
    disp = torch.cat([disp_y, disp_x], dim=1)
    return disp, best - _SHIFT_PENALTY * disp.abs().sum(dim=1, keepdim=True)  # the tie-break taken out again


def warp(frames: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """frames (N, C, H, W), disp (N, 2, H, W) whole-pixel (dy, dx) -> out(p) = frames(p + d), p + d clamped to
    the frame (block_match never picks a shift that leaves it where one inside matches as well)."""
    n, c, h, w = frames.shape
    ys = torch.arange(h, device=frames.device).view(1, h, 1)
    xs = torch.arange(w, device=frames.device).view(1, 1, w)
    src_y = (ys + disp[:, 0]).clamp(0, h - 1)
    src_x = (xs + disp[:, 1]).clamp(0, w - 1)
    index = (src_y * w + src_x).view(n, 1, h * w).expand(n, c, h * w)
    return frames.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)


def still_weight(pred: torch.Tensor, last_rec: torch.Tensor, threshold: float) -> torch.Tensor:
    """m = 1 - max_rgb |pred - last_rec| / threshold clamped to [0, 1], on the channel axis (dim -3) kept as 1: 1 where
    the decoded prediction did not move away from the decoded last frame, 0 at a change of `threshold`."""
    return (1 - (pred - last_rec).abs().amax(dim=-3, keepdim=True) / threshold).clamp(0, 1)


def copy_decode(pred: torch.Tensor, last: torch.Tensor, last_rec: torch.Tensor, threshold: float) -> torch.Tensor:
    """Copy decoding: x = pred + m (x_last - pred), m = still_weight: the camera's last frame itself where the
    prediction did not change (a change below the threshold is taken for sampling noise), the prediction where it did."""
    return (pred + still_weight(pred, last_rec, threshold) * (last - pred)).clamp(-1, 1)


def motion_compensated_copy(pred: torch.Tensor, last: torch.Tensor, last_rec: torch.Tensor, radius: int,
                            window: int, threshold: float) -> torch.Tensor:
    """Decoded prediction pred (B, Tf, 3, H, W), the last past frame `last` and its VAE reconstruction `last_rec`
    (B, 1, 3, H, W), all in [-1, 1] -> x = pred + m (x_last(p + d) - pred): d from block_match of pred against
    last_rec (the same VAE's look on both sides, so its blur does not bias the search), m = 1 - cost / threshold
    clamped to [0, 1] (m = 0 where the best match still differs by `threshold` on average over the window)."""
    b, tf, c, h, w = pred.shape
    target = pred.reshape(b * tf, c, h, w)
    reference = last_rec.expand(b, tf, c, h, w).reshape(b * tf, c, h, w)
    disp, cost = block_match(target, reference, radius, window)
    source = warp(last.expand(b, tf, c, h, w).reshape(b * tf, c, h, w).to(target.dtype), disp)
    keep = (1 - cost / threshold).clamp(0, 1)
    return (target + keep * (source - target)).view(b, tf, c, h, w).clamp(-1, 1)


def fill_holes(frames: torch.Tensor, hole: torch.Tensor, source: torch.Tensor | None = None,
               max_iters: int = 32) -> torch.Tensor:
    """frames (N, C, H, W) with hole (N, 1, H, W) bool -> the hole pixels filled from the outside in, each with the
    mean of its known 3x3 neighbours (smooth backgrounds come back nearly as they were; nothing is invented). Known
    at the start: `source` (N, 1, H, W) bool, default every pixel outside the hole; pixels in neither keep their
    values and give none. A hole pixel with no known pixel within max_iters keeps its value."""
    known = (~hole if source is None else source & ~hole).to(frames.dtype)
    x = frames * known
    for _ in range(max_iters):
        total, count = F.avg_pool2d(x, 3, 1, 1), F.avg_pool2d(known, 3, 1, 1)
        new = hole & (known == 0) & (count > 0)
        if not bool(new.any()):  # every hole pixel filled, or the rest has no known pixel around it, now or later
            break
        x = torch.where(new, total / count.clamp_min(1e-6), x)
        known = torch.where(new, torch.ones_like(known), known)
    return torch.where(hole & (known > 0), x, frames)


_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def colour_segments(frames: torch.Tensor, tol: float) -> torch.Tensor:
    """frames (N, 3, H, W) in [-1, 1] -> labels (N, H, W) long: the 8-connected regions in which neighbours differ
    by less than `tol` (max over RGB), each labelled by the flat index (y * W + x) of its last pixel. A flat object
    is one region, a smooth background another; a 1-pixel antialiased edge falls into small regions of its own.
    Labels spread to the largest index among joined neighbours, with pointer jumping (label <- label of the pixel the
    label names), so a long winding region settles in far fewer rounds than it has pixels."""
    n, _, h, w = frames.shape
    padded = F.pad(frames, (1, 1, 1, 1), value=10.0)  # outside: never joins (|diff| >= 9)
    joins = [(frames - padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]).abs().amax(1) < tol
             for dy, dx in _NEIGHBOURS]
    labels = torch.arange(h * w, device=frames.device).expand(n, h * w).reshape(n, h, w).clone()
    for _ in range(h * w):  # a bound never reached: jumping settles a region in far fewer rounds than its length
        spread = F.pad(labels, (1, 1, 1, 1), value=-1)
        new = labels
        for (dy, dx), join in zip(_NEIGHBOURS, joins):
            new = torch.where(join, torch.maximum(new, spread[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        new = new.reshape(n, h * w).gather(1, new.reshape(n, h * w)).view(n, h, w)  # jump: a label's own label
        if torch.equal(new, labels):
            break
        labels = new
    return labels


# a colour region smaller than this (pixels) has no motion of its own: an antialiased edge, a speck of texture
_MIN_SEGMENT = 32
# the matching cost a region sums is taken over 3x3 boxes: a single pixel's colour is too noisy after a VAE
_SEGMENT_BOX = 3
# how far (pixels) a small region's pixel looks for the motion of a large region next to it
_SEGMENT_REACH = 2
# cost volumes (shifts x pixels) larger than this many floats are built a few frames at a time
_VOLUME_FLOATS = 1 << 25


def segment_motion(last: torch.Tensor, earlier: torch.Tensor, radius: int,
                   tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One displacement per colour region of `last` (N, 3, H, W) against `earlier`: the shift d (|dy|, |dx| <=
    radius) minimising the region's mean matching cost (max_rgb |last(q) - earlier(q + d)| over 3x3 boxes, plus
    block_match's small-motion tie-break). Every pixel of a flat object then moves as one, where per-pixel matching
    leaves its inside (which matches at any shift) behind and drags a ring of background along. Pixels of small
    regions (_MIN_SEGMENT: antialiased edges) take, of no motion and the motions of large regions within
    _SEGMENT_REACH px, the one their own 3x3 box matches best. Returns (displacement (N, 2, H, W) long as (dy, dx),
    cost (N, 1, H, W): the mean cost of the region whose motion the pixel took, or its own where it took none;
    extrapolate draws the better-matched region on top where two meet, owner (N, H, W) long: the label (flat index
    into N x H x W) of that region, so an object's antialiased edge belongs to the object)."""
    assert last.shape == earlier.shape and last.ndim == 4, f"{tuple(last.shape)} vs {tuple(earlier.shape)}"
    n, _, h, w = last.shape
    shifts = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    per_call = max(1, _VOLUME_FLOATS // (len(shifts) * h * w))
    if n > per_call:
        parts = [segment_motion(last[i:i + per_call], earlier[i:i + per_call], radius, tol)
                 for i in range(0, n, per_call)]
        owner = [p[2] + i * per_call * h * w for i, p in enumerate(parts)]  # labels stay unique across the parts
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(owner)
    device = last.device
    key = (colour_segments(last, tol) + torch.arange(n, device=device).view(n, 1, 1) * (h * w)).view(-1)
    size = torch.bincount(key, minlength=n * h * w).to(last.dtype)
    change = torch.stack([c[:, 0] for _, _, c in shifted_changes(last, earlier, radius)])  # (K, N, H, W), shifts' order
    volume = box_mean(change.view(-1, 1, h, w), _SEGMENT_BOX).view(len(shifts), n, h, w)  # per-pixel box cost
    region = torch.zeros(len(shifts), n * h * w, device=device, dtype=last.dtype).index_add_(
        1, key, volume.view(len(shifts), -1))  # summed over each region, at its label
    penalty = _SHIFT_PENALTY * torch.tensor([abs(dy) + abs(dx) for dy, dx in shifts], device=device,
                                             dtype=last.dtype)
    region = region / size.clamp_min(1) + penalty.view(-1, 1)
    region_cost, region_shift = region.min(0)
    shift = region_shift[key].view(n, h, w)
    cost = region_cost[key].view(n, h, w)
    large = (size[key] >= _MIN_SEGMENT).view(n, h, w)
    # small regions: no motion, or a large neighbour's, whichever matches the pixel's own box best
    still = len(shifts) // 2  # (0, 0)
    best_cost = volume[still].clone()
    best_shift = torch.full_like(shift, still)
    best_region = best_cost.clone()
    key = key.view(n, h, w)
    best_owner = key.clone()
    q = _SEGMENT_REACH
    pad = lambda x, v: F.pad(x, (q, q, q, q), value=v)  # noqa: E731
    shift_p, large_p, cost_p, key_p = pad(shift, still), pad(large, False), pad(cost, 0.0), pad(key, 0)
    for oy in range(-q, q + 1):
        for ox in range(-q, q + 1):
            window = (slice(None), slice(q + oy, q + oy + h), slice(q + ox, q + ox + w))
            candidate = shift_p[window]
            mine = volume.gather(0, candidate.unsqueeze(0))[0]
            better = large_p[window] & (mine < best_cost)
            best_cost = torch.where(better, mine, best_cost)
            best_shift = torch.where(better, candidate, best_shift)
            best_region = torch.where(better, cost_p[window], best_region)
            best_owner = torch.where(better, key_p[window], best_owner)
    shift = torch.where(large, shift, best_shift)
    cost = torch.where(large, cost, best_region)
    table = torch.tensor(shifts, device=device)  # (K, 2)
    disp = table[shift].permute(0, 3, 1, 2)
    cost = cost - _SHIFT_PENALTY * disp.abs().sum(1)  # the tie-break taken out again
    return disp, cost.unsqueeze(1), torch.where(large, key, best_owner)


def edge_room(moving: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """How far each moving pixel's object may still move before it touches the picture's edge: (N, 4, H, W) long as
    (up, down, left, right), the gaps between the bounding box of the moving pixels sharing its `owner` and the
    border. An object that touches the edge already (the background, something entering or leaving) gets H + W on
    every side: no limit (any step that far lands outside anyway). moving (N, H, W) bool, owner (N, H, W) long labels
    unique over the batch."""
    n, h, w = moving.shape
    ys = torch.arange(h, device=owner.device).view(1, h, 1).expand(n, h, w)
    xs = torch.arange(w, device=owner.device).view(1, 1, w).expand(n, h, w)
    key = owner[moving]
    box = []
    for coord, reduce, fill in ((ys, "amin", h), (ys, "amax", -1), (xs, "amin", w), (xs, "amax", -1)):
        box.append(torch.full((owner.numel(),), fill, device=owner.device).scatter_reduce(0, key, coord[moving],
                                                                                         reduce)[owner])
    room = torch.stack([box[0], h - 1 - box[1], box[2], w - 1 - box[3]], 1)  # (N, 4, H, W)
    inside = (room > 0).all(1, keepdim=True)
    return torch.where(inside, room, h + w)


def _land(sources: torch.Tensor, ty: torch.Tensor, tx: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Where moving pixels land: sources (N, H * W) long, the priority of each source pixel (the largest wins a
    spot; its value mod H * W is its flat index), ty / tx (N, H, W) the spot each moves to, moving (N, H, W) bool
    which pixels move -> (N, H * W) the winning source's priority per spot, -1 where none landed (a pixel moved out
    of the frame lands nowhere)."""
    n, h, w = moving.shape
    lands = moving & (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
    spot = torch.where(lands, ty * w + tx, h * w).reshape(n, h * w)  # h * w: a slot for "nowhere"
    winner = torch.full((n, h * w + 1), -1, dtype=torch.long, device=sources.device)
    winner.scatter_reduce_(1, spot, torch.where(lands.reshape(n, -1), sources, -1), "amax")
    return winner[:, :h * w]


def _by_cost(cost: torch.Tensor) -> torch.Tensor:
    """Landing priorities (N, H * W) for _land from matching costs (N, 1, H, W): the lowest cost (in 1e-4 steps)
    first, then the highest index."""
    n, _, h, w = cost.shape
    rank = torch.round((cost.amax() - cost).reshape(n, h * w) * 1e4).long()
    return rank * (h * w) + torch.arange(h * w, device=cost.device)


def extrapolate(last: torch.Tensor, earlier: torch.Tensor, gap: int, horizons: int, radius: int,
                window: int, motion: str = "pixel", segment_tol: float | None = None,
                edge: str = "exit") -> torch.Tensor:
    """Constant-velocity extrapolation: last (N, 3, H, W) and the frame `gap` frames before it -> the frames 1 ..
    `horizons` after `last`, (N, horizons, 3, H, W). Each pixel's velocity is -d / gap (so motions finer than a
    pixel per frame are kept to 1 / gap px), d from
    - motion "pixel": block_match of `last` against `earlier` (window x window boxes);
    - motion "segment": segment_motion, one d per colour region of `last` (regions of neighbours closer than
      segment_tol, required: diffusion.anchor_segment_tol): flat objects move whole.
    A moving pixel is carried to p + k v (rounded) at horizon k, over whatever did not move. Among moving pixels
    landing on one spot, "pixel" lets the highest index win (deterministic), "segment" the better-matched region (an
    object that was hidden in part matches worse: it goes behind). Where a moving pixel left and none arrived the
    background is filled in from around (fill_holes): "pixel" from every pixel there, "segment" from still pixels
    only, so an object does not smear its own colour into the place it left. Static pixels stay as they are.

    `edge` (diffusion.anchor_edge): "exit" carries whatever runs over the picture's edge out of it (cut off); "stop"
    (segment motion only) stops an object that was wholly inside the last frame where it touches the edge, whole:
    a straight line through a wall is the anchor's worst guess (the object cut in half, while in the demo's world it
    bounces back), and an object that does leave is better redrawn leaving by the model than handed over cut."""
    if edge not in ("exit", "stop"):
        raise ValueError(f"edge {edge!r}: expected 'exit' or 'stop'")
    if edge == "stop" and motion != "segment":
        raise ValueError("edge 'stop' needs motion 'segment' (objects are colour regions)")
    room = None
    if motion == "segment":
        if segment_tol is None:
            raise ValueError("motion 'segment' needs segment_tol (diffusion.anchor_segment_tol)")
        disp, cost, owner = segment_motion(last, earlier, radius, segment_tol)
        if edge == "stop":
            room = edge_room(disp.abs().sum(1) > 0, owner)
    elif motion == "pixel":
        disp, cost = block_match(last, earlier, radius, window)[0], None
    else:
        raise ValueError(f"motion {motion!r}: expected 'pixel' or 'segment'")
    n, c, h, w = last.shape
    velocity = -disp.to(last.dtype) / gap  # (N, 2, H, W), pixels per frame
    moving = disp.abs().sum(1) > 0  # (N, H, W)
    ys = torch.arange(h, device=last.device).view(1, h, 1)
    xs = torch.arange(w, device=last.device).view(1, 1, w)
    source = torch.arange(h * w, device=last.device).expand(n, h * w) if cost is None else _by_cost(cost)
    flat = last.reshape(n, c, h * w)
    out = []
    for k in range(1, horizons + 1):
        step = torch.round(k * velocity).long()  # (N, 2, H, W)
        if room is not None:  # whole objects stop at the edge: each axis clamped to the room its box has there
            step = torch.stack([step[:, 0].clamp(-room[:, 0], room[:, 1]), step[:, 1].clamp(-room[:, 2], room[:, 3])], 1)
        winner = _land(source, ys + step[:, 0], xs + step[:, 1], moving)
        arrived = winner >= 0
        winner = winner % (h * w)
        moved = torch.where(arrived.unsqueeze(1), flat.gather(2, winner.unsqueeze(1).expand(n, c, -1)), flat)
        hole = (moving.reshape(n, -1) & ~arrived).view(n, 1, h, w)
        still = None if cost is None else (~moving.reshape(n, -1) & ~arrived).view(n, 1, h, w)
        out.append(fill_holes(moved.view(n, c, h, w), hole, still))
    return torch.stack(out, 1)


# Lucas-Kanade steps by which segment_copy places each region to a fraction of a pixel (whole-pixel pastes cost the
# demo 1.85 dB at t+1; QUALITY.md, session 20)
_PASTE_STEPS = 3


def segment_copy(pred: torch.Tensor, last: torch.Tensor, last_rec: torch.Tensor, radius: int, tol: float,
                 threshold: float, copy_threshold: float) -> torch.Tensor:
    """Copy decoding with whole objects: decoded prediction pred (B, Tf, 3, H, W), the last past frame `last` and its
    VAE reconstruction `last_rec` (B, 1, 3, H, W), all in [-1, 1] -> frames. segment_motion finds, for each colour
    region of last_rec (an object, with its antialiased edge), the one shift d that puts it where the prediction drew
    it, refined to a fraction of a pixel (_subpixel_paste: least squares on its bilinearly shifted reconstruction); each
    region that moved is pasted whole from the camera's last frame there, over copy decoding (the last
    frame where the prediction did not change, `copy_threshold`), with weight m = 1 - cost / threshold clamped to
    [0, 1] (cost: the region's mean matching cost, so an object the prediction drew differently, or changed by an
    occlusion, is left to the model). Where two pasted regions land on one spot the better-matched one is on top.
    The model decides where each object goes; the last frame supplies how it looks, outline included."""
    b, tf, c, h, w = pred.shape
    target = pred.reshape(b * tf, c, h, w)
    cam = last.expand(b, tf, c, h, w).reshape(b * tf, c, h, w).to(target.dtype)
    rec = last_rec.expand(b, tf, c, h, w).reshape(b * tf, c, h, w).to(target.dtype)
    base = copy_decode(target, cam, rec, copy_threshold)
    disp, cost, owner = segment_motion(rec, target, radius, tol)
    n = b * tf
    ys = torch.arange(h, device=pred.device).view(1, h, 1)
    xs = torch.arange(w, device=pred.device).view(1, 1, w)
    # the better-matched region on top where two land on one spot, as extrapolate draws them
    winner = _land(_by_cost(cost), ys + disp[:, 0], xs + disp[:, 1], disp.abs().sum(1) > 0)
    arrived = (winner >= 0).view(n, 1, h, w)
    winner = (winner % (h * w)).clamp_min(0)
    pasted = _subpixel_paste(cam, rec, target, winner, arrived, owner, _PASTE_STEPS)
    won = cost.reshape(n, h * w).gather(1, winner).view(n, 1, h, w)
    m = (1 - won / threshold).clamp(0, 1) * arrived
    return (base + m * (pasted - base)).view(b, tf, c, h, w).clamp(-1, 1)


def _sample(frames: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """frames (N, C, H, W) read at fractional positions y, x (N, H, W) (bilinear, clamped to the frame)."""
    n, c, h, w = frames.shape
    grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], -1).to(frames.dtype)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _subpixel_paste(cam, rec, target, winner, arrived, owner, iters: int) -> torch.Tensor:
    """The regions segment_copy pastes at whole-pixel shifts, each moved on by the fraction of a pixel (within +-0.5
    per axis) at which its bilinearly shifted reconstruction fits the prediction best in least squares: `iters`
    Gauss-Newton steps of Lucas-Kanade, summed over each region's pixels. Objects move by fractions of a pixel,
    their antialiased outlines with them; a symmetric blur in the prediction (a model's soft outline) pulls no way,
    where picking the best of a few fractional shifts by their cost would prefer the blurrier, half-pixel ones."""
    n, c, h, w = target.shape
    qy = (winner // w).view(n, h, w).to(target.dtype)
    qx = (winner % w).view(n, h, w).to(target.dtype)
    label = owner.reshape(n, h * w).gather(1, winner).view(-1)  # the pasted region of each destination pixel
    got = arrived.view(n, 1, h, w).to(target.dtype)
    gy = F.pad((rec[:, :, 2:] - rec[:, :, :-2]) / 2, (0, 0, 1, 1))  # d rec / d y, d rec / d x (central differences)
    gx = F.pad((rec[..., 2:] - rec[..., :-2]) / 2, (1, 1, 0, 0))
    f = torch.zeros(2, n * h * w, device=target.device, dtype=target.dtype)  # (fy, fx) per region label

    def per_region(x):  # (N, C, H, W) summed over channels and each region's destination pixels
        return torch.zeros(n * h * w, device=x.device, dtype=x.dtype).index_add_(0, label, (x * got).sum(1).view(-1))
    for _ in range(iters):  # a region moved by d + f reads, at its destination p, the frame at q - f
        py, px = qy - f[0][label].view(n, h, w), qx - f[1][label].view(n, h, w)
        r = target - _sample(rec, py, px)  # rec(q - f - delta) ~ rec(q - f) - delta . grad
        sy, sx = _sample(gy, py, px), _sample(gx, py, px)
        ayy, axy, axx = per_region(sy * sy), per_region(sy * sx), per_region(sx * sx)
        by, bx = per_region(-sy * r), per_region(-sx * r)
        det = (ayy * axx - axy * axy).clamp_min(1e-6)
        step = torch.stack([(axx * by - axy * bx) / det, (ayy * bx - axy * by) / det])
        f = (f + step).clamp(-0.5, 0.5)
    return _sample(cam, qy - f[0][label].view(n, h, w), qx - f[1][label].view(n, h, w))

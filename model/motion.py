"""Motion-compensated copying of the last past frame, for `sampler.residual_decode: warp`.

The diffusion model decides where things go; its decoded prediction D(z) is often right about place and wrong about
look (outlines soften, small objects turn into blotches from t+3 on, the VAE redraws texture). Block matching, as a
video codec's motion search does, finds for every pixel of D(z) the displacement d at which the decoded last past
frame D(z_last) looks the same around it; the output takes the camera's own pixel x_last(p + d) there, where the
match is good, and keeps D(z) where nothing in the last frame explains it (new content, disocclusion).

Written by hand because no library in our dependencies does dense block matching: torchvision's optical flow is
RAFT, which needs downloaded weights and is far heavier than an exhaustive search over a few hundred shifts.

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


def block_match(target: torch.Tensor, reference: torch.Tensor, radius: int,
                window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pixel p of target (N, 3, H, W), the shift d with |dy|, |dx| <= radius minimising the mean over a
    window x window box around p of max_rgb |target(q) - reference(q + d)|; reference (N, 3, H, W) in the same space.
    Returns (displacement (N, 2, H, W) long as (dy, dx), cost (N, 1, H, W): that mean at the chosen shift, without
    the tie-break). Shifts that reach outside the reference never win against one that stays inside."""
    assert target.shape == reference.shape and target.ndim == 4, f"{tuple(target.shape)} vs {tuple(reference.shape)}"
    assert radius >= 0 and window >= 1 and window % 2 == 1, f"radius {radius}, window {window} (odd)"
    n, _, h, w = target.shape
    r = radius
    # outside the frame reads as a colour 4 units away from any pixel in [-1, 1]: the cost there is >= 2
    padded = F.pad(reference, (r, r, r, r), value=5.0)
    best = torch.full((n, 1, h, w), float("inf"), device=target.device)
    disp_y = torch.zeros((n, 1, h, w), dtype=torch.long, device=target.device)
    disp_x = torch.zeros_like(disp_y)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w]  # reference(p + d)
            change = (target - shifted).abs().amax(dim=1, keepdim=True)
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


def fill_holes(frames: torch.Tensor, hole: torch.Tensor, max_iters: int = 32) -> torch.Tensor:
    """frames (N, C, H, W) with hole (N, 1, H, W) bool -> the hole pixels filled from the outside in, each with the
    mean of its known 3x3 neighbours (smooth backgrounds come back nearly as they were; nothing is invented). A hole
    pixel with no known pixel within max_iters keeps its value."""
    known = (~hole).to(frames.dtype)
    x = frames * known
    for _ in range(max_iters):
        if bool(known.min() > 0):
            break
        total, count = F.avg_pool2d(x, 3, 1, 1), F.avg_pool2d(known, 3, 1, 1)
        new = (count > 0) & (known == 0)
        x = torch.where(new, total / count.clamp_min(1e-6), x)
        known = torch.where(new, torch.ones_like(known), known)
    return torch.where(known > 0, x, frames)


def extrapolate(last: torch.Tensor, earlier: torch.Tensor, gap: int, horizons: int, radius: int,
                window: int) -> torch.Tensor:
    """Constant-velocity extrapolation: last (N, 3, H, W) and the frame `gap` frames before it -> the frames 1 ..
    `horizons` after `last`, (N, horizons, 3, H, W). Each pixel's velocity is -d / gap, d from block_match of `last`
    against `earlier` (so motions finer than a pixel per frame are kept to 1 / gap px); a moving pixel is carried to
    p + k v (rounded) at horizon k, over whatever did not move (among moving pixels landing on one spot, the one
    with the highest index wins: deterministic); where a moving pixel left and none arrived, the background is
    filled in from around (fill_holes). Static pixels stay as they are."""
    disp, _ = block_match(last, earlier, radius, window)
    n, c, h, w = last.shape
    velocity = -disp.to(last.dtype) / gap  # (N, 2, H, W), pixels per frame
    moving = disp.abs().sum(1) > 0  # (N, H, W)
    ys = torch.arange(h, device=last.device).view(1, h, 1)
    xs = torch.arange(w, device=last.device).view(1, 1, w)
    source = torch.arange(h * w, device=last.device).expand(n, h * w)
    flat = last.reshape(n, c, h * w)
    out = []
    for k in range(1, horizons + 1):
        ty = (ys + torch.round(k * velocity[:, 0])).long()
        tx = (xs + torch.round(k * velocity[:, 1])).long()
        lands = moving & (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        target = torch.where(lands, ty * w + tx, h * w).reshape(n, h * w)  # h * w: a slot for "nowhere"
        winner = torch.full((n, h * w + 1), -1, dtype=torch.long, device=last.device)
        winner.scatter_reduce_(1, target, torch.where(lands.reshape(n, -1), source, -1), "amax")
        winner = winner[:, :h * w]
        arrived = winner >= 0
        moved = torch.where(arrived.unsqueeze(1), flat.gather(2, winner.clamp_min(0).unsqueeze(1).expand(n, c, -1)),
                            flat)
        hole = (moving.reshape(n, -1) & ~arrived).view(n, 1, h, w)
        out.append(fill_holes(moved.view(n, c, h, w), hole))
    return torch.stack(out, 1)

#!/usr/bin/env python
"""Do predicted objects continue their motion, bounces included? Object positions in the predictions of a run
trained on the synthetic world, against the world's ground-truth tracks.

    python tools/bounce_check.py --run runs/demo [--windows 48] [--steps 20] [--out runs/demo/eval]

For validation windows the synthetic world knows where every object is (`data.synthetic.object_tracks`). An
object "bounces" in a window when a wall reflects it during the predicted frames: its true position then leaves
the straight line through its last two past positions by more than 1 pixel. For each predicted frame the tool
finds each object by its colour (pixels within 0.2 of it in every channel; the median of their coordinates) and
measures its distance to the true position, next to two motion models that are not learned: copy-last (the
object stays) and straight-line (it keeps its last velocity and passes through the wall). A model that learned
the bounces is closer to the truth than both on bouncing objects. Objects occluded in the TRUE frame (found more
than 1.5 px from their track there) are left out. Writes bounce_check.json and bounce_windows.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.dataset import VideoWindowDataset  # noqa: E402
from data.pixels import to_unit  # noqa: E402
from data.synthetic import object_tracks  # noqa: E402
from data.windows import spread  # noqa: E402
from tools.run_tools import add_run_args, load_synthetic_run, val_dataset  # noqa: E402
from training.visualize import sample_grid  # noqa: E402

COLOUR_TOL = 0.2  # per channel, in [0, 1]
OCCLUDED_PX = 1.5  # the true frame's colour centroid farther than this from the track: occluded, left out
BOUNCE_PX = 1.0  # deviation from the straight line that makes a bounce
TOUCH_MARGIN = 1.05  # objects whose centres come closer than this times the sum of their half sizes touch or overlap


def colour_mask(frame: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of an (H, W, 3) [0, 1] frame within COLOUR_TOL of `colour` in every channel."""
    return np.abs(frame - colour).max(-1) < COLOUR_TOL


def find(frame: np.ndarray, colour: np.ndarray, min_pixels: int) -> np.ndarray | None:
    """(x, y) median of the pixels of `colour` in an (H, W, 3) [0, 1] frame (pixel centres), None if too few."""
    ys, xs = np.nonzero(colour_mask(frame, colour))
    if len(xs) < min_pixels:
        return None
    return np.array([np.median(xs) + 0.5, np.median(ys) + 0.5])


def window_objects(ds: VideoWindowDataset, index: int, sc, cache: dict) -> dict:
    """True future positions, copy-last and straight-line positions of each object in window `index`, scaled to
    the data's frame size: arrays (Tf, N, 2), which objects bounce, and which touch or overlap another object in
    some frame of the window (centres closer than TOUCH_MARGIN times the sum of their half sizes)."""
    w = ds.windows[index]
    clip = ds.clips[w.clip]
    ci = int(clip.name.rsplit("_", 1)[1])
    if ci not in cache:
        cache[ci] = object_tracks(sc, ci)
    tr = cache[ci]
    scale = np.array([ds.cfg.width / sc.width, ds.cfg.height / sc.height])
    pos = np.stack([tr.x, tr.y], -1)[list(w.frames)] * scale  # (T, N, 2)
    tp = ds.cfg.t_past
    last, velocity = pos[tp - 1], pos[tp - 1] - pos[tp - 2]
    steps = np.arange(1, len(w.frames) - tp + 1)[:, None, None]
    straight = last[None] + velocity[None] * steps
    true = pos[tp:]
    bounce = np.linalg.norm(true - straight, axis=-1).max(0) > BOUNCE_PX
    gap = np.linalg.norm(pos[:, :, None] - pos[:, None, :], axis=-1)  # (T, N, N) centre distances
    reach = TOUCH_MARGIN * (tr.radius[:, None] + tr.radius[None, :]) * scale.mean()
    near = (gap < reach[None]) & ~np.eye(len(tr.radius), dtype=bool)[None]
    return {"true": true, "copy_last": np.broadcast_to(last, true.shape), "straight": straight, "bounce": bounce,
            "touching": near.any(axis=(0, 2)),
            "colour": tr.colour, "area": (2 * tr.radius * scale.mean()) ** 2 * np.where(tr.square, 1, np.pi / 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "run folder trained on the synthetic world", "noise seed",
                 "bounce_check.json and bounce_windows.png")
    p.add_argument("--windows", type=int, default=48, help="validation windows WITH a bounce to predict")
    args = p.parse_args(argv)

    loaded = load_synthetic_run(args)
    if loaded is None:
        return 1
    cfg = loaded.cfg
    sc = cfg.data.synthetic
    ds = val_dataset(loaded)
    cache: dict = {}
    objects = {i: window_objects(ds, i, sc, cache) for i in range(len(ds))}
    with_bounce = [i for i, o in objects.items() if o["bounce"].any()]
    picked = [with_bounce[j] for j in spread(len(with_bounce), args.windows)]
    if not picked:
        print("error: no validation window has a bounce in its future frames", file=sys.stderr)
        return 1

    # ---- predict the picked windows (EMA net, seeded noise per window)
    model, net = loaded.model, loaded.net("ema")
    steps = args.steps or cfg.sampler.num_inference_steps
    preds, pasts, truths = [], [], []
    for start in range(0, len(picked), 16):
        items = [ds[i] for i in picked[start:start + 16]]
        frames = torch.stack([it["frames"] for it in items])
        cond = torch.stack([it["cond"] for it in items])
        past, truth = frames[:, :model.t_past], frames[:, model.t_past:]
        g = torch.Generator().manual_seed(args.seed + start)
        preds.append(model.predict(past, cond if cond.numel() else None, steps=steps, generator=g, net=net).cpu())
        pasts.append(past)
        truths.append(truth)
    pred, past, truth = torch.cat(preds), torch.cat(pasts), torch.cat(truths)
    pred_img = to_unit(pred).permute(0, 1, 3, 4, 2).numpy()  # (B, Tf, H, W, 3) in [0, 1]
    true_img = to_unit(truth).permute(0, 1, 3, 4, 2).numpy()

    # ---- distances to the true positions, per horizon step, bouncing objects and the others
    tf = model.t_future
    names = ("model", "straight_line", "copy_last")
    dist = {kind: {n: [[] for _ in range(tf)] for n in names} for kind in ("bouncing", "not_bouncing")}
    lost = {kind: [0] * tf for kind in dist}
    for b, i in enumerate(picked):
        o = objects[i]
        for k in range(len(o["colour"])):
            kind = "bouncing" if o["bounce"][k] else "not_bouncing"
            min_pixels = max(4, int(0.3 * o["area"][k]))
            for j in range(tf):
                true_pos = o["true"][j, k]
                seen = find(true_img[b, j], o["colour"][k], min_pixels)
                if seen is None or np.linalg.norm(seen - true_pos) > OCCLUDED_PX:
                    continue  # occluded (or cut) in the true frame: no fair position to compare with
                found = find(pred_img[b, j], o["colour"][k], min_pixels)
                if found is None:
                    lost[kind][j] += 1
                    continue
                dist[kind]["model"][j].append(float(np.linalg.norm(found - true_pos)))
                dist[kind]["straight_line"][j].append(float(np.linalg.norm(o["straight"][j, k] - true_pos)))
                dist[kind]["copy_last"][j].append(float(np.linalg.norm(o["copy_last"][j, k] - true_pos)))

    result = {"step": loaded.step, "windows": len(picked), "windows_with_bounce_in_val": len(with_bounce),
              "val_windows": len(ds), "unit": "pixels, mean distance to the true object centre", "lost": lost}
    for kind, per in dist.items():
        result[kind] = {n: [round(float(np.mean(v)), 3) if v else None for v in per[n]] for n in names}
        result[kind]["objects_per_step"] = [len(v) for v in per["model"]]
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bounce_check.json").write_text(json.dumps(result, indent=1))
    grid = sample_grid(past[:4], truth[:4], {"ema": pred[:4]}, out / "bounce_windows.png")

    print(f"{len(picked)} validation windows with a bounce in the predicted frames "
          f"({len(with_bounce)} of {len(ds)} have one); distance to the true object centre (px):")
    print(f"{'':<28}" + "".join(f"{'t+' + str(j + 1):>8}" for j in range(tf)))
    for kind in dist:
        for n in names:
            vals = result[kind][n]
            print(f"{kind + ' ' + n:<28}" + "".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in vals))
        print(f"{kind + ' objects':<28}" + "".join(f"{c:8d}" for c in result[kind]["objects_per_step"]))
        print(f"{kind + ' lost by the model':<28}" + "".join(f"{c:8d}" for c in lost[kind]))
    print(f"wrote {out / 'bounce_check.json'} and {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Do predicted objects keep their shape and colour? Each object's pixels in the predictions of a run trained on
the synthetic world, against its pixels in the true frames, at every horizon.

    python tools/shape_check.py --run runs/demo [--windows 64] [--rollout 1] [--steps 20] [--out runs/demo/eval]

An object's pixels are those within bounce_check's colour tolerance of its colour (0.2 per channel, in [0, 1]);
the world gives the objects of a clip hues far apart, so each colour is one object. A blotch of mixed colours loses
pixels; a smeared or squarish disc, or a ghost left behind, gains wrong ones. Two numbers per object and horizon:

- mask IoU: intersection over union of the predicted and the true pixels (shape and position together);
- shape IoU: the same after moving the predicted pixels so that their centre falls on the true pixels' centre
  (shape alone: an object predicted sharp in the wrong place keeps it; a blotch in the right place does not).

The shape IoU is also given apart for objects that touch or overlap another object somewhere in the window
(bounce_check.window_objects: where colours can mix and occlusion changes what is visible) and for those that stay
alone, so a gap can be told apart: one model loses shapes everywhere, another only where objects meet; and apart
for objects a wall turns during the prediction (bounce_check's bouncing objects) and those that go straight on.

Windows are predicted as tools/evaluate.py predicts them (model/sliding.py: the same seed per window, --rollout R
rounds of t_future frames feeding predicted latents back), so a model of t_future 2 rolled out twice is scored on
the same four horizons as one of t_future 4.

Next to the model, two references that are not learned: copy_last (the last past frame: exact shapes, objects left
where they were) and vae_roundtrip (the true frame through the VAE: the shapes the latents can carry at all). An
object mostly hidden in the true frame (fewer than 30% of its area visible) is left out. Writes shape_check.json,
shape_check.png (IoU per horizon) and shape_windows.png (the first windows' predictions).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.pixels import to_unit  # noqa: E402
from data.windows import spread  # noqa: E402
from diagnosis.plots import line_plot  # noqa: E402
from model.sliding import predict_windows  # noqa: E402
from tools.bounce_check import colour_mask, window_objects  # noqa: E402
from tools.run_tools import add_run_args, load_synthetic_run, val_dataset  # noqa: E402
from training.evaluation import window_key  # noqa: E402
from training.visualize import sample_grid  # noqa: E402

MIN_VISIBLE = 0.3  # fraction of its area an object must show in the true frame to be scored
SOURCES = ("model", "copy_last", "vae_roundtrip")
GROUPS = ("touching", "alone", "bouncing", "straight")  # two splits of the objects, each scored apart


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def centred(mask: np.ndarray, onto: np.ndarray) -> np.ndarray:
    """`mask` moved by whole pixels so that its centroid falls on the centroid of `onto` (pixels moved past the
    border are dropped); an empty mask stays empty."""
    if not mask.any() or not onto.any():
        return mask
    ys, xs = np.nonzero(mask)
    ty, tx = np.nonzero(onto)
    dy, dx = int(round(ty.mean() - ys.mean())), int(round(tx.mean() - xs.mean()))
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
    out = np.zeros_like(mask)
    out[ys[keep], xs[keep]] = True
    return out


def object_ious(pred: np.ndarray, true: np.ndarray, colour: np.ndarray, area: float) -> tuple[float, float] | None:
    """(mask IoU, shape IoU) of the object of `colour` in one predicted (H, W, 3) frame against the true frame; None
    when the true frame shows less than MIN_VISIBLE of the object's `area` (pixels)."""
    t = colour_mask(true, colour)
    if t.sum() < MIN_VISIBLE * area:
        return None
    p = colour_mask(pred, colour)
    return iou(p, t), iou(centred(p, t), t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "run folder trained on the synthetic world", "noise seed",
                 "shape_check.json, shape_check.png and shape_windows.png")
    p.add_argument("--windows", type=int, default=64, help="validation windows, spread over the split")
    p.add_argument("--rollout", type=int, default=1, metavar="R", help="rounds of t_future frames (default 1)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override the stored config (sampler levers without retraining, e.g. sampler.eta=0)")
    args = p.parse_args(argv)

    if args.rollout < 1:
        print("error: --rollout must be >= 1", file=sys.stderr)
        return 1
    loaded = load_synthetic_run(args)
    if loaded is None:
        return 1
    cfg = loaded.cfg
    ds = val_dataset(loaded, args.rollout)  # windows as long as the scored horizons
    picked = list(spread(len(ds), args.windows))
    if not picked:
        print("error: the run has no validation windows", file=sys.stderr)
        return 1

    model, net = loaded.model, loaded.net("ema")
    steps = args.steps or cfg.sampler.num_inference_steps
    imgs = {s: [] for s in ("truth", *SOURCES)}
    first = None  # the first batch's (past, truth, prediction), for the picture
    with torch.no_grad():
        for start in range(0, len(picked), 16):
            items = [ds[i] for i in picked[start:start + 16]]
            frames = torch.stack([it["frames"] for it in items])
            cond = torch.stack([it["cond"] for it in items])
            past, truth = frames[:, :model.t_past], frames[:, model.t_past:]
            past_mean, past_std = model.vae.encode_moments(past)
            keys = [window_key(it, i) for it, i in zip(items, picked[start:start + 16])]
            latents = predict_windows(model, net, past_mean, keys, past_std, cond if cond.numel() else None,
                                      args.rollout, steps, args.seed)
            pred = model.decode_future(latents, past, past_mean).float().cpu()
            roundtrip = model.vae.decode(model.vae.encode_moments(truth)[0]).float().cpu()
            copy = past[:, -1:].expand_as(truth)
            for s, x in zip(imgs, (truth, pred, copy, roundtrip)):
                imgs[s].append(to_unit(x).permute(0, 1, 3, 4, 2).numpy())  # (B, Tf, H, W, 3) in [0, 1]
            first = first or (past, truth, pred)
    imgs = {s: np.concatenate(v) for s, v in imgs.items()}
    true_img = imgs.pop("truth")

    tf = true_img.shape[1]
    mask_iou = {s: [[] for _ in range(tf)] for s in SOURCES}
    shape_iou = {s: [[] for _ in range(tf)] for s in SOURCES}
    by_group = {g: {s: [[] for _ in range(tf)] for s in SOURCES} for g in GROUPS}
    cache: dict = {}
    for b, i in enumerate(picked):
        o = window_objects(ds, i, cfg.data.synthetic, cache)
        for k in range(len(o["colour"])):
            for j in range(tf):
                for s in SOURCES:
                    r = object_ious(imgs[s][b, j], true_img[b, j], o["colour"][k], o["area"][k])
                    if r is None:
                        break  # hidden in the true frame: left out for every source
                    mask_iou[s][j].append(r[0])
                    shape_iou[s][j].append(r[1])
                    by_group["touching" if o["touching"][k] else "alone"][s][j].append(r[1])
                    by_group["bouncing" if o["bounce"][k] else "straight"][s][j].append(r[1])

    def mean(v):
        return [round(float(np.mean(x)), 4) if x else None for x in v]

    result = {"step": loaded.step, "windows": len(picked), "val_windows": len(ds),
              "objects_per_step": [len(v) for v in mask_iou["model"]],
              "unit": "intersection over union of an object's pixels with its true pixels, mean over objects",
              "mask_iou": {s: mean(mask_iou[s]) for s in SOURCES},
              "shape_iou": {s: mean(shape_iou[s]) for s in SOURCES},
              "shape_iou_below_0.8": {s: [round(float(np.mean(np.array(x) < 0.8)), 4) if x else None
                                          for x in shape_iou[s]] for s in SOURCES},
              **{f"shape_iou_{g}": {s: mean(by_group[g][s]) for s in SOURCES} for g in GROUPS},
              "objects_touching_per_step": [len(v) for v in by_group["touching"]["model"]],
              "objects_bouncing_per_step": [len(v) for v in by_group["bouncing"]["model"]]}
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "shape_check.json").write_text(json.dumps(result, indent=1))
    horizons = list(range(1, tf + 1))
    series = {f"{kind} {s}": (horizons, result[kind][s]) for kind in ("shape_iou", "mask_iou") for s in SOURCES}
    line_plot(series, f"object IoU with the truth per horizon, {len(picked)} windows (step {loaded.step})",
              xlabel="horizon (frames ahead)").save(out / "shape_check.png")
    past, truth, pred = first
    grid = sample_grid(past[:4], truth[:4], {"ema": pred[:4]}, out / "shape_windows.png")

    print(f"{len(picked)} validation windows of {len(ds)}; object IoU with the true object, mean over objects:")
    print(f"{'':<26}" + "".join(f"{'t+' + str(j + 1):>8}" for j in range(tf)))
    for kind in ("shape_iou", "mask_iou", "shape_iou_below_0.8", *(f"shape_iou_{g}" for g in GROUPS)):
        for s in SOURCES:
            vals = result[kind][s]
            print(f"{kind + ' ' + s:<26}" + "".join(f"{v:8.3f}" if v is not None else f"{'-':>8}" for v in vals))
    print(f"{'objects':<26}" + "".join(f"{c:8d}" for c in result["objects_per_step"]))
    print(f"{'of them touching':<26}" + "".join(f"{c:8d}" for c in result["objects_touching_per_step"]))
    print(f"{'of them bouncing':<26}" + "".join(f"{c:8d}" for c in result["objects_bouncing_per_step"]))
    print(f"wrote {out / 'shape_check.json'}, {out / 'shape_check.png'} and {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The ceiling of anomaly detection by prediction error on the synthetic anomaly world (issue 15): the frame-level
AUC of an ORACLE predictor that knows the world's law exactly (every object moves along its own bouncing track) and
only has to estimate where on its track each object will be next from the t_past frames before, with no VAE, no
learning and no sampling noise. It predicts each object's clock (data/synthetic.py's object_clock) by a straight
line through the past clock values, renders the frame with the world's own renderer, and scores it by PSNR like
tools/anomaly.py (Liu et al.'s per-clip normalised score, and unnormalised), per event kind too.

    python bench/anomaly_oracle.py                          # the anomaly study's world (seed 1, 40 clips, 2 events each)
    python bench/anomaly_oracle.py --set data.synthetic.anomaly_frames=1 --out oracle.json

Fits: `last2` extrapolates the last two clock values (the velocity of the last step), `past` is the least-squares
line through all t_past of them. Normal motion is predicted exactly by both (PSNR capped at 100 dB); what they miss
is what no predictor of the next frame from its past can see: once the past shows the object standing (or moving
back, or fast), "it goes on like that" is the prediction, and it is right.

--jitter D ...: an imperfect oracle, as a stand-in for a learned model: every predicted clock is off by Gaussian
noise of D frames of motion (seeded; each object misplaced by about D x its speed along its track), so normal frames
are no longer predicted exactly. How far the AUC falls with D, beside the normal-frame PSNR each D gives, says how
precise a model must be on normal frames to reach a given AUC.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs.loader import load_config  # noqa: E402
from data.pixels import to_unit, uint8_to_frames  # noqa: E402
from data.synthetic import anomaly_events, object_clock, render_clip  # noqa: E402
from diagnosis import anomaly  # noqa: E402
from training.evaluation import frame_psnr  # noqa: E402

STUDY_WORLD = ["data.synthetic.seed=1", "data.synthetic.num_clips=40", "data.synthetic.anomalies=2"]


def extrapolate(past: np.ndarray, fit: str) -> np.ndarray:
    """past (P, N) clock values of the frames before -> (N,) the clock predicted for the next frame."""
    if fit == "last2" or len(past) < 3:
        return past[-1] + (past[-1] - past[-2]) if len(past) > 1 else past[-1]
    x = np.arange(len(past), dtype=np.float64)
    slope, icept = np.polyfit(x, past, 1)  # (N,) each
    return icept + slope * len(past)


def oracle_psnr(sc, clip: int, t_past: int, fit: str, jitter: float = 0.0) -> list[float]:
    """PSNR of the oracle's prediction of every frame of the clip (NaN for the first t_past, as in tools/anomaly.py).
    A frame's objects depend only on that frame's clock, so one render at the predicted clock of every frame (each
    row extrapolated from the TRUE clock before it) holds every prediction."""
    true, _ = render_clip(sc, clip)
    tau = object_clock(sc, clip)
    clock = tau.copy()
    for f in range(t_past, len(true)):
        clock[f] = extrapolate(tau[f - t_past:f], fit)
    if jitter:
        noise = np.random.default_rng([clip, round(jitter * 1000)]).normal(0.0, jitter, clock.shape)
        clock[t_past:] += noise[t_past:]
    pred, _ = render_clip(sc, clip, clock=clock)
    psnr = frame_psnr(to_unit(uint8_to_frames(pred)), to_unit(uint8_to_frames(true)))  # the project's one PSNR
    return [float("nan")] * t_past + psnr[t_past:].tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default="configs/anomaly_synthetic.yaml", help="the world's config (data.synthetic)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides after the anomaly study's world (" + " ".join(STUDY_WORLD) + ")")
    p.add_argument("--fit", nargs="+", default=["last2", "past"], choices=["last2", "past"])
    p.add_argument("--smooth", type=float, default=1.0, help="also the scores smoothed over time (sigma, frames)")
    p.add_argument("--jitter", type=float, nargs="+", default=[0.0], metavar="D",
                   help="clock noise of the prediction, frames of motion (default 0: the exact oracle)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    cfg = load_config(args.config, STUDY_WORLD + list(args.set))
    sc, t_past = cfg.data.synthetic, cfg.data.t_past
    if not sc.anomalies:
        p.error("the world has no anomalies: set data.synthetic.anomalies")
    names = [f"clip_{c:04d}" for c in range(sc.num_clips)]
    events = {n: anomaly_events(sc, c) for c, n in enumerate(names)}
    frames = {n: list(range(sc.frames_per_clip)) for n in names}
    labels = {n: anomaly.frame_labels([tuple(e["label"]) for e in events[n]], frames[n]) for n in names}
    result = {"world": {"config": args.config, "set": STUDY_WORLD + list(args.set), "clips": sc.num_clips,
                        "frames_per_clip": sc.frames_per_clip, "anomaly_frames": sc.anomaly_frames, "t_past": t_past},
              "fits": {}}
    for fit, jitter in ((f, j) for f in args.fit for j in args.jitter):
        key = fit if not jitter else f"{fit}_jitter{jitter:g}"
        psnrs = {n: torch.tensor(oracle_psnr(sc, c, t_past, fit, jitter), dtype=torch.float64)
                 for c, n in enumerate(names)}
        scores = {"t+1": {n: anomaly.anomaly_scores(v, True) for n, v in psnrs.items()},
                  "t+1_raw": {n: anomaly.anomaly_scores(v, False) for n, v in psnrs.items()},
                  f"t+1_smooth{args.smooth:g}": {n: anomaly.anomaly_scores(anomaly.smooth(v, args.smooth), True)
                                                 for n, v in psnrs.items()}}
        y = torch.cat([labels[n] for n in names])
        r = {}
        for name, s in scores.items():
            kinds = anomaly.by_kind(s, frames, events)
            r[name] = {"auc": anomaly.auc(torch.cat([s[n] for n in names]), y),
                       "by_kind": {k: v["auc"] for k, v in kinds.items() if "auc" in v},
                       "mean_score_by_position": {k: [round(x, 3) for x in v["mean_score_by_position"]]
                                                  for k, v in kinds.items() if "auc" in v}}
            print(f"oracle ({key}) {name:<14} AUC {r[name]['auc']:.4f}   by kind: "
                  + ", ".join(f"{k} {a:.3f}" for k, a in r[name]["by_kind"].items()))
        ok = torch.cat([psnrs[n] for n in names])
        normal = ok[torch.isfinite(ok) & ~y]
        r["normal_frames_predicted_exactly"] = float((normal >= 100).double().mean())
        r["normal_frames_psnr_median"] = float(normal.median())
        if jitter:
            print(f"oracle ({key}) normal frames: median PSNR {r['normal_frames_psnr_median']:.2f} dB")
        result["fits"][key] = r
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How much can the actions matter? The synthetic action world rendered twice: with each window's true future
actions, and with the future actions of another window (a fixed permutation, as tools/action_ablation.py shuffles
them), everything else equal (objects, texture, camera before the window). The PSNR between the two is what a
PERFECT model loses with shuffled actions; with a model's own PSNR under true actions (--model-psnr, e.g. from
action_ablation.json), the drop it would show if it used the actions perfectly and its other errors stayed as they
are: 10 log10((e_model + e_actions) / e_model). Issue 14's goal (true - shuffled >= 1 dB) is judged against it.

    python bench/action_ceiling.py --config configs/demo_action.yaml [--model-psnr 23.97 20.81 19.02 17.65]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from configs.loader import load_config  # noqa: E402
from data import synthetic as S  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_action.yaml")
    p.add_argument("--clips", type=int, default=16, help="clips of the world used")
    p.add_argument("--stride", type=int, default=4, help="frames between window starts")
    p.add_argument("--seed", type=int, default=0, help="the permutation of future actions")
    p.add_argument("--model-psnr", type=float, nargs="*", default=[], help="the model's PSNR per horizon, true actions")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    sc, tp, tf = cfg.data.synthetic, cfg.data.t_past, cfg.data.t_future
    if not sc.action_pan:
        sys.exit(f"error: {args.config} has no action-driven camera (data.synthetic.action_pan)")
    clips = range(min(args.clips, sc.num_clips))
    own = {c: S.render_clip(sc, c) for c in clips}  # (frames, actions) as the world has them
    truth = {c: frames.astype(np.float64) / 255 for c, (frames, _) in own.items()}
    windows = [(c, s) for c in clips for s in range(tp, sc.frames_per_clip - tf + 1, args.stride)]
    order = np.random.default_rng(args.seed).permutation(len(windows))
    mse = np.zeros(tf)
    for (c, s), j in zip(windows, order):
        c2, s2 = windows[j]
        actions = own[c][1].copy()
        actions[s:s + tf] = own[c2][1][s2:s2 + tf]
        shuffled = S.render_clip(sc, c, actions)[0].astype(np.float64) / 255
        mse += ((truth[c][s:s + tf] - shuffled[s:s + tf]) ** 2).mean(axis=(1, 2, 3))
    mse /= len(windows)
    psnr = 10 * np.log10(1 / np.maximum(mse, 1e-12))
    print(f"{len(windows)} windows of {len(clips)} clips; a perfect model with shuffled future actions: PSNR "
          + " / ".join(f"{v:.2f}" for v in psnr) + " dB (t+1 .. t+%d)" % tf)
    if args.model_psnr:
        e_model = 10 ** (-np.asarray(args.model_psnr[:tf]) / 10)
        drop = 10 * np.log10((e_model + mse[:len(e_model)]) / e_model)
        print("most a model with these PSNRs could lose to shuffled actions: "
              + " / ".join(f"{v:+.2f}" for v in drop) + " dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

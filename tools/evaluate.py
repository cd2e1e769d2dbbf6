#!/usr/bin/env python
"""Evaluate a trained run on any data: the trainer's full table (model, raw, copy_last, copy_last_vae, vae_roundtrip)
per horizon step, through the trainer's own evaluation code (training/evaluation.py), so a checkpoint gets one number.

    python tools/evaluate.py --run runs/demo                                  # the run's val split, every window
    python tools/evaluate.py --run runs/ucsd_ped2 --data-root ../shared/data/ucsd_ped2/testing/frames \\
        --windows 200 --rollout 2 --samples 8 --last-fraction 0.5

Data: the run's own val split (the same clips as in training), or every clip under --data-root (a test set). Windows:
all of them (data.window_stride apart), or --windows N evenly spread; --last-fraction F keeps the windows that lie in
the last F of each clip. --rollout R scores R * t_future horizons (predictions fed back as past). --samples K adds
the K-sample rows (mean over samples; best of K per window, the SVG/SRVP/MCVD protocol; the metric of the K-sample
average); the one-sample row stays the headline. Noise is seeded per window (clip, first frame), and the default
seed and precision are the trainer's (train.seed + 777, train.mixed_precision), so the numbers equal the trainer's
final evaluation on the same windows. Writes evaluate.json (table, protocol, windows) and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", required=True, help="run folder (its newest valid checkpoint unless --checkpoint)")
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint file")
    p.add_argument("--data-root", help="evaluate every clip under this folder (default: the run's val split)")
    p.add_argument("--windows", type=int, default=0, help="windows evaluated, evenly spread; 0 = all (default)")
    p.add_argument("--last-fraction", type=float, default=1.0, metavar="F",
                   help="only windows inside the last F of each clip (0 < F <= 1; default 1 = anywhere)")
    p.add_argument("--stride", type=int, default=0, help="window stride in sampled frames; 0 = the run's data.window_stride")
    p.add_argument("--rollout", type=int, default=1, metavar="R", help="rounds of t_future frames (default 1)")
    p.add_argument("--samples", type=int, default=0, metavar="K",
                   help="samples per window; 0 = the run's eval.samples (default)")
    p.add_argument("--weights", default="both", choices=["both", "ema", "raw"],
                   help="both: rows 'model' (EMA) and 'raw', as the trainer (default); ema / raw: one row 'model'")
    p.add_argument("--steps", type=int, default=0, help="DDIM steps; 0 = eval.steps or sampler.num_inference_steps")
    p.add_argument("--precision", choices=["bf16", "no"], help="default: the run's train.mixed_precision (bf16 = "
                                                                "autocast on GPU; CPU is fp32 either way)")
    p.add_argument("--seed", type=int, help="noise seed; default train.seed + 777 (the trainer's)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per model call (does not change a number)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override the stored config")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="folder for evaluate.json (default <run>/eval)")
    return p


def select_windows(clips, cfg, last_fraction: float, n: int) -> list:
    """The windows of `clips` (cfg's t_future already the evaluated horizon) inside the last `last_fraction` of each
    clip, then n of them evenly spread (n = 0: all)."""
    from data.windows import build_windows, spread
    windows = build_windows(clips, cfg)
    if last_fraction < 1.0:
        first = {i: math.ceil((1 - last_fraction) * c.num_frames) for i, c in enumerate(clips)}
        windows = [w for w in windows if w.frames[0] >= first[w.clip]]
    if n:
        windows = [windows[i] for i in spread(len(windows), n)]
    return windows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rollout < 1 or args.windows < 0 or args.samples < 0 or not 0 < args.last_fraction <= 1:
        print("error: --rollout >= 1, --windows >= 0, --samples >= 0 and 0 < --last-fraction <= 1", file=sys.stderr)
        return 2
    from data import DataError, VideoWindowDataset, discover_clips, split_as_trained
    from tools.run_tools import load_run
    from training.distributed import DistInfo
    from training.evaluation import evaluate, format_table

    # ---- model
    loaded = load_run(args)
    if loaded is None:
        return 2
    cfg, tc = loaded.cfg, loaded.cfg.train
    if args.weights == "both":
        nets = {"model": loaded.net("ema")} | ({"raw": loaded.raw_unet} if loaded.ema_unet is not None else {})
    else:
        nets = {"model": loaded.net(args.weights)}

    # ---- windows: t_past + rollout * t_future frames each
    data_cfg = dataclasses.replace(cfg.data, t_future=args.rollout * cfg.data.t_future,
                                   window_stride=args.stride or cfg.data.window_stride)
    try:
        if args.data_root:
            data_cfg = dataclasses.replace(data_cfg, root=args.data_root,
                                           synthetic=dataclasses.replace(data_cfg.synthetic, enabled=False))
            clips, source = discover_clips(data_cfg), f"every clip under {args.data_root}"
        else:
            clips = split_as_trained(data_cfg).val
            source = f"val split of {data_cfg.root}"
            if not clips:
                raise DataError("the run has no val split (data.val_fraction=0): give --data-root")
        windows = select_windows(clips, data_cfg, args.last_fraction, args.windows)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not windows:
        print("error: no window of t_past + rollout * t_future frames in the selection", file=sys.stderr)
        return 2
    dataset = VideoWindowDataset(clips, data_cfg, windows)
    print(f"model: {loaded.describe()}\ndata: {source}: {len(windows)} windows of {data_cfg.window_frames} frames "
          f"from {len({w.clip for w in windows})} clips")

    # ---- evaluate (the trainer's code path, seed and precision)
    steps = args.steps or cfg.eval.steps or cfg.sampler.num_inference_steps
    samples = args.samples or cfg.eval.samples
    seed = tc.seed + 777 if args.seed is None else args.seed
    precision = args.precision or tc.mixed_precision
    result = evaluate(loaded.model, dataset, list(range(len(dataset))), DistInfo(device=loaded.model.vae.device), nets,
                      steps, batch_size=args.batch_size, seed=seed, samples=samples, rounds=args.rollout,
                      precision=precision)
    result = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "data": source,
              "weights": {n: ("ema" if net is loaded.ema_unet else "raw") for n, net in nets.items()},
              "sampler_steps": steps, "seed": seed, "last_fraction": args.last_fraction,
              **result, "windows": [f"{clips[w.clip].name}@{w.frames[0]}" for w in windows]}
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps(result, indent=1))
    print(format_table(result, "windows"))
    print(f"wrote {out / 'evaluate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

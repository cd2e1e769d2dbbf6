#!/usr/bin/env python
"""The quality study's evaluation of one trained run: the trainer's table (EMA model, raw, copy_last, copy_last_vae,
vae_roundtrip) under each residual-decoding mode, on the same windows with the same noise as the trainer's final
evaluation, with K samples per window (training/evaluation.py's protocol rows). The windows are sampled once and
the same samples decoded every way. One JSON line per run on stdout (and appended to --out).

    python bench/quality_eval.py --run runs/demo --decode off masked full --samples 4 --out study.jsonl

Sampling runs under the trainer's precision (train.mixed_precision), so the row of the run's own decoding mode
equals its eval/step_*.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.windows import spread  # noqa: E402
from tools.run_tools import load_run, val_dataset  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from training.evaluation import evaluate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (its newest valid checkpoint)")
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint file")
    p.add_argument("--decode", nargs="+", default=["off", "masked", "full"], help="sampler.residual_decode modes")
    p.add_argument("--threshold", type=float, nargs="+", default=[],
                   help="extra masked-, copy- and warp-mode thresholds to try (sampler.residual_decode_threshold)")
    p.add_argument("--samples", type=int, default=1, help="K: samples per window (mean, best-of-K and K-average rows)")
    p.add_argument("--steps", type=int, default=0, help="DDIM steps; 0 = the run's eval.steps (sampler levers without retraining)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta; default: the run's sampler.eta")
    p.add_argument("--label", default="", help="name of this variant in the output (default: the run folder)")
    p.add_argument("--out", help="append the JSON line to this file")
    args = p.parse_args(argv)

    loaded = load_run(args)
    if loaded is None:
        return 1
    cfg, model = loaded.cfg, loaded.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.vae.to(device)
    model.unet.to(device)
    ema = loaded.net("ema").to(device)
    val = val_dataset(loaded)
    indices = spread(len(val), cfg.eval.clips or 10 ** 9)
    steps = args.steps or cfg.eval.steps or cfg.sampler.num_inference_steps
    if args.eta is not None:
        cfg.sampler.eta = args.eta
    seed = cfg.train.seed + 777  # the trainer's evaluation seed: same windows, same noise
    precision = cfg.train.mixed_precision  # the trainer's switch: bf16 autocast on a GPU
    info = DistInfo(device=device)

    modes = [(m, m, cfg.sampler.residual_decode_threshold) for m in args.decode]
    modes += [(f"{m}@{t:g}", m, t) for m in ("masked", "copy", "warp") if m in args.decode for t in args.threshold]
    out = {"run": str(args.run), "label": args.label or Path(args.run).name, "step": loaded.step,
           "eval_windows": len(indices), "ddim_steps": steps, "eta": cfg.sampler.eta, "decode": {}}
    start = time.perf_counter()
    result = evaluate(model, val, indices, info, {"model": ema, "raw": model.unet}, steps, batch_size=32,
                      seed=seed, samples=args.samples, precision=precision,
                      decodes={key: (mode, threshold) for key, mode, threshold in modes})  # sampled once
    out["precision"], out["protocol"], out["decode"] = result["precision"], result["protocol"], result["decode"]
    out["seconds"] = round(time.perf_counter() - start, 1)
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The quality study's evaluation of one trained run: the trainer's table (EMA model, raw, copy_last, copy_last_vae,
vae_roundtrip) under each residual-decoding mode, on the same windows with the same noise as the trainer's final
evaluation, plus the mean over K samples per window. One JSON line per run on stdout (and in --out).

    python bench/quality_eval.py --run runs/demo --decode off masked full --samples 4 --out study.jsonl

Sampling runs under the trainer's precision (bf16 autocast on a GPU with train.mixed_precision=bf16), so the
`off` row of the run's own decoding mode equals its eval/step_*.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.windows import spread  # noqa: E402
from tools.run_tools import load_run, val_windows  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from training.evaluation import evaluate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (its newest valid checkpoint)")
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint file")
    p.add_argument("--decode", nargs="+", default=["off", "masked", "full"], help="sampler.residual_decode modes")
    p.add_argument("--threshold", type=float, nargs="+", default=[],
                   help="extra masked-mode thresholds to try (sampler.residual_decode_threshold)")
    p.add_argument("--samples", type=int, default=1, help="K: samples per window for the mean-over-samples row")
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
    val = val_windows(loaded)
    indices = spread(len(val), cfg.train.eval_clips or 10 ** 9)
    steps = cfg.train.eval_steps or cfg.sampler.num_inference_steps
    seed = cfg.train.seed + 777  # the trainer's evaluation seed: same windows, same noise
    bf16 = device.type == "cuda" and cfg.train.mixed_precision == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    info = DistInfo(device=device)

    modes = [(m, m, cfg.sampler.residual_decode_threshold) for m in args.decode]
    modes += [(f"masked@{t:g}", "masked", t) for t in args.threshold]
    out = {"run": str(args.run), "label": args.label or Path(args.run).name, "step": loaded.step,
           "eval_windows": len(indices), "ddim_steps": steps, "bf16": bf16, "decode": {}}
    start = time.perf_counter()
    for key, mode, threshold in modes:
        cfg.sampler.residual_decode, cfg.sampler.residual_decode_threshold = mode, threshold
        with autocast():
            one = evaluate(model, val, indices, info, {"model": ema, "raw": model.unet}, steps, batch_size=32,
                           seed=seed)
            rows = {"psnr": dict(one["psnr"]), "ssim": dict(one["ssim"])}
            if args.samples > 1:  # K samples per window: the mean of the per-sample metrics (expected quality)
                more = [one] + [evaluate(model, val, indices, info, {"model": ema}, steps, batch_size=32,
                                         seed=seed + 100_003 * k) for k in range(1, args.samples)]
                for metric in ("psnr", "ssim"):
                    per = [r[metric]["model"] for r in more]
                    rows[metric][f"model_mean_of_{args.samples}"] = [round(sum(v) / len(v), 4) for v in zip(*per)]
        out["decode"][key] = rows
    out["seconds"] = round(time.perf_counter() - start, 1)
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

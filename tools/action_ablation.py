#!/usr/bin/env python
"""Does the model use its conditioning vector? PSNR/SSIM of predictions with the true vs shuffled vectors.

    python tools/action_ablation.py --run runs/demo_action [--clips 32] [--steps 20] [--out runs/demo_action/eval]
        [--set sampler.guidance_cond=2]

The same validation windows and the same noise are used twice: once with each window's own conditioning vector
(e.g. the camera actions of its future frames), once with the vector of another window (a fixed permutation).
A model that uses the vector predicts worse with the shuffled one. Writes action_ablation.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data.windows import spread  # noqa: E402
from tools.run_tools import add_run_args, load_run, val_dataset  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from training.evaluation import evaluate, format_table  # noqa: E402


class ShuffledCond(torch.utils.data.Dataset):
    """The windows of `base`, each with the conditioning vector of window perm[i]."""

    def __init__(self, base, indices: list[int], seed: int):
        self.base = base
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(indices), generator=g).tolist()
        self.source = {i: indices[j] for i, j in zip(indices, order)}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        item["cond"] = self.base[self.source[i]]["cond"]
        return item


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "run folder (its newest valid checkpoint is used)",
                 "noise seed (the same noise for both conditions)", "action_ablation.json")
    p.add_argument("--clips", type=int, default=32, help="validation windows evaluated (evenly spread)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override the stored config, e.g. sampler.guidance_cond=2 (a model trained with "
                        "diffusion.cond_dropout > 0)")
    args = p.parse_args(argv)

    # ---- model and validation windows
    loaded = load_run(args)
    if loaded is None:
        return 1
    cfg = loaded.cfg
    if cfg.cond_dim == 0:
        print("error: this run has no conditioning vector (data.cond_keys is empty)", file=sys.stderr)
        return 1
    val = val_dataset(loaded)
    indices = spread(len(val), args.clips)

    # ---- evaluate with true and shuffled vectors (same windows, same noise)
    info = DistInfo()
    steps = args.steps or cfg.sampler.num_inference_steps
    nets = {"model": loaded.net("ema")}
    true = evaluate(loaded.model, val, indices, info, nets, steps, batch_size=16, seed=args.seed)
    shuffled = evaluate(loaded.model, ShuffledCond(val, indices, args.seed), indices, info, nets, steps,
                        batch_size=16, seed=args.seed)
    result = {"step": loaded.step, "num_clips": true["num_clips"], "overrides": list(args.set),
              "guidance_cond": cfg.sampler.guidance_cond,
              "psnr": {"true_action": true["psnr"]["model"], "shuffled_action": shuffled["psnr"]["model"],
                       "copy_last": true["psnr"]["copy_last"], "vae_roundtrip": true["psnr"]["vae_roundtrip"]},
              "ssim": {"true_action": true["ssim"]["model"], "shuffled_action": shuffled["ssim"]["model"],
                       "copy_last": true["ssim"]["copy_last"], "vae_roundtrip": true["ssim"]["vae_roundtrip"]}}
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "action_ablation.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    gain = [a - b for a, b in zip(result["psnr"]["true_action"], result["psnr"]["shuffled_action"])]
    print("true - shuffled PSNR per horizon step (dB): " + " ".join(f"{g:+.2f}" for g in gain))
    print(f"wrote {out / 'action_ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

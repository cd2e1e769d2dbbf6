"""The demo's training step on the CPU, under each speed lever, as ratios to the shipped UNet's eager fp32 step
measured in the same run, just before and just after each row (a shared CPU's speed drifts): what decides whether
a wider UNet fits the demo's 15 CPU minutes (issue 14, QUALITY.md).

One step = the project's diffusion loss (model.video_prediction_diffusion.VideoPredictionDiffusion.loss) on random
latents of the demo's shape, backward and AdamW, as the trainer does on a CPU (no data loading, no EMA).

    python bench/bench_cpu_step.py                                  # shipped and 4x UNet, every lever, batch 16
    python bench/bench_cpu_step.py --widths 32,64,128 --levers eager compile --batch 8 16 32
    python bench/bench_cpu_step.py --widths --variants "unet.layers_per_block=2" "unet.attention=[true,false,true]" \
        --levers eager                                              # any demo.yaml overrides, one variant per string

Levers: eager (fp32, NCHW: what the demo runs), channels_last (NHWC weights and inputs), compile (torch.compile,
inductor; its compile time is reported apart, not in the steps/s), bf16 (autocast; slow on CPUs without AVX512-BF16
or AMX: check `lscpu`). Prints one line per variant and a JSON list with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, time_block  # noqa: E402
from configs.loader import load_config  # noqa: E402
from model.video_prediction_diffusion import VideoPredictionDiffusion  # noqa: E402

LEVERS = ("eager", "channels_last", "compile", "bf16")


def measure(overrides: list[str], lever: str, batch: int, steps: int) -> dict:
    """One variant: configs/demo.yaml with `overrides` (KEY=VALUE strings)."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/demo.yaml", overrides)
    model = VideoPredictionDiffusion.from_config(cfg, "cpu")
    c, h, w = model.vae.latent_channels, cfg.data.height // model.vae.downsample, cfg.data.width // model.vae.downsample
    net = model.unet
    past = torch.randn(batch, cfg.data.t_past, c, h, w)
    future = torch.randn(batch, cfg.data.t_future, c, h, w)
    if lever == "channels_last":
        net.to(memory_format=torch.channels_last)
    fn = torch.compile(net) if lever == "compile" else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    # diffusion.motion_anchor: the trainer computes each window's anchors once (attach_anchors), not per step
    anchors = model.anchor_latents(past) if cfg.diffusion.motion_anchor else None

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lever == "bf16"):
            loss = model.loss(past, future, generator=gen, net=fn, anchors=anchors)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = 3 * time_block(step, 0, 3) / 1e3  # warm-up (compile: traces and compiles here)
    dt = time_block(step, 0, steps) / 1e3
    widths = ",".join(str(c) for c in cfg.unet.block_out_channels)
    return {"variant": " ".join(overrides) or "shipped", "widths": widths, "lever": lever, "batch": batch,
            "steps_per_s": 1 / dt, "samples_per_s": batch / dt, "warmup_s": warm,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--widths", nargs="*", default=["32,64,128", "64,128,256"],
                   help="unet.block_out_channels to try (32,64,128: the demo's UNet until session 15)")
    p.add_argument("--variants", nargs="+", default=[], metavar="OVERRIDES",
                   help='more variants, each a string of space-separated demo.yaml overrides '
                        '(e.g. "unet.layers_per_block=2 unet.attention=[true,false,true]")')
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="batch sizes (the demo trains at 16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant, after 3 warm-up steps")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    baselines = [measure([], "eager", 16, args.steps)]  # the shipped demo step, same process, same run
    print(f"baseline: shipped UNet ({baselines[0]['widths']}), eager fp32, batch 16: "
          f"{baselines[0]['steps_per_s']:.2f} steps/s")
    variants = [[f"unet.block_out_channels=[{w}]"] for w in args.widths] + [v.split() for v in args.variants]
    rows = []
    for overrides in variants:
        for lever in args.levers:
            for batch in args.batch:
                r = measure(overrides, lever, batch, args.steps)
                # the baseline again after every row: a shared CPU's speed drifts within a run (sessions 13-16 saw 7%
                # to 45%), so each row is a ratio to the mean of the baseline steps measured just before and after it
                baselines.append(measure([], "eager", 16, args.steps))
                r["baseline_steps_per_s"] = (baselines[-2]["steps_per_s"] + baselines[-1]["steps_per_s"]) / 2
                r["ratio_steps"] = r["steps_per_s"] / r["baseline_steps_per_s"]
                rows.append(r)
                print(f"{r['variant']:>12} {r['params_m']:5.1f}M  {lever:<14} batch {batch:>3}  "
                      f"{r['steps_per_s']:6.2f} steps/s "
                      f"({r['ratio_steps']:.2f}x the baseline's {r['baseline_steps_per_s']:.2f} around it, "
                      f"{r['samples_per_s']:6.1f} samples/s)  warm-up {r['warmup_s']:.0f} s", flush=True)
    speeds = [b["steps_per_s"] for b in baselines]
    baseline = dict(baselines[0], steps_per_s=sum(speeds) / len(speeds), measurements=speeds)
    print(f"baseline over the run: {min(speeds):.2f} .. {max(speeds):.2f} steps/s ({len(speeds)} measurements)")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

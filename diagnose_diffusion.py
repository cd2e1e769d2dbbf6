"""What is wrong with my sampler or my model? Runs a list of checks on a trained run, each reported as pass / warn /
fail with its measured value, the expected range and a one-line hint.

    python diagnose_diffusion.py --run runs/demo
    python diagnose_diffusion.py --run runs/demo --checkpoint runs/demo/checkpoints/ckpt_000001000.pt --out diag/

Writes report.json ({"checks": [{"name", "status", "value", "expected", "hint"}, ...]}), report.md and pictures
into --out (default <run>/diagnosis). Exit code 0 when no check fails, 1 when one does, 2 when the model or the
data cannot be loaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = """\
exit codes: 0 no check failed (warnings allowed); 1 at least one check failed; 2 the model or the data cannot be
loaded (the reason is printed as one line).
checks (DESIGN.md lists the causes of "coloured noise" they look for):
  pixel_range, vae_roundtrip_psnr   the data pipeline's pixels are in the VAE's [-1, 1]; the VAE reconstructs them
  latent_scale, vae_matches_checkpoint   scaled latents have std ~1; the VAE is the one the UNet was trained with
  clip_bound_vs_data, clip_in_sampling   the x0 clip bound is above the data's latents; how often clipping fires
  schedule_match, first_timestep, final_alpha_bar, step_pairs   sampling uses the training schedule, starts at
                                    t = T-1, ends at alpha_bar = 1, steps between consecutive timesteps
  oracle_sampler                    a perfect denoiser through the run's sampler recovers the true latents
  one_step_x0                       the model's one-step x0 error vs t against trivial predictors (model vs sampler)
  sampling_trace                    per-step statistics of one sampling run, and a film strip of decoded x0
  ema_horizon, ema_vs_raw           the EMA is not still mostly the initial random weights
  weights_finite                    no NaN/Inf in the weights
  uses_past_frames, uses_cond_vector   predictions depend on the past frames (and the conditioning vector)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder (runs/<name>) whose checkpoints/ to load")
    p.add_argument("--checkpoint", default="latest", metavar="latest|PATH",
                   help="latest: the run's newest valid checkpoint (default); or a checkpoint file")
    p.add_argument("--out", help="folder for report.json, report.md and pictures (default: <run>/diagnosis)")
    p.add_argument("--clips", type=int, default=8, help="validation windows to measure on (default 8)")
    p.add_argument("--raw", action="store_true", help="judge the raw weights instead of the EMA weights")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override the stored config, e.g. sampler.clip_bound=6 sampler.timestep_spacing=trailing "
                        "(try a fix without retraining; the training schedule is still read from the checkpoint)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--seed", type=int, default=1234, help="seed of the noise used by the checks")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None, pixel_transform=None) -> int:
    """`pixel_transform` (frames -> frames) post-processes the data pipeline's output before the checks see it;
    None = the pipeline as is. It exists for code that wraps the pipeline, and for tests that plant bugs there."""
    # ---- arguments
    args = parse_args(argv)
    if args.run is None and args.checkpoint == "latest":
        print("error: give --run runs/<name> or --checkpoint PATH", file=sys.stderr)
        return 2
    from diagnosis.checks import run_checks
    from diagnosis.report import FAIL, format_checks, write_report
    from model.loading import LoadError, load_model
    from training.distributed import resolve_device

    # ---- model, from the checkpoint alone
    device = resolve_device(args.device)
    try:
        loaded = load_model(args.run, args.checkpoint, overrides=args.set, device=device)
    except LoadError as e:
        print(f"error: cannot load the model: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    run_dir = Path(args.run) if args.run else loaded.checkpoint.parent.parent  # <run>/checkpoints/ckpt_*.pt
    out = Path(args.out) if args.out else run_dir / "diagnosis"
    print(f"model: {loaded.describe()}")

    # ---- checks
    t0 = time.perf_counter()
    try:
        checks, pictures = run_checks(loaded, out, args.clips, "raw" if args.raw else "ema", args.seed,
                                      pixel_transform=pixel_transform)
    except Exception as e:  # noqa: BLE001 - data that cannot be read: one line, then exit 2
        print(f"error: cannot read validation frames: {type(e).__name__}: {' '.join(str(e).split())}",
              file=sys.stderr)
        return 2

    # ---- report
    header = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "weights": "raw" if args.raw else "ema",
              "clips": args.clips, "overrides": args.set, "seconds": round(time.perf_counter() - t0, 1)}
    json_path, md_path = write_report(checks, out, header, pictures)
    print(format_checks(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"report: {md_path}  ({json_path.name}, {len(pictures)} pictures)")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

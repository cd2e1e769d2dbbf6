"""Quick sanity check of a trained model (seconds to a minute): load it from its checkpoint alone, predict on a few
validation clips (or on frames you give), and report ranges, NaN/Inf counts and PSNR per horizon step against
copying the last frame.

    python test_model_inference.py --run runs/demo
    python test_model_inference.py --run runs/demo --frames my_clip.mp4 --rollout 3 --raw
    python test_model_inference.py --config configs/demo.yaml          # random weights: checks the plumbing only

Writes summary.json, grid.png (past | truth | prediction | error) and clip.gif into --out (default
<run>/inference). For a deeper look (what is wrong, and why), run diagnose_diffusion.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
exit codes: 0 healthy; 1 unhealthy: non-finite (NaN/Inf) weights or predictions, or a prediction of the wrong
shape (the reason is printed as one line); 2 the model or the frames cannot be loaded.
--frames: a folder of frames or a video file, resized to the model's data.height x data.width. With at least
t_past + rollout * t_future frames, the last --clips windows of that many frames are used and the truth is known;
otherwise the last t_past frames are the past and there is nothing to compare with."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of --run, --checkpoint PATH, --config)")
    src.add_argument("--run", help="run folder (runs/<name>) whose checkpoints/ to load")
    src.add_argument("--checkpoint", default="latest", metavar="latest|PATH",
                     help="latest: the run's newest valid checkpoint (default); or a checkpoint file")
    src.add_argument("--config", help="YAML config: build the model with RANDOM weights (no checkpoint) to test the "
                                      "plumbing; the predictions are noise by construction")
    weights = src.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="weights", action="store_const", const="ema",
                         help="predict with the EMA weights (default; the raw ones when the run has no EMA)")
    weights.add_argument("--raw", dest="weights", action="store_const", const="raw",
                         help="predict with the raw (non-EMA) weights")
    data = p.add_argument_group("inputs")
    data.add_argument("--clips", type=int, default=4, help="validation windows (or windows of --frames) to predict")
    data.add_argument("--frames", metavar="DIR_OR_VIDEO",
                      help="predict on a folder of frames or a video file instead of the validation split")
    data.add_argument("--rollout", type=int, default=1, metavar="K",
                      help="predict K x t_future frames autoregressively, feeding predictions back as past (default 1)")
    data.add_argument("--steps", type=int, metavar="S", help="DDIM steps (default: the run's sampler setting)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override the stored config, e.g. sampler.clip_bound=6 vae.pretrained=/path/to/vae")
    p.add_argument("--out", help="output folder (default: <run>/inference, or ./inference with --config)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (and of random weights)")
    p.add_argument("--precision", choices=["bf16", "no"],
                   help="bf16 autocast (GPU) or fp32; default the run's train.mixed_precision, as its evaluation")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.weights = args.weights or "ema"
    if args.config and (args.run or args.checkpoint != "latest"):
        p.error("--config builds random weights; do not combine it with --run or --checkpoint")
    if not args.config and not args.run and args.checkpoint == "latest":
        p.error("give --run runs/<name>, --checkpoint PATH or --config FILE")
    if args.clips < 1 or args.rollout < 1 or (args.steps is not None and args.steps < 1):
        p.error("--clips, --rollout and --steps must be >= 1")
    return args


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _fmt_stats(s: dict) -> str:
    if "min" not in s:
        return f"no finite values  nan={s['nan']} inf={s['inf']}"
    return (f"[{s['min']:8.3f}, {s['max']:8.3f}]  mean {s['mean']:7.3f}  std {s['std']:6.3f}  "
            f"nan={s['nan']} inf={s['inf']}")


def _print_table(summary: dict) -> None:
    print(f"{'tensor':<24}range                   mean / std / non-finite")
    for name in ("input_frames", "pred_frames", "past_latents", "pred_latents"):
        print(f"{name:<24}{_fmt_stats(summary[name])}")
    metrics = summary["metrics"]
    if metrics:
        H = len(metrics["model"]["psnr"])
        print("PSNR (dB)   " + "".join(f"{'t+' + str(k + 1):>8}" for k in range(H)))
        for name, m in metrics.items():
            print(f"{name:<12}" + "".join(f"{v:8.2f}" for v in m["psnr"]))
    else:
        print("PSNR: no true future frames to compare with")
    print(f"seconds per clip: {summary['seconds_per_clip']:.3f}  ({summary['num_clips']} clips, "
          f"{summary['predicted_frames']} frames each, {summary['sampler_steps']} DDIM steps)")


def main(argv=None) -> int:
    # ---- arguments (heavy imports after parsing, so --help is instant)
    args = parse_args(argv)
    import torch

    from diagnosis.inference import horizon_metrics, rollout, save_pictures, tensor_stats
    from diagnosis.inputs import cond_rounds, file_windows, val_windows
    from diagnosis.report import json_safe
    from model.loading import LoadError, load_model
    from training.distributed import resolve_device

    # ---- model: from the checkpoint alone, or random weights from a YAML config
    device = resolve_device(args.device)
    try:
        loaded = load_model(args.run, args.checkpoint, config=args.config, overrides=args.set, device=device,
                            seed=args.seed)
    except LoadError as e:
        print(f"error: cannot load the model: {_one_line(e)}", file=sys.stderr)
        return 2
    if loaded.random_weights:
        print("=" * 78 + "\nWARNING: RANDOM WEIGHTS (--config, no checkpoint): this checks the plumbing only; the "
              "predictions are noise.\n" + "=" * 78)
    weights = args.weights if loaded.ema_unet is not None else "raw"
    print(f"model: {loaded.describe()}; predicting with the {weights} weights")
    cfg, model = loaded.cfg, loaded.model
    out = Path(args.out) if args.out else (
        Path(args.run) / "inference" if args.run else
        loaded.checkpoint.parent.parent / "inference" if loaded.checkpoint else Path("inference"))

    # ---- inputs: validation windows through the data pipeline, or the frames given
    horizon = args.rollout * cfg.data.t_future
    try:
        windows = (file_windows(args.frames, cfg.data, args.clips, horizon) if args.frames
                   else val_windows(cfg.data, args.clips, horizon))
    except Exception as e:  # noqa: BLE001 - unreadable or missing frames: one line, exit 2
        print(f"error: cannot read frames: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"inputs: {len(windows.names)} windows from {windows.source}; {windows.truth.shape[1]} true future frames")

    # ---- predict (autoregressive when --rollout > 1)
    problems = []
    bad = {k: v for k, v in loaded.nonfinite.items() if v}
    if bad:
        problems.append("non-finite weights in " + "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in bad.items()))
    try:
        result = rollout(model, loaded.net(weights), windows.past, cond_rounds(windows, cfg.data, args.rollout),
                         steps=args.steps, seed=args.seed, names=windows.names,
                         precision=args.precision or cfg.train.mixed_precision)
    except (RuntimeError, ValueError, AssertionError) as e:
        print(f"UNHEALTHY: prediction failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    pred = result["frames"]
    B, _, _, H, W = windows.past.shape
    if pred.shape != (B, horizon, 3, H, W):
        problems.append(f"prediction has shape {tuple(pred.shape)}, expected {(B, horizon, 3, H, W)}")
    if not torch.isfinite(result["latents"]).all():
        problems.append(f"non-finite predictions ({int((~torch.isfinite(result['latents'])).sum())} latent values)")

    # ---- summary, pictures
    summary = {
        "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None, "random_weights": loaded.random_weights,
        "step": loaded.step, "weights": weights, "source": windows.source, "windows": windows.names,
        "num_clips": B, "rollout": args.rollout, "predicted_frames": horizon,
        "precision": args.precision or cfg.train.mixed_precision,
        "sampler_steps": args.steps or cfg.sampler.num_inference_steps,
        "input_frames": tensor_stats(windows.frames), "pred_frames": tensor_stats(pred),
        "past_latents": tensor_stats(result["past_latents"]), "pred_latents": tensor_stats(result["latents"]),
        "metrics": horizon_metrics(pred, windows.truth, windows.past),
        "seconds_per_clip": result["seconds"] / B, "healthy": not problems, "problems": problems,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    save_pictures(windows, pred, out)

    # ---- report
    _print_table(summary)
    print(f"wrote {out / 'summary.json'}, {out / 'grid.png'}, {out / 'clip.gif'}")
    if problems:
        print(f"UNHEALTHY: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print("healthy: finite weights and predictions of the right shape"
          + (" (RANDOM WEIGHTS)" if loaded.random_weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

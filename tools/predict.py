#!/usr/bin/env python
"""Predict every frame of a video (or a folder of frames) from the t_past frames before it, with a trained run.

    python tools/predict.py --run runs/demo --input ../shared/data/intel_sample_videos/car-detection.mp4
    python tools/predict.py --run runs/demo_action --input clip_folder --rollout 2 --show-horizon 8 --cond 1.0 --png

Every window of t_past frames predicts the next t_future frames (--rollout K: K rounds, predictions fed back as
past), batched (--batch-size windows per model call), so each frame after the first t_past is predicted at every
horizon 1 .. K * t_future that reaches it. Noise is seeded per window (clip, first frame), as in tools/evaluate.py.
Writes into --out (default <run>/predict/<input name>):
  predict.mp4, predict.gif   truth | prediction at --show-horizon (default 1) | |error|, one video frame per frame
  frames.csv                 per frame: PSNR and SSIM at each horizon, their means over the horizons, copy-last PSNR
  predicted/NNNNNN.png       with --png: the predicted frames (at --show-horizon), named by frame number
  summary.json               mean PSNR / SSIM per horizon for the model and copy-last, what was run
Conditioning vectors (data.cond_keys): from the frames' JSON sidecars, or --cond VALUES for every frame (a
counterfactual: "what if the camera panned right throughout"); videos without --cond get zeros (with a warning).
"""
from __future__ import annotations

import argparse
import csv
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
    p.add_argument("--input", required=True, help="a video file or a folder of frames")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw weights")
    p.add_argument("--rollout", type=int, default=1, metavar="K", help="rounds of t_future frames (default 1)")
    p.add_argument("--show-horizon", type=int, default=1, metavar="H", help="horizon shown in the videos (default 1)")
    p.add_argument("--png", action="store_true", help="also write the predicted frames as PNG")
    p.add_argument("--cond", type=float, nargs="+", metavar="V",
                   help="conditioning values (one per data.cond_key) for every frame, instead of the sidecars")
    p.add_argument("--steps", type=int, default=0, help="DDIM steps; 0 = the run's sampler.num_inference_steps")
    p.add_argument("--batch-size", type=int, default=32, help="windows per model call (does not change a number)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--precision", choices=["bf16", "no"], help="default: the run's train.mixed_precision")
    p.add_argument("--fps", type=float, default=0, help="frame rate of the outputs; 0 = the input video's, or 10")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override the stored config")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output folder (default <run>/predict/<input name>)")
    return p


def side_by_side(truth, pred, min_height: int = 128):
    """Video frames: truth | prediction | |error| as uint8 (N, h, w, 3) with even h and w (yuv420p needs them).
    truth, pred (N, 3, H, W) in [-1, 1]; pred NaN where the frame has no prediction (shown black, no error)."""
    import torch

    from data.pixels import to_uint8_hwc
    from training.visualize import enlarge, error_frames
    missing = pred.isnan().flatten(1).any(1)
    pred = torch.where(missing[:, None, None, None], torch.full_like(truth, -1.0), pred)
    err = torch.where(missing[:, None, None, None], torch.full_like(truth, -1.0), error_frames(pred, truth))
    gap = torch.ones(truth.shape[0], 3, truth.shape[2], 2)  # white
    row = enlarge(torch.cat([truth, gap, pred, gap, err], dim=-1), min_height)
    u8 = to_uint8_hwc(row)
    return u8[:, :u8.shape[1] // 2 * 2, :u8.shape[2] // 2 * 2]


def write_mp4(frames, path: Path, fps: float) -> Path:
    """uint8 (N, h, w, 3) -> an H.264 mp4 (MPEG-4 part 2 where libx264 is missing) through PyAV."""
    import av
    from fractions import Fraction
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def input_fps(path: Path) -> float | None:
    try:
        import av
        with av.open(str(path)) as c:
            rate = c.streams.video[0].average_rate
            return float(rate) if rate else None
    except Exception:  # noqa: BLE001 - a folder of frames, or a container without a rate
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import Image
    from tqdm import tqdm

    from data import DataError
    from data.pixels import to_uint8_hwc
    from diagnosis.frame_scores import read_source, score_clip
    from tools.run_tools import load_run
    from training.visualize import save_gif

    # ---- model and frames
    loaded = load_run(args)
    if loaded is None:
        return 2
    cfg = loaded.cfg
    H = args.rollout * cfg.data.t_future
    if args.rollout < 1 or not 1 <= args.show_horizon <= H:
        print(f"error: --rollout >= 1 and --show-horizon in 1 .. {H}", file=sys.stderr)
        return 2
    try:
        clip = read_source(args.input, cfg.data, args.cond)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    N, Tp = clip.frames.shape[0], cfg.data.t_past
    print(f"model: {loaded.describe()}; {args.weights} weights\ninput: {args.input}: {N} frames "
          f"(interval {cfg.data.frame_interval}) at {cfg.data.height}x{cfg.data.width}; predicting {N - Tp} windows "
          f"x {H} frames" + (f"; conditioning from {clip.cond_source}" if clip.cond_source else ""))

    # ---- predict every window
    with tqdm(total=max(N - Tp, 0), desc="predict", unit="window") as bar:
        try:
            scores = score_clip(loaded.model, loaded.net(args.weights), clip, rounds=args.rollout,
                                batch_size=args.batch_size, steps=args.steps or None, seed=args.seed,
                                keep=args.show_horizon, precision=args.precision or cfg.train.mixed_precision,
                                progress=bar)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    # ---- outputs
    out = Path(args.out) if args.out else Path(args.run) / "predict" / Path(args.input).stem
    out.mkdir(parents=True, exist_ok=True)
    fps = args.fps or input_fps(Path(args.input)) or 10.0
    video = side_by_side(clip.frames, scores.predictions)
    write_mp4(video, out / "predict.mp4", fps)
    save_gif([Image.fromarray(a) for a in video], out / "predict.gif", round(1000 / fps))
    if args.png:
        (out / "predicted").mkdir(exist_ok=True)
        for f in range(N):
            if not scores.predictions[f].isnan().any():
                Image.fromarray(to_uint8_hwc(scores.predictions[f])).save(out / "predicted" / f"{clip.frame_indices[f]:06d}.png")
    with open(out / "frames.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", *[f"psnr_t+{h + 1}" for h in range(H)], *[f"ssim_t+{h + 1}" for h in range(H)],
                    "psnr_mean", "ssim_mean", "copy_last_psnr_t+1"])

        def fmt(v):
            return "" if math.isnan(v) else f"{v:.4f}"

        ssim_mean = scores.ssim.nanmean(1)
        for f in range(N):
            w.writerow([clip.frame_indices[f], *map(fmt, scores.psnr[f].tolist()), *map(fmt, scores.ssim[f].tolist()),
                        fmt(float(scores.psnr_mean[f])), fmt(float(ssim_mean[f])), fmt(float(scores.copy_psnr[f, 0]))])
    # copy-last over the frames the model predicts at that horizon (not frames 1 .. t_past-1 too): the rows compare
    copy_on_predicted = scores.copy_psnr.masked_fill(scores.psnr.isnan(), float("nan"))
    per_h = {"model_psnr": scores.psnr.nanmean(0).tolist(), "model_ssim": scores.ssim.nanmean(0).tolist(),
             "copy_last_psnr": copy_on_predicted.nanmean(0).tolist()}
    summary = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "weights": args.weights, "input": args.input,
               "frames": N, "predicted_frames": int((~scores.psnr[:, 0].isnan()).sum()), "rollout": args.rollout,
               "show_horizon": args.show_horizon, "seed": args.seed, "fps": fps, "cond_source": clip.cond_source,
               "mean_per_horizon": {k: [round(v, 4) for v in vals] for k, vals in per_h.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("PSNR (dB)   " + "".join(f"{'t+' + str(h + 1):>8}" for h in range(H)))
    print("model       " + "".join(f"{v:8.2f}" for v in per_h["model_psnr"]))
    print("copy_last   " + "".join(f"{v:8.2f}" for v in per_h["copy_last_psnr"]))
    print(f"wrote {out}/: predict.mp4, predict.gif, frames.csv, summary.json" + (", predicted/" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

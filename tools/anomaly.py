#!/usr/bin/env python
"""Anomaly detection by prediction error with a trained run: per-frame scores, and the frame-level AUC given labels.

    python tools/anomaly.py --run runs/ucsd_ped2 --data-root UCSDped2/Test --labels UCSDped2/Test/UCSDped2.m
    python tools/anomaly.py --run runs/anomaly_demo --data-root data_cache/synthetic_anomaly \\
        --labels data_cache/synthetic_anomaly/anomalies.json

Every frame of every clip under --data-root is predicted from the t_past frames before it (model/sliding.py, the
path of tools/predict.py and tools/evaluate.py) and scored by PSNR: at t+1, and averaged over the horizons 1 ..
rollout * t_future that predict it (with --samples K, the PSNR averaged over K predictions per window); also the
PSNR of the worst --patch x --patch window of the frame (*_patch scores: a small object's error, undiluted by the
background; an option beside the paper's whole-frame score). Anomaly score = 1 - regularity, the regularity being
the PSNR min-max normalised per clip (Liu et al., CVPR 2018, eq. 12), and, unnormalised, -PSNR. Copying the last
frame is scored the same way (the baseline a learned model must beat). The first t_past frames of each clip have no
prediction and are left out. Labels (diagnosis/anomaly.py): JSON {clip: [[start, end], ...]} or CSV clip,start,end
(0-based inclusive frame numbers), UCSD's .m (TestDataset.gt_frame{i} = [61:180]) or a .mat cell array `gt` (1-based;
both matched to clips by order). Writes into --out (default <run>/anomaly): scores.csv (per frame), anomaly.json
(AUC over all frames and per clip, for every score), roc.png, and curves/<clip>.png (scores against frame, labelled
intervals shaded). With --smooth SIGMA ..., every score also comes smoothed over time (a Gaussian of SIGMA frames on
the PSNR series of each clip, before normalisation: diagnosis/anomaly.py's smooth), as <score>_smooth<SIGMA> beside it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = {"t1": "at t+1", "mean": "at each horizon that predicts the frame, averaged",
           "t1_patch": "of the worst patch at t+1", "mean_patch": "of the worst patch, averaged over the horizons"}
SCORES = {  # name -> (predictor, PSNR column, per-clip min-max normalisation); Liu et al.'s score is model_t+1
    f"{pred}_{col.replace('t1', 't+1')}{'' if norm else '_raw'}": (pred, col, norm)
    for norm in (True, False) for pred in ("model", "copy_last") for col in COLUMNS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", required=True, help="run folder (its newest valid checkpoint unless --checkpoint)")
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint file")
    p.add_argument("--data-root", required=True, help="folder of clips (frame folders or videos) to score")
    p.add_argument("--labels", help="anomalous frame intervals (.json, .csv, UCSD .m, .mat); none = scores only")
    p.add_argument("--clips", type=int, default=0, help="score only the first N clips (name order); 0 = all")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw weights")
    p.add_argument("--rollout", type=int, default=1, metavar="K", help="rounds of t_future frames (default 1)")
    p.add_argument("--steps", type=int, default=0, help="DDIM steps; 0 = the run's sampler.num_inference_steps")
    p.add_argument("--batch-size", type=int, default=32, help="windows per model call (does not change a number)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="predictions per window; each frame's PSNR is averaged over the K (default 1)")
    p.add_argument("--patch", type=int, default=16, help="side of the patches of the *_patch scores, pixels (default 16)")
    p.add_argument("--smooth", type=float, nargs="+", default=[], metavar="SIGMA",
                   help="also report every score smoothed over time by a Gaussian of SIGMA frames, as "
                        "<score>_smooth<SIGMA>, for each SIGMA given (default: none, Liu et al.'s protocol)")
    p.add_argument("--precision", choices=["bf16", "no"], help="default: the run's train.mixed_precision")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override the stored config")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output folder (default <run>/anomaly)")
    return p


def clip_psnr(samples: list) -> dict:
    """PSNR columns of one clip's ClipScores, one per sample: (predictor, column) -> (N,), model PSNR (dB) averaged
    over the samples."""
    import torch

    model = {"": torch.stack([s.psnr for s in samples]).mean(0),
             "_patch": torch.stack([s.patch_psnr for s in samples]).mean(0)}
    copy = {"": samples[0].copy_psnr, "_patch": samples[0].copy_patch_psnr}  # (N, H) each
    out = {}
    for kind in ("", "_patch"):
        for pred, psnr in (("model", model[kind]), ("copy_last", copy[kind])):
            out[pred, "t1" + kind], out[pred, "mean" + kind] = psnr[:, 0], psnr.nanmean(1)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples < 1 or args.patch < 1:
        parser.error("--samples and --patch must be at least 1")
    if not all(0 < sigma < 1e6 for sigma in args.smooth):
        parser.error("--smooth takes numbers of frames above 0")
    import dataclasses

    import torch
    from tqdm import tqdm

    from data import DataError, discover_clips
    from diagnosis import anomaly
    from diagnosis.frame_scores import read_source, score_clip
    from diagnosis.plots import tile
    from diagnosis.report import json_safe
    from tools.run_tools import load_run

    # ---- model, clips, labels
    loaded = load_run(args)
    if loaded is None:
        return 2
    cfg = loaded.cfg
    data_cfg = dataclasses.replace(cfg.data, root=args.data_root,
                                   synthetic=dataclasses.replace(cfg.data.synthetic, enabled=False))
    try:
        clips = discover_clips(data_cfg)
        clips = clips[:args.clips] if args.clips else clips
        labels = anomaly.load_labels(args.labels, [c.name for c in clips]) if args.labels else None
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if labels is not None and not set(labels) & {c.name for c in clips}:
        print(f"error: no clip under {args.data_root} is named in {args.labels}", file=sys.stderr)
        return 2
    print(f"model: {loaded.describe()}; {args.weights} weights\ndata: {len(clips)} clips under {args.data_root}")

    # ---- predict and score every frame
    per_clip = []  # (name, frame numbers, {(predictor, column): psnr (N,)}, labels (N,) or None)
    total = args.samples * sum(max(len(range(0, c.num_frames, cfg.data.frame_interval)) - cfg.data.t_past, 0)
                               for c in clips)
    with tqdm(total=total, desc="predict", unit="window") as bar:
        for c in clips:
            try:
                src = read_source(c.path, data_cfg)
                s = [score_clip(loaded.model, loaded.net(args.weights), src, rounds=args.rollout,
                                batch_size=args.batch_size, steps=args.steps or None, seed=args.seed, sample=k,
                                precision=args.precision or cfg.train.mixed_precision, progress=bar, patch=args.patch)
                     for k in range(args.samples)]
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            y = anomaly.frame_labels(labels.get(c.name, []), src.frame_indices) if labels is not None else None
            per_clip.append((c.name, src.frame_indices, clip_psnr(s), y))

    # ---- scores per frame (the model's first t_past frames have none: left out everywhere, copy-last included)
    scores = {k: (pred, col, norm, 0.0) for k, (pred, col, norm) in SCORES.items()}
    for sigma in args.smooth:
        scores.update({f"{k}_smooth{sigma:g}": (pred, col, norm, sigma) for k, (pred, col, norm) in SCORES.items()})
    smoothed = [f"model_t+1_smooth{sigma:g}" for sigma in args.smooth]
    result = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "weights": args.weights,
              "data_root": args.data_root, "labels": args.labels, "rollout": args.rollout, "seed": args.seed,
              "samples": args.samples, "patch": args.patch, "smooth": args.smooth,
              "scores": {k: f"{'1 - per-clip min-max normalised' if norm else 'minus'} PSNR of {pred} {COLUMNS[col]}"
                            + (f" ({args.patch}x{args.patch} pixels, stride {args.patch // 2})" if "patch" in col else "")
                            + (f", mean over {args.samples} samples" if pred == "model" and args.samples > 1 else "")
                            + (f", smoothed over time (Gaussian, sigma {sigma:g} frames)" if sigma else "")
                         for k, (pred, col, norm, sigma) in scores.items()}}
    columns = {}  # (clip index, score name) -> (N,) anomaly scores
    for i, (_, _, psnr, _) in enumerate(per_clip):
        valid = torch.isfinite(psnr[("model", "t1")])
        for name, (pred, col, norm, sigma) in scores.items():
            values = anomaly.smooth(psnr[(pred, col)].masked_fill(~valid, math.nan), sigma)
            columns[i, name] = anomaly.anomaly_scores(values, norm)
    out = Path(args.out) if args.out else Path(args.run) / "anomaly"
    (out / "curves").mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip", "frame", "label", "model_psnr_t+1", "model_psnr_mean", "copy_last_psnr_t+1", *scores])
        for i, (name, frames, psnr, y) in enumerate(per_clip):
            for f, number in enumerate(frames):
                vals = [float(psnr[("model", "t1")][f]), float(psnr[("model", "mean")][f]),
                        float(psnr[("copy_last", "t1")][f]), *(float(columns[i, k][f]) for k in scores)]
                w.writerow([name, number, "" if y is None else int(y[f]),
                            *("" if math.isnan(v) else f"{v:.5f}" for v in vals)])

    # ---- AUC, ROC and score curves
    panels = []
    if labels is not None:
        ys = torch.cat([y for *_, y in per_clip])
        result["frames_scored"] = int(torch.isfinite(torch.cat([columns[i, "model_t+1"]
                                                                 for i in range(len(per_clip))])).sum())
        result["frames_anomalous"] = int(ys[torch.isfinite(torch.cat([columns[i, "model_t+1"]
                                                                       for i in range(len(per_clip))]))].sum())
        result["auc"] = {k: anomaly.auc(torch.cat([columns[i, k] for i in range(len(per_clip))]), ys) for k in scores}
        result["auc_per_clip"] = {name: {k: anomaly.auc(columns[i, k], y) for k in scores}
                                  for i, (name, _, _, y) in enumerate(per_clip)}
        events = anomaly.load_events(args.labels)
        if events:  # labels that name each event's kind (synthetic worlds): which events the scores find
            result["by_kind"] = {k: anomaly.by_kind({name: columns[i, k] for i, (name, *_) in enumerate(per_clip)},
                                                    {name: frames for name, frames, *_ in per_clip}, events)
                                 for k in ("model_t+1", "model_mean", "copy_last_t+1", *smoothed)}
        curves = {}
        for k in ("model_t+1", "model_mean", "model_t+1_patch", "copy_last_t+1", *smoothed[:1]):
            fpr, tpr = anomaly.roc(torch.cat([columns[i, k] for i in range(len(per_clip))]), ys)
            curves[k] = (fpr, tpr, result["auc"][k])
        anomaly.roc_picture(curves, f"frame-level ROC, {len(per_clip)} clips").save(out / "roc.png")
    for i, (name, frames, _, y) in enumerate(per_clip):
        series = {k: columns[i, k].tolist() for k in ("model_t+1", "copy_last_t+1", *smoothed[:1])}
        shaded = [(frames[a], frames[b]) for a, b in anomaly.intervals_of(y)] if y is not None else []
        img = anomaly.score_curve(frames, series, shaded, f"{name}: anomaly score (1 - regularity)")
        img.save(out / "curves" / f"{name}.png")
        panels.append(img)
    tile(panels[:8], columns=2).save(out / "curves.png")
    (out / "anomaly.json").write_text(json.dumps(json_safe(result), indent=1))  # AUC of a one-class clip: "nan"

    # ---- report
    if labels is not None:
        print(f"frame-level AUC over {result['frames_scored']} frames ({result['frames_anomalous']} anomalous):")
        for k, v in result["auc"].items():
            print(f"  {k:<26}{v:.4f}")
        for k, kinds in result.get("by_kind", {}).items():
            found = ", ".join(f"{kind} {r['auc']:.3f}" for kind, r in kinds.items() if "auc" in r)
            after = kinds["normal_after_event"]["mean_score_by_distance"][0]
            print(f"{k} by event kind: {found}; normal frames score {after:.2f} one frame after an event, "
                  f"{kinds['normal_elsewhere']['mean_score']:.2f} elsewhere")
    print(f"wrote {out}/: scores.csv, anomaly.json, curves/, curves.png" + (", roc.png" if labels is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

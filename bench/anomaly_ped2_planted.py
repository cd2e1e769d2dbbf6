#!/usr/bin/env python
"""UCSD Ped2 with planted anomalies of known frames (issue 15), scored by tools/anomaly.py with a trained Ped2 run.

    python bench/anomaly_ped2_planted.py --run runs/ucsd_ped2 --data-root .gpu_data/ped2 --out ped2_planted
    python bench/anomaly_ped2_planted.py --data-root .gpu_data/ped2 --out ped2_planted --no-score   # data only

The clips the run never trained on (the validation split of --config, data.val_fraction 0.2 of configs/ucsd_ped2.yaml:
04, 07, 15) are copied with anomalies planted: in each event a pedestrian, cut from the event's first frame (the box
on the walkway with the most foreground, foreground = distance to the clip's median frame, and only its foreground
pixels, softly), is pasted and slid over the walkway for --length frames, in one of two ways the training clips
never show:
  fast    along the walkway at --fast-speed pixels per frame (a cyclist's speed; pedestrians move ~1 px/frame here)
  across  at right angles to the walkway (vertically in the picture) at --across-speed pixels per frame
The pasted figure is rigid (its legs do not move) and appears and disappears at the event's ends: a detector is
credited for all of that, as for a real cart. Labels: the frames where the paste is visible, 0-based inclusive, in
<out>/data/labels.json (tools/anomaly.py's JSON format; "events" records kind, box and speed).
Out: data/<clip>/NNN.png (grey, the input's size), data/labels.json, planted.png (each event's first, middle and last
frame), and from tools/anomaly.py in score/: anomaly.json (frame-level AUC of every score, model and copy-last),
roc.png, curves.png, scores.csv. Arguments after -- go to tools/anomaly.py (e.g. -- --samples 4 --steps 10).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-root", default=".gpu_data/ped2", help="Ped2 training clips, root/<clip>/<frame>.png|jpg|tif")
    p.add_argument("--run", help="trained Ped2 run folder (or export) to score with; required unless --no-score")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default="configs/ucsd_ped2.yaml", help="config whose validation split names the clips")
    p.add_argument("--clips", nargs="+", help="clip names to use instead of the config's validation split")
    p.add_argument("--events", type=int, default=2, help="planted events per clip (default 2)")
    p.add_argument("--length", type=int, default=20, help="frames per event (default 20)")
    p.add_argument("--fast-speed", type=float, default=5.0, help="px per frame of 'fast' (default 5)")
    p.add_argument("--across-speed", type=float, default=2.5, help="px per frame of 'across' (default 2.5)")
    p.add_argument("--patch", type=int, nargs=2, default=[10, 18], metavar=("W", "H"),
                   help="box cut around a pedestrian, pixels at the frames' size (default 10 18: one at 192x128)")
    p.add_argument("--walkway", type=float, default=0.45, help="the walkway starts this fraction of the height down")
    p.add_argument("--seed", type=int, default=0, help="where and what is planted")
    p.add_argument("--no-score", action="store_true", help="write the data only")
    return p


def read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32)


def busiest_box(foreground: np.ndarray, w: int, h: int, y_min: int) -> tuple[int, int]:
    """(x, y) top-left of the w x h box (top at y_min or below) holding the most foreground: a pedestrian."""
    import torch
    import torch.nn.functional as F

    energy = F.avg_pool2d(torch.from_numpy(foreground[y_min:])[None, None], (h, w), stride=1)[0, 0]
    y, x = divmod(int(energy.argmax()), energy.shape[1])
    return x, y + y_min


def plant(frames: np.ndarray, rng: np.random.Generator, args) -> tuple[np.ndarray, list[dict]]:
    """Frames (T, H, W) grey in [0, 255] with args.events pasted figures in disjoint intervals; the events."""
    T, H, W = frames.shape
    pw, ph = args.patch
    L = args.length
    walk = int(args.walkway * H)  # the walkway: rows below this
    background = np.median(frames, axis=0)  # (H, W): the fixed camera's empty scene
    out, events = frames.copy(), []
    segment = (T - 8) // args.events  # event j starts inside segment j, after 8 normal frames of context
    if segment < L + 2:
        raise ValueError(f"{args.events} events of {L} frames do not fit in {T} frames")
    for j in range(args.events):
        a = 8 + j * segment + int(rng.integers(0, segment - L + 1))
        kind = ("fast", "across")[j % 2] if args.events > 1 else str(rng.choice(["fast", "across"]))
        foreground = np.abs(frames[a] - background)
        sx, sy = busiest_box(foreground, pw, ph, walk)
        figure = frames[a, sy:sy + ph, sx:sx + pw].copy()
        alpha = np.clip((foreground[sy:sy + ph, sx:sx + pw] - 8.0) / 16.0, 0.0, 1.0)  # the figure's pixels only
        if kind == "fast":  # along the walkway (x), either direction, at a height where the figure fits
            v = args.fast_speed * rng.choice([-1, 1])
            span = abs(v) * (L - 1)
            x0 = rng.uniform(0, W - pw - span) + (span if v < 0 else 0)
            y0 = rng.uniform(walk, H - ph)
            path = [(x0 + v * i, y0) for i in range(L)]
        else:  # across the walkway (y)
            v = args.across_speed * rng.choice([-1, 1])
            span = abs(v) * (L - 1)
            y0 = rng.uniform(walk, max(H - ph - span, walk)) + (span if v < 0 else 0)
            x0 = rng.uniform(0.1 * W, 0.9 * W - pw)
            path = [(x0, y0 + v * i) for i in range(L)]
        for i, (x, y) in enumerate(path):
            xi, yi = int(round(x)), int(round(y))
            region = out[a + i, yi:yi + ph, xi:xi + pw]
            region += alpha * (figure - region)
        events.append({"kind": kind, "start": a, "end": a + L - 1, "speed_px_per_frame": float(v),
                       "source_box": [int(sx), int(sy), pw, ph], "first_box": [int(round(path[0][0])),
                                                                             int(round(path[0][1])), pw, ph]})
    return out, events


def picture(clips: dict[str, np.ndarray], events: dict[str, list[dict]]):
    """Each event's first, middle and last frame side by side, one row per event."""
    from PIL import Image

    rows = []
    for name, evs in events.items():
        for e in evs:
            picks = [e["start"], (e["start"] + e["end"]) // 2, e["end"]]
            rows.append(np.concatenate([clips[name][t] for t in picks], axis=1))
    return Image.fromarray(np.clip(np.concatenate(rows, axis=0), 0, 255).astype(np.uint8))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.no_score and not args.run:
        print("error: --run is required unless --no-score", file=sys.stderr)
        return 2
    from PIL import Image

    from configs.loader import load_config
    from data import discover_clips
    from data.split import split_clips

    # ---- the clips: the config's validation split (never trained on) unless named
    cfg = load_config(args.config, [f"data.root={args.data_root}", "data.synthetic.enabled=false"])
    clips = discover_clips(cfg.data)
    if args.clips:
        chosen = [c for c in clips if c.name in set(args.clips)]
        missing = set(args.clips) - {c.name for c in chosen}
        if missing:
            print(f"error: no clip {sorted(missing)} under {args.data_root}", file=sys.stderr)
            return 2
    else:
        chosen = split_clips(clips, cfg.data.val_fraction, cfg.data.split_seed)[1]
    print(f"clips: {[c.name for c in chosen]} from {args.data_root}")

    # ---- plant and write
    out = Path(args.out)
    data = out / "data"
    rng = np.random.default_rng(args.seed)
    planted, events = {}, {}
    for c in chosen:
        paths = sorted(p for p in Path(c.path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
        frames = np.stack([read_grey(p) for p in paths])
        planted[c.name], events[c.name] = plant(frames, rng, args)
        (data / c.name).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(planted[c.name]):
            Image.fromarray(np.clip(np.round(f), 0, 255).astype(np.uint8)).save(data / c.name / f"{i:03d}.png")
    labels = data / "labels.json"
    labels.write_text(json.dumps({
        "format": "anomalous frame intervals per clip, [first, last], 0-based, inclusive",
        "clips": {n: [[e["start"], e["end"]] for e in evs] for n, evs in events.items()},
        "events": events}, indent=1))
    picture(planted, events).save(out / "planted.png")
    n_frames = sum(len(f) for f in planted.values())
    n_anom = sum(e["end"] - e["start"] + 1 for evs in events.values() for e in evs)
    print(f"wrote {data}: {len(planted)} clips, {n_frames} frames, {n_anom} anomalous; {labels}; {out}/planted.png")
    if args.no_score:
        return 0

    # ---- score with the run (tools/anomaly.py, every option it takes after --)
    from tools import anomaly as tool

    return tool.main(["--run", args.run, "--data-root", str(data), "--labels", str(labels), "--out", str(out / "score"),
                      *extra])


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Cut one video (or folder of frames) into training clips and a held-out last part, as a data root for the trainer.

    python tools/split_video.py --input ../shared/data/intel_sample_videos/car-detection.mp4 \\
        --out data_cache/car_detection --height 144 --width 256

writes data_cache/car_detection/train_0 .. train_3 (the first 80% of the frames, in four consecutive clips) and
test_last20 (the last 20%), each a folder of NNNN.jpg, plus split.json (which source frames went where). This is
the layout configs/car_detection.yaml and configs/car_detection_cpu.yaml expect (their data.split_seed puts exactly
test_last20 in the validation split). Frames are resized as the trainer does (data.resize_mode crop: cover, then
centre-crop; the aspect ratio is kept). Several training clips rather than one let the trainer hold a clip out
elsewhere and give the data loader windows from every part of the video.

Nothing is written over: an existing --out is refused unless --overwrite, and the clips are written into a temporary
folder next to --out that is renamed into place only when every frame is written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", required=True, help="a video file or a folder of frames")
    p.add_argument("--out", required=True, help="the data root to write (refused if it exists, unless --overwrite)")
    p.add_argument("--height", type=int, required=True, help="frame height, pixels")
    p.add_argument("--width", type=int, required=True, help="frame width, pixels")
    p.add_argument("--train-clips", type=int, default=4, help="consecutive clips the training part is cut into (default 4)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="the last fraction of the frames held out as test_last<percent> (default 0.2)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="frame files (jpg: quality 95; default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def plan(num_frames: int, train_clips: int, test_fraction: float) -> dict[str, range]:
    """Clip name -> source frame range: the first (1 - test_fraction) of the frames in train_clips consecutive
    clips of (nearly) equal length, the rest as test_last<percent>."""
    n_test = round(num_frames * test_fraction)
    n_train = num_frames - n_test
    out = {f"train_{k}": range(k * n_train // train_clips, (k + 1) * n_train // train_clips) for k in range(train_clips)}
    if n_test:
        out[f"test_last{round(100 * test_fraction)}"] = range(n_train, num_frames)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.height < 8 or args.width < 8:
        parser.error("--height and --width must be at least 8 pixels")
    if args.train_clips < 1:
        parser.error("--train-clips must be at least 1")
    if not 0 <= args.test_fraction < 1:
        parser.error("--test-fraction must be in [0, 1)")
    from tqdm import tqdm

    from configs.schema import DataConfig
    from data import DataError, read_clip_frames
    from data.pixels import to_uint8_hwc
    from diagnosis.inputs import source_clip
    from PIL import Image

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    cfg = DataConfig(root=str(out), height=args.height, width=args.width)
    try:
        clip = source_clip(args.input)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = plan(clip.num_frames, args.train_clips, args.test_fraction)
    short = [name for name, r in parts.items() if len(r) < 2]
    if short:
        print(f"error: {args.input} has {clip.num_frames} frames: too few for {args.train_clips} training clips and a "
              f"test part of {args.test_fraction:g} ({', '.join(short)} would hold fewer than 2 frames)", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with tqdm(total=clip.num_frames, desc="split", unit="frame") as bar:
            for name, frames in parts.items():
                (tmp / name).mkdir()
                for start in range(frames.start, frames.stop, 64):  # a chunk at a time: long videos fit in memory
                    chunk = list(range(start, min(start + 64, frames.stop)))
                    images = to_uint8_hwc(read_clip_frames(clip, chunk, cfg))
                    for i, img in zip(chunk, images):
                        path = tmp / name / f"{i - frames.start:04d}.{args.format}"
                        Image.fromarray(img).save(path, **({"quality": 95} if args.format == "jpg" else {}))
                    bar.update(len(chunk))
        (tmp / "split.json").write_text(json.dumps({
            "source": str(args.input), "source_frames": clip.num_frames, "height": args.height, "width": args.width,
            "clips": {name: [r.start, r.stop - 1] for name, r in parts.items()},
            "format": "source frame numbers of each clip, [first, last], 0-based, inclusive"}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # whatever stopped it (after the rename there is nothing left to remove)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}/: " + ", ".join(f"{name} ({len(r)} frames)" for name, r in parts.items()) + ", split.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the motion anchors' extrapolation costs per window, per-pixel against per colour region
(`diffusion.anchor_motion`), on frames of the demo's synthetic world: the part of the trainer's "motion anchors" pass
that the switch changes (the VAE decode before it and the encode after it are the same for both).

    python bench/bench_anchor_motion.py                      # 16 windows, one thread, the CPU
    python bench/bench_anchor_motion.py --threads 2 --windows 64 --json out.json

Rows alternate pixel, segment, pixel, ... so a shared CPU's drift hits both; the ratio is segment over the mean of
the pixel rows around it. The frames: each window's last past frame and the one anchor_gap before it, from the
world configs/demo.yaml generates (rendered here, not read from disk), at the config's anchor settings.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import ROOT, time_block  # noqa: E402
from configs.loader import load_config  # noqa: E402
from data.synthetic import render_clip  # noqa: E402
from model.motion import extrapolate  # noqa: E402


def frames(windows: int, gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(last, earlier), each (windows, 3, H, W) in [-1, 1]: one window per clip of the demo's world, frames 3 + gap
    and 3 (a window's last past frame and the one gap before it)."""
    sc = load_config(ROOT / "configs/demo.yaml").data.synthetic
    clips = [render_clip(sc, i)[0] for i in range(windows)]
    pick = lambda t: torch.from_numpy(np.stack([c[t] for c in clips])).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    return pick(3 + gap), pick(3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=16, help="windows per call (the trainer's batch is 16)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="pixel/segment pairs (then one more pixel row)")
    p.add_argument("--iters", type=int, default=3, help="calls timed per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows and ratios here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = load_config(ROOT / "configs/demo.yaml").diffusion
    last, earlier = (x.to(args.device) for x in frames(args.windows, d.anchor_gap))

    def run(motion: str) -> float:
        return time_block(lambda: extrapolate(last, earlier, d.anchor_gap, 4, d.anchor_radius, d.anchor_window,
                                              motion, d.anchor_segment_tol), 1, args.iters)

    rows = []
    for r in range(args.rounds):
        rows.append(("pixel", run("pixel")))
        rows.append(("segment", run("segment")))
    rows.append(("pixel", run("pixel")))
    ratios = [rows[i][1] / ((rows[i - 1][1] + rows[i + 1][1]) / 2) for i in range(1, len(rows), 2)]
    for name, ms in rows:
        print(f"{name:8s} {ms:8.1f} ms per call of {args.windows} windows")
    print(f"segment / pixel: {' '.join(f'{x:.2f}' for x in ratios)}  (median {float(np.median(ratios)):.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "windows": args.windows, "threads": args.threads, "device": args.device,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "rows": [{"motion": n, "ms": round(ms, 2)} for n, ms in rows],
            "segment_over_pixel": [round(x, 3) for x in ratios]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

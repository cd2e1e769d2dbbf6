"""What `vae.chunk_size` (frames per encoder / decoder call) costs: the config's VAE encoding and decoding the same
frames at several chunk sizes, each as a ratio to the config's own chunk size measured in the same process.

    python bench/bench_vae_chunk.py                                  # configs/demo.yaml, 2 threads, the CPU
    python bench/bench_vae_chunk.py --config configs/demo_action.yaml --sizes 64 16 8 4 --json out.json

On a CPU a large chunk is slower per frame, not faster: the activations of 64 frames of 64x64 at 32 channels (about
33 MB per layer) no longer stay in the caches, so every layer streams them from memory. Rows go round-robin over the
sizes (`--rounds` times), so a shared CPU's drift hits them all alike; each size's number is its median over rounds.
The frames are random in [-1, 1] at the config's data.height x data.width (speed does not depend on their values).
Whether the outputs equal the config size's to the bit is reported too (a convolution may choose another algorithm
for another batch size).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, time_block  # noqa: E402
from configs.loader import load_config  # noqa: E402
from model.performance import speed_up_vae  # noqa: E402
from model.vae import FrozenVAE  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo.yaml"), help="whose VAE and frame size")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 16, 8, 4],
                   help="chunk sizes to time beside the config's own (vae.chunk_size)")
    p.add_argument("--frames", type=int, default=64, help="frames per encode / decode call")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over the sizes")
    p.add_argument("--iters", type=int, default=2, help="calls timed per size and round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows and ratios here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    vae = speed_up_vae(FrozenVAE.from_config(cfg.vae).to(args.device), cfg.speed)  # as the trainer runs it
    own = cfg.vae.chunk_size
    sizes = [own] + [s for s in args.sizes if s != own]
    gen = torch.Generator().manual_seed(0)
    frames = (torch.rand(1, args.frames, 3, cfg.data.height, cfg.data.width, generator=gen) * 2 - 1).to(args.device)
    latents = vae.encode_moments(frames)[0]

    def with_chunk(size, fn):
        vae.chunk_size = size
        return fn()

    reference = {"encode": latents, "decode": vae.decode(latents)}
    calls = {"encode": lambda: vae.encode_moments(frames)[0], "decode": lambda: vae.decode(latents)}
    times = {(s, k): [] for s in sizes for k in calls}
    for _ in range(args.rounds):
        for s in sizes:
            for k, fn in calls.items():
                times[(s, k)].append(with_chunk(s, lambda: time_block(fn, 1, args.iters)))
    rows = []
    for s in sizes:
        row = {"chunk_size": s, "config_default": s == own}
        for k, fn in calls.items():
            ms = statistics.median(times[(s, k)])
            base = statistics.median(times[(own, k)])
            row[k] = {"ms": round(ms, 1), "frames_per_s": round(1e3 * args.frames / ms, 1),
                      "speedup_vs_config": round(base / ms, 3),
                      "bit_equal": bool(torch.equal(with_chunk(s, fn), reference[k]))}
        rows.append(row)
        print(f"chunk {s:3d}{' (config)' if s == own else '         '}  " + "  ".join(
            f"{k} {row[k]['ms']:7.1f} ms ({row[k]['frames_per_s']:6.1f} frames/s, {row[k]['speedup_vs_config']:.2f}x"
            f"{', bit-equal' if row[k]['bit_equal'] else ', differs'})" for k in calls))
    vae.chunk_size = own
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": str(args.config), "frames": args.frames, "size": [cfg.data.height, cfg.data.width],
            "threads": args.threads, "device": args.device, "rounds": args.rounds, "iters": args.iters,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latent-cache build from JPEG frames on disk (goal 3), baseline and optimised, through data.latent_cache.

Writes synthetic clips as 256x448 JPEGs (quality 90), then times `build_or_load` end to end (DataLoader workers
decode the JPEGs, pinned memory, the VAE encoder on the GPU, fp16 .npy files and the manifest), and its parts
alone: JPEG decoding in the workers, the encoder on GPU-resident frames, and reading cached windows back.

    python bench/bench_cache.py [--tiny] [--budget-s 240]
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.common import (device, elapsed_s, emit, emit_env, parse_args, reference_config, sync,  # noqa: E402
                          time_each)
from data import discover_clips  # noqa: E402
from data.synthetic import render_clip  # noqa: E402
from data.windows import build_windows  # noqa: E402
from model import FrozenVAE, performance  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from data.latent_cache import LatentWindowDataset, _FrameChunks, build_or_load  # noqa: E402

B = "cache"


def write_jpegs(cfg, root: Path) -> None:
    """cfg.data.synthetic's world at the data resolution, as JPEG clips root/clip_XXXX/NNNNNN.jpg (once)."""
    if (root / "done").is_file():
        return
    sc = dataclasses.replace(cfg.data.synthetic, height=cfg.data.height, width=cfg.data.width)

    def one(i: int) -> None:
        frames, _ = render_clip(sc, i)
        d = root / f"clip_{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for j, f in enumerate(frames):
            Image.fromarray(f).save(d / f"{j:06d}.jpg", quality=90)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(sc.num_clips)))
    (root / "done").write_text("ok")


def vae_for(cfg) -> FrozenVAE:
    """The FrozenVAE as the trainer gets it (from_config, then the speed.vae_* settings)."""
    torch.backends.cudnn.benchmark = cfg.speed.cudnn_benchmark and torch.cuda.is_available()
    vae = FrozenVAE.from_config(cfg.vae).to(device())
    return performance.speed_up_vae(vae, cfg.speed)


def main() -> None:
    args = parse_args(__doc__)
    emit_env(B)
    work = Path(args.work)
    clips_n, frames_n = (3, 16) if args.tiny else (24, 128)
    root = work / ("jpeg_tiny" if args.tiny else "jpeg_256x448")
    data = [f"data.root={root}", f"data.synthetic.num_clips={clips_n}", f"data.synthetic.frames_per_clip={frames_n}"]
    t = time.perf_counter()
    cfg = reference_config(args, data)
    write_jpegs(cfg, root)
    clips = discover_clips(cfg.data)
    total = sum(c.num_frames for c in clips)
    emit(B, "jpegs", clips=len(clips), frames=total, height=cfg.data.height, width=cfg.data.width,
         write_s=time.perf_counter() - t)
    info = DistInfo(device=device())
    workers_hi = 0 if args.tiny else 12

    # ---- JPEG decoding alone (DataLoader workers, pinned memory, no GPU work)
    for workers in ((0,) if args.tiny else (12,)):
        loader = DataLoader(_FrameChunks(clips, list(range(len(clips))), cfg.data, cfg.vae.chunk_size),
                            batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())
        t = time.perf_counter()
        n = sum(frames.shape[0] for _, _, frames in loader)
        emit(B, "jpeg_decode_only", workers=workers, frames=n, frames_per_s=n / (time.perf_counter() - t))

    # ---- the encoder alone on GPU-resident frames (chunk of vae.chunk_size frames)
    variants = {"encoder_fp32_nchw": ["vae.dtype=fp32", "speed.vae_channels_last=false", "speed.cudnn_benchmark=false"],
                "encoder_bf16_nchw": ["vae.dtype=bf16", "speed.vae_channels_last=false"],
                "encoder_bf16_channels_last": ["vae.dtype=bf16"],
                "encoder_bf16_channels_last_compiled": ["vae.dtype=bf16", "speed.vae_compile=true",
                                                        "speed.vae_compile_mode=default"],
                "encoder_bf16_channels_last_compiled_cuda_graphs": ["vae.dtype=bf16", "speed.vae_compile=true",
                                                                    "speed.vae_compile_mode=reduce-overhead"]}
    x = torch.rand(1, cfg.vae.chunk_size, 3, cfg.data.height, cfg.data.width, device=device()) * 2 - 1
    ref = None
    for name, over in variants.items():
        vae = vae_for(reference_config(args, data + over))
        ms = statistics.median(time_each(lambda: vae.encode_moments(x), 2, 3 if args.tiny else 10))
        mean = vae.encode_moments(x[:, :4])[0]
        ref = mean if ref is None else ref
        emit(B, name, chunk=x.shape[1], ms=ms, frames_per_s=x.shape[1] / (ms / 1e3),
             rel_err_vs_fp32=float((mean - ref).norm() / ref.norm()))
        del vae

    # ---- build_or_load end to end: baseline (fp32, NCHW, 8 workers) and optimised (bf16, 12 workers, compiled)
    builds = {"build_fp32_nchw_8workers": ["vae.dtype=fp32", "speed.vae_channels_last=false",
                                           "speed.cudnn_benchmark=false", f"data.num_workers={min(8, workers_hi)}"],
              "build_bf16_nchw_12workers": ["vae.dtype=bf16", "speed.vae_channels_last=false",
                                            f"data.num_workers={workers_hi}"],
              "build_bf16_compiled_channels_last_12workers": ["vae.dtype=bf16", "speed.vae_channels_last=true",
                                                              "speed.vae_compile=true",
                                                              f"data.num_workers={workers_hi}",
                                                              "speed.vae_compile_mode=default"],
              # CUDA graphs for the encoder (speed.vae_compile_mode=reduce-overhead): session 5 measured it slower
              "build_bf16_compiled_cuda_graphs_12workers": ["vae.dtype=bf16", "speed.vae_channels_last=true",
                                                            "speed.vae_compile=true", f"data.num_workers={workers_hi}",
                                                            "speed.vae_compile_mode=reduce-overhead"]}
    folder = None
    for name, over in builds.items():
        c = reference_config(args, data + over)
        vae = vae_for(c)
        sync()
        t = time.perf_counter()
        vae.encode_moments(x)  # compile / cuDNN autotuning once, outside the timed build (a real cache is large)
        sync()
        warm_s = time.perf_counter() - t
        cache_dir = work / "cache_bench" / name
        shutil.rmtree(cache_dir, ignore_errors=True)
        sync()
        t = time.perf_counter()
        folder = build_or_load(clips, c.data, vae, cache_dir, info, store_std=True,
                               num_workers=c.data.num_workers, log=lambda *a: None)
        sync()
        s = time.perf_counter() - t
        emit(B, name, frames=total, seconds=s, frames_per_s=total / s, workers=c.data.num_workers,
             chunk=c.vae.chunk_size, warmup_s=warm_s)
        del vae

    # ---- reading cached windows back (what the Trainer's DataLoader does every step)
    windows = build_windows(clips, cfg.data)
    ds = LatentWindowDataset(clips, cfg.data, windows, folder, list(range(len(clips))), with_std=False)
    batch = 8 if args.tiny else 256
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=0 if args.tiny else 8,
                        pin_memory=torch.cuda.is_available(), persistent_workers=not args.tiny)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = 0
    for b in it:
        n += 1
        if n == 20:
            break
    per_batch = 1e3 * (time.perf_counter() - t) / max(n, 1)
    b = next(iter(loader))["latent_mean"]
    h2d = statistics.median(time_each(lambda: b.to(device(), non_blocking=True).float(), 2, 10))
    emit(B, "readback_loader", batch=batch, windows=len(ds), loader_ms_per_batch=per_batch, h2d_ms=h2d,
         batch_mib=b.numel() * b.element_size() / 2 ** 20, dtype=str(b.dtype), pinned=b.is_pinned(),
         note="compare with the training step time at this batch (bench_train)")

    emit(B, "done", elapsed_s=elapsed_s())


if __name__ == "__main__":
    main()

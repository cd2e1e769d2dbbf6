"""Prediction speed (goal 2): DDIM-20 for 64 clips of 4 past frames, then the VAE decode of the 4 predicted frames,
through VideoPredictionDiffusion.predict_latents and FrozenVAE.decode, baseline and optimised, in one process.

Baseline as in the issue: eager UNet under bf16 autocast, bf16 VAE decode with diffusers' own upsampling, NCHW,
chunk 32. Optimised variants switch on what a user switches on in the config (speed.channels_last,
speed.vae_channels_last, speed.sampler_compile, speed.vae_compile, speed.vae_fuse_upsample, speed.compile_mode,
speed.vae_compile_mode, vae.chunk_size); each is a fresh model from `VideoPredictionDiffusion.from_config`.

    python bench/bench_sample.py [--tiny] [--budget-s 300]
"""
from __future__ import annotations

import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (device, elapsed_s, emit, emit_env, gpu_mem_gib, parse_args, reference_config,  # noqa: E402
                          reset_mem, time_each)
from model import VideoPredictionDiffusion  # noqa: E402

B = "sample"
BASELINE = ["vae.dtype=bf16", "speed.vae_channels_last=false", "speed.channels_last=false",
            "speed.cudnn_benchmark=false", "speed.vae_fuse_upsample=false"]
FAST = ["vae.dtype=bf16", "speed.sampler_compile=true", "speed.vae_compile=true",  # UNet NHWC (the config's), VAE NCHW
        "speed.compile_mode=default"]
GRAPHS = FAST + ["speed.compile_mode=reduce-overhead", "speed.vae_compile_mode=reduce-overhead"]  # as measured before


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.cuda.is_available() else torch.autocast(
        "cpu", enabled=False)


def build(args, overrides: list[str]) -> VideoPredictionDiffusion:
    cfg = reference_config(args, overrides)
    torch.backends.cudnn.benchmark = cfg.speed.cudnn_benchmark and torch.cuda.is_available()
    torch.manual_seed(0)
    return VideoPredictionDiffusion.from_config(cfg, device())


def inputs(model: VideoPredictionDiffusion, clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    d, vae = model.cfg.data, model.vae
    h, w = d.height // vae.downsample, d.width // vae.downsample
    g = torch.Generator(device()).manual_seed(1)
    past = torch.randn(clips, d.t_past, vae.latent_channels, h, w, device=device(), generator=g)
    noise = torch.randn(clips, d.t_future, vae.latent_channels, h, w, device=device(), generator=g)
    return past, noise


def run(model, name: str, clips: int, warmup: int, iters: int, **extra) -> dict:
    """Times the sampler and the decoder separately (their sum is the prediction of clips x t_future frames)."""
    past, noise = inputs(model, clips)
    out = {}

    def sample():
        with autocast():
            out["latents"] = model.predict_latents(past, noise=noise.clone())

    def decode():
        with autocast():
            out["frames"] = model.vae.decode(out["latents"])

    reset_mem()
    t_unet = time_each(sample, warmup, iters)
    t_vae = time_each(decode, warmup, iters)
    unet_ms, vae_ms = statistics.median(t_unet), statistics.median(t_vae)
    frames = clips * model.t_future
    rec = emit(B, name, clips=clips, steps=model.cfg.sampler.num_inference_steps, unet_ms=unet_ms, decode_ms=vae_ms,
               total_ms=unet_ms + vae_ms, frames_per_s=frames / ((unet_ms + vae_ms) / 1e3),
               decode_frames_per_s=frames / (vae_ms / 1e3), chunk=model.vae.chunk_size, n=len(t_unet),
               finite=bool(torch.isfinite(out["frames"]).all()), **gpu_mem_gib(), **extra)
    rec["latents"] = out["latents"].float()
    return rec


def main() -> None:
    args = parse_args(__doc__)
    emit_env(B)
    clips = 4 if args.tiny else 64
    iters = 2 if args.tiny else 5

    base = build(args, BASELINE)
    ref = run(base, "baseline_eager_bf16_nchw", clips, 1, iters)
    # one clip's decoded frames in bf16 against fp32 (the decoder's own rounding, random weights)
    lat = ref["latents"][:1]
    with autocast():
        bf16 = base.vae.decode(lat)
    base.vae.vae.float()
    base.vae.dtype = torch.float32
    fp32 = base.vae.decode(lat)
    emit(B, "decode_bf16_vs_fp32", rel_err=float((bf16 - fp32).norm() / fp32.norm()))
    del base
    gc.collect()

    def compare(name: str, rec: dict, against: dict, what: str) -> None:
        err = (rec["latents"] - against["latents"]).norm() / against["latents"].norm()
        emit(B, name, rel_err=float(err), note=f"same noise; bf16 autocast in both; {what}")

    # the sub-pixel upsampling alone, eager (same UNet: the latents must be identical; the pixels differ by rounding)
    fused = build(args, BASELINE + ["speed.vae_fuse_upsample=true"])  # the later override wins
    res = run(fused, "eager_bf16_nchw_fused_upsample", clips, 1, iters)
    compare("fused_vs_eager_latents", res, ref, "the UNet is untouched by speed.vae_fuse_upsample")
    with autocast():
        emit(B, "fused_vs_plain_decode", rel_err=float((fused.vae.decode(lat).float() - bf16.float()).norm()
                                                       / bf16.float().norm()), note="bf16, one clip")
    del fused
    gc.collect()

    # CUDA graphs: the 20 UNet calls (and the decoder chunks) replayed, no per-kernel launch cost; with diffusers'
    # upsampling (the best of session 2) and with the sub-pixel one (speed.vae_fuse_upsample, the default); the
    # config's compiled UNet has the NHWC GroupNorm (speed.nhwc_group_norm, measured for training), so ATen's is its baseline
    variants = [("", ["speed.vae_fuse_upsample=false"]), ("_fused_upsample", []),
                ("_fused_upsample_aten_group_norm", ["speed.nhwc_group_norm=false"]),
                ("_fused_upsample_unet_too", ["speed.fuse_upsample=true"]),
                ("_fused_upsample_vae_nhwc", ["speed.vae_channels_last=true"])]
    for i, (suffix, extra) in enumerate(variants):
        if i >= 3 and elapsed_s() > args.budget_s:
            continue
        graphs = build(args, GRAPHS + extra)
        name = "compiled_reduce_overhead_cuda_graphs" + suffix
        res = run(graphs, name, clips, 3, iters, overrides=extra)
        compare(f"{name}_vs_eager_latents", res, ref, "compiled, CUDA graphs")
        del graphs
        gc.collect()

    if elapsed_s() < args.budget_s:
        fast = build(args, FAST)  # compiled, no CUDA graphs, fused upsampling (the config's defaults)
        res = run(fast, "compiled_unet_and_decoder_channels_last_fused_upsample", clips, 2, iters)
        compare("compiled_vs_eager_latents", res, ref, "compiled")
        del fast
        gc.collect()

    if elapsed_s() < args.budget_s:
        cl = build(args, ["vae.dtype=bf16"])  # channels_last + cudnn benchmark, eager
        run(cl, "eager_channels_last", clips, 1, iters)
        del cl
        gc.collect()
    emit(B, "done", elapsed_s=elapsed_s())


if __name__ == "__main__":
    main()

"""Training speed (goal 1) and memory (goal 5) through the project's Trainer, baseline and optimised, in one process.

Each variant is a `Trainer` built from configs/config_video_prediction.yaml plus overrides, on a synthetic world at
256x448 (random SD-VAE, ~90M-parameter UNet, 32x56 latents). Its real `train_step` is timed (loss, backward,
clip, fused AdamW, EMA, and the per-step all-reduce of the non-finite check, read one step late) on a
batch that is already
on the GPU; the data-loading variants feed it from the latent cache through its own DataLoader.

    python bench/bench_train.py [--tiny] [--budget-s 420]
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import (device, elapsed_s, emit, emit_env, gpu_mem_gib, parse_args,  # noqa: E402
                          peak_matmul_tflops, reference_config, reset_mem, stats, time_block, time_each)
from training.distributed import DistInfo  # noqa: E402
from training.profiling import profile_steps  # noqa: E402
import train_video_pred  # noqa: E402
from video_prediction_trainer import Trainer  # noqa: E402

B = "train"
BASELINE = ["speed.channels_last=false", "speed.cudnn_benchmark=false", "speed.vae_channels_last=false"]
NAIVE = BASELINE + ["cache.enabled=false", "vae.dtype=fp32", "train.mixed_precision='no'"]
# the cache is built once (bf16 encoder), then read; compiled variants in torch.compile's default mode (the
# reference config's CUDA graphs are their own variants: the same speed on one GPU, BENCHMARKS.md)
CACHED = ["cache.enabled=true", "vae.dtype=bf16", "speed.compile_mode=default"]


class BenchTrainer(Trainer):
    """The Trainer, fed a fixed on-GPU batch when `fixed_batch` is set (timing without data loading), or, with
    `restart_workers`, a new DataLoader (workers, cold prefetch queue) at every epoch start, as before the
    endless epoch stream."""

    fixed_batch: dict | None = None
    restart_workers = False

    def _next_batch(self) -> dict:
        if self.fixed_batch is not None:
            return self.fixed_batch
        if self.restart_workers and self.position == 0:
            self._iter = None
        return super()._next_batch()


def world(args) -> list[str]:
    h, w, clips, frames = (32, 32, 4, 16) if args.tiny else (256, 448, 10, 64)
    return [f"data.root={Path(args.work) / f'world_{h}x{w}'}", "data.synthetic.enabled=true",
            f"data.synthetic.height={h}", f"data.synthetic.width={w}", f"data.synthetic.num_clips={clips}",
            f"data.synthetic.frames_per_clip={frames}", "data.val_fraction=0.1", "optim.warmup_steps=0",
            "ema.decay=0.9999", f"data.num_workers={0 if args.tiny else 8}"]


def build(args, name: str, overrides: list[str]) -> BenchTrainer:
    cfg = reference_config(args, world(args) + overrides + [f"logging.name={name}"])
    tr = train_video_pred.build(cfg, DistInfo(device=device()), Path(cfg.logging.run_dir) / name)
    tr.__class__ = BenchTrainer  # the same Trainer, with the bench's source of batches
    return tr


def fixed_batch(tr: Trainer, size: int) -> dict:
    """`size` windows on the device, tiled from up to 16 distinct ones of the training set."""
    items = [tr.train_set[i] for i in range(min(16, size, len(tr.train_set)))]
    batch = default_collate([items[i % len(items)] for i in range(size)])
    return {k: (v.to(tr.device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def flops_per_sample(tr: Trainer) -> tuple[float, float]:
    """(UNet forward + backward FLOPs of one training sample, VAE encoder FLOPs of one frame), counted by
    torch.utils.flop_counter on the eager modules at batch 4 (latents) and 1 (frame)."""
    d, vae = tr.cfg.data, tr.model.vae
    h, w = d.height // vae.downsample, d.width // vae.downsample
    past = torch.randn(4, d.t_past, vae.latent_channels, h, w, device=tr.device)
    future = torch.randn(4, d.t_future, vae.latent_channels, h, w, device=tr.device)
    with FlopCounterMode(display=False) as fc:
        with tr._autocast():
            loss = tr.model.loss(past, future, None, tr.generator, net=tr.unet)
        loss.backward()
    tr.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fe:
        vae.encode_moments(torch.zeros(1, 1, 3, d.height, d.width, device=tr.device))
    return fc.get_total_flops() / 4, fe.get_total_flops()


def throughput(size: int, ms: float, flops: float, peak: float) -> dict:
    """samples/s, TFLOP/s and MFU of a step of `size` samples taking `ms`, at `flops` per sample."""
    sps = size / (ms / 1e3)
    return {"samples_per_s": sps, "tflops": flops * sps / 1e12, "mfu": flops * sps / (peak * 1e12)}


def measure(tr: BenchTrainer, name: str, size: int, warmup: int, iters: int, flops: float, peak: float,
            **extra) -> dict | None:
    tr.fixed_batch = fixed_batch(tr, size)
    reset_mem()
    try:
        s = stats(time_each(tr.train_step, warmup, iters))
    except torch.OutOfMemoryError:
        tr.fixed_batch = None
        tr.optimizer.zero_grad(set_to_none=True)
        emit(B, name, batch=size, error="out of memory")
        return None
    return emit(B, name, batch=size, **s, **throughput(size, s["median_ms"], flops, peak), **gpu_mem_gib(), **extra)


def fits(tr: BenchTrainer, size: int) -> float | None:
    """Peak GiB allocated by two training steps at this batch, or None when it does not fit."""
    tr.fixed_batch = None
    gc.collect()
    reset_mem()
    peak = None
    try:
        tr.fixed_batch = fixed_batch(tr, size)
        tr.train_step()
        tr.train_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    except torch.OutOfMemoryError:
        pass  # the exception (and the activations its traceback holds) is gone after this block
    if peak is None:
        tr.fixed_batch = None
        tr.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    return peak


def max_batch(tr: BenchTrainer, name: str, start: int, step: int) -> None:
    """Largest per-GPU batch that trains: doubling from `start`, then bisecting to `step`. cuDNN autotuning is off
    meanwhile: every new batch shape would time every conv algorithm of the net (session 3: the first attempt, at
    512, had not finished after two minutes), and the workspace it tries is not what training keeps."""
    good, bad, size, peaks = 0, None, start, {}
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False

    def attempt(size: int) -> None:
        nonlocal good, bad
        peak = fits(tr, size)
        emit(B, f"{name}/try", batch=size, fits=peak is not None, peak_alloc_gib=peak)
        if peak is None:
            bad = size
        else:
            good, peaks[size] = size, peak

    try:
        while bad is None and size <= 65536:  # double until it no longer fits
            attempt(size)
            size *= 2
        while bad is not None and bad - good > step:  # then bisect to `step`
            attempt((good + bad) // 2 // step * step)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    emit(B, name, max_batch=good, peak_alloc_gib=peaks.get(good), card_gib=total, step=step)
    tr.fixed_batch = None


def quick_flag(p):
    p.add_argument("--quick", action="store_true",
                   help="after the naive baseline, only the compiled step, its profile, the loader and the layout, "
                        "sub-pixel and batch variants, and the largest batch (as --budget-s allows)")
    p.add_argument("--skip-naive", action="store_true",
                   help="leave out the naive baseline (goal 1's ratio then comes from another run: say so)")
    p.add_argument("--variants", default="",
                   help="comma-separated parts to run after the baselines, in this order (default: all; --list "
                        "names them), e.g. compiled,compiled_nhwc_group_norm")
    p.add_argument("--list", action="store_true", help="print the parts --variants can name, and exit")


def main() -> None:
    args = parse_args(__doc__, quick_flag)
    tiny = args.tiny
    big = 8 if tiny else 256  # the optimised batch
    small = 4 if tiny else 64  # the batch
    iters = 3 if tiny else 15
    n_real = 8 if tiny else 60  # steps fed by the DataLoader in a loader block

    def block_variant(name: str, overrides: list[str], size: int) -> None:
        """A compiled Trainer's train_step in a block of steps (deferred checks), after compiling and warming up,
        then a profile of three of its steps. MFU counts diffusers' UNet FLOPs (the model the issue names);
        mfu_own_flops counts what this variant's net computes (fewer with speed.fuse_upsample)."""
        if not torch.cuda.is_available():
            return
        reset_mem()
        tr = build(args, name, CACHED + ["speed.compile=true", f"train.batch_size={size}"] + overrides)
        own = flops_per_sample(tr)[0]
        tr.fixed_batch = fixed_batch(tr, size)
        time_block(tr.train_step, 3, 3)  # compile (CUDA graphs: record) and warm up
        ms = time_block(tr.train_step, 2, iters)
        tr.flush()
        emit(B, f"{name}_deferred_block", batch=size, ms_per_step=ms, **throughput(size, ms, flops, peak),
             mfu_own_flops=throughput(size, ms, own, peak)["mfu"], gflop_per_sample_own=own / 1e9,
             overrides=overrides, **gpu_mem_gib())
        emit(B, f"profile_{name}", batch=size, **profile_steps(tr.train_step, 1, 3))
        tr.flush()
        del tr
        gc.collect()

    def compiled() -> None:
        """The config switches as a user sets them (channels_last, cudnn benchmark, compile): the step, the cost of
        the per-step flags, its profile, and data loading from the latent cache."""
        best = build(args, "compiled", CACHED + ["speed.compile=true", f"train.batch_size={big}"])
        measure(best, "compiled_channels_last", big, 3, iters, flops, peak, compile_mode="default")
        # the step as the training loop runs it (flags read one step late), in a block of steps
        block_deferred = time_block(best.train_step, 2, iters)
        best.flush()
        emit(B, "compiled_channels_last_deferred_block", batch=big, ms_per_step=block_deferred,
             **throughput(big, block_deferred, flops, peak), note="Trainer.train_step in a block of steps")
        if torch.cuda.is_available():  # where the compiled step's GPU time goes, before choosing what to try
            emit(B, "profile_compiled_channels_last", batch=big, **profile_steps(best.train_step, 2, 5, "direct_copy"))
            best.flush()

        # data loading from the latent cache through the Trainer's own DataLoader (several epochs), timed as the
        # fixed-batch step above: a block of back-to-back steps. (Session 3 timed each loader step with a host sync
        # around it against the unsynced block: 12.7%, the sync's own cost; both are kept below to show it.)
        synced_fixed = time_each(best.train_step, 2, 10)
        best.flush()
        best.fixed_batch = None
        best.train_step()  # starts the workers
        real_block = time_block(best.train_step, 3, n_real)
        best.flush()
        real_each = time_each(best.train_step, 2, 10)
        best.flush()
        emit(B, "real_loader_epoch_stream", batch=big, block_ms=real_block, fixed_batch_block_ms=block_deferred,
             data_loading_fraction=(real_block - block_deferred) / block_deferred, steps=n_real,
             synced_each_step_real_median_ms=stats(real_each)["median_ms"],
             synced_each_step_fixed_median_ms=stats(synced_fixed)["median_ms"],
             epochs_seen=best.epoch, num_workers=best.cfg.data.num_workers,
             note="block_ms: mean of back-to-back steps fed by the DataLoader; synced_*: per-step timing with a sync")
        if elapsed_s() < args.budget_s and not args.quick:
            best.restart_workers = True
            old = time_block(best.train_step, 2, n_real)
            best.flush()
            emit(B, "real_loader_new_loader_each_epoch", batch=big, block_ms=old,
                 data_loading_fraction=(old - block_deferred) / block_deferred,
                 note="the loader before the epoch stream")
            best.restart_workers = False
        del best
        gc.collect()

    def loader(name: str, overrides: list[str]) -> None:
        """Data loading's share of the step under other settings (CUDA graphs free the host thread that the
        loader's workers compete with): fixed-batch block, loader block, twice, alternating, in one Trainer."""
        tr = build(args, name, CACHED + ["speed.compile=true", f"train.batch_size={big}"] + overrides)
        batch = fixed_batch(tr, big)
        tr.fixed_batch = batch
        time_block(tr.train_step, 3, 3)  # compile (CUDA graphs: record) and warm up
        tr.fixed_batch = None
        tr.train_step()  # starts the workers
        for rep in range(2):
            tr.fixed_batch = batch
            fixed_ms = time_block(tr.train_step, 2, iters)
            tr.flush()
            tr.fixed_batch = None
            real_ms = time_block(tr.train_step, 3, n_real)
            tr.flush()
            emit(B, f"{name}_loader", batch=big, rep=rep, block_ms=real_ms, fixed_batch_block_ms=fixed_ms,
                 data_loading_fraction=(real_ms - fixed_ms) / fixed_ms, steps=n_real,
                 num_workers=tr.cfg.data.num_workers, overrides=overrides)
        del tr
        gc.collect()

    def max_batch_eager() -> None:  # the largest per-GPU batch (eager, NHWC)
        if torch.cuda.is_available():
            tr = build(args, "memory", CACHED + [f"train.batch_size={big}"])
            max_batch(tr, "max_batch_eager_channels_last", 2048, 256)
            del tr
            gc.collect()

    def fit_reduce_overhead() -> None:
        """Trainer.fit, the real loop, with CUDA graphs for the training step (speed.compile_mode=reduce-overhead)
        and for the sampler (speed.sampler_compile) in one process: sample grids and an evaluation are due mid-run, and
        training goes on after them. Its own log gives samples/s; a grid is copied to $OUT."""
        steps = 20 if tiny else 120
        tr = build(args, "fit_reduce_overhead",
                   CACHED + ["speed.compile=true", f"train.batch_size={big}", "speed.compile_mode=reduce-overhead",
                             "speed.sampler_compile=true", f"train.max_steps={steps}", f"train.log_every={steps // 12}",
                             f"eval.visualize_every={steps // 3}", f"eval.every={steps // 2}",
                             "eval.clips=16", "eval.vis_clips=2", "checkpoint.every=0"])
        t = time.perf_counter()
        result = tr.fit()
        wall = time.perf_counter() - t
        lines = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
        sps = [(r["step"], r["samples_per_s"]) for r in lines if "samples_per_s" in r]
        grids = sorted((tr.run_dir / "samples").glob("step_*.png"))
        if os.environ.get("OUT"):
            for g in grids:
                shutil.copy(g, Path(os.environ["OUT"]) / f"fit_reduce_overhead_{g.name}")
        emit(B, "fit_reduce_overhead", batch=big, steps=steps, wall_s=wall, samples_per_s_by_step=sps,
             samples_per_s_last=sps[-1][1] if sps else None, grids=[g.name for g in grids],
             eval_psnr=(result or {}).get("psnr"), **gpu_mem_gib(),
             note="samples/s per log interval; intervals after a grid or evaluation include it")
        del tr
        gc.collect()

    # in the order of what is left to learn: the NHWC GroupNorm (off by default until measured) alone and with the
    # sub-pixel up blocks at twice the batch; data loading under CUDA graphs; the real loop under CUDA graphs with
    # compiled sampling; the largest batch; then the same-run baselines of earlier switches: the sub-pixel up blocks
    # (fewer FLOPs for the same function), diffusers' NCHW shortcut inputs, NCHW (inductor picks the conv layouts
    # itself), CUDA graphs on the fixed batch, attention heads of 64 channels instead of 32
    parts = {
        "compiled": compiled,
        "compiled_nhwc_group_norm": lambda: block_variant("compiled_nhwc_group_norm", ["speed.nhwc_group_norm=true"],
                                                          big),
        "compiled_512_nhwc_group_norm_fused_upsample": lambda: block_variant(
            "compiled_512_nhwc_group_norm_fused_upsample", ["speed.nhwc_group_norm=true", "speed.fuse_upsample=true"],
            2 * big),
        "loader_reduce_overhead": lambda: loader("loader_reduce_overhead", ["speed.compile_mode=reduce-overhead"]),
        "fit_reduce_overhead": fit_reduce_overhead,
        "max_batch": max_batch_eager,
        "compiled_fused_upsample": lambda: block_variant("compiled_fused_upsample", ["speed.fuse_upsample=true"], big),
        "compiled_512_fused_upsample": lambda: block_variant("compiled_512_fused_upsample",
                                                             ["speed.fuse_upsample=true"], 2 * big),
        "compiled_diffusers_layouts": lambda: block_variant("compiled_diffusers_layouts",
                                                            ["speed.nhwc_shortcuts=false"], big),
        "compiled_512": lambda: block_variant("compiled_512", [], 2 * big),
        "compiled_nchw": lambda: block_variant("compiled_nchw", ["speed.channels_last=false"], big),
        "compiled_reduce_overhead": lambda: block_variant("compiled_reduce_overhead",
                                                          ["speed.compile_mode=reduce-overhead"], big),
        "compiled_head_dim_64": lambda: block_variant("compiled_head_dim_64", ["unet.attention_head_dim=64"], big),
        "grad_checkpointing": lambda: grad_checkpointing(args, big, flops, peak),
        "compiled_64": lambda: compiled_small(args, small, iters, flops, peak),
    }
    quick_parts = list(parts)[:11]  # --quick leaves out the rest
    if args.list:
        print("\n".join(parts))
        return
    chosen = [v for v in args.variants.split(",") if v] or (quick_parts if args.quick else list(parts))
    unknown = [v for v in chosen if v not in parts]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; one of {list(parts)}")

    emit_env(B)
    torch._dynamo.config.automatic_dynamic_shapes = False  # a new batch size compiles a static graph, as in training
    peak = peak_matmul_tflops()
    emit(B, "peak_bf16_matmul", tflops=peak, note="8192^3 torch.matmul on random bf16, median of 30")

    # ---- baselines: naive (fp32 VAE encoder on all 8 frames every step + fp32 UNet) and eager bf16 on the cache
    naive = build(args, "naive", NAIVE + [f"train.batch_size={small}"])
    flops, enc_flops = flops_per_sample(naive)
    frames = naive.cfg.data.window_frames
    emit(B, "flops", gflop_per_sample_unet_fwd_bwd=flops / 1e9, gflop_per_frame_vae_encoder=enc_flops / 1e9,
         params_m=sum(p.numel() for p in naive.unet.parameters()) / 1e6)
    if not args.skip_naive:
        measure(naive, "naive_fp32_encode_every_step", small, 1, 3 if tiny else 5, flops + frames * enc_flops, peak,
                note="FLOPs/MFU here count the UNet step and the VAE encoder on every window frame")
    del naive
    gc.collect()
    if not args.quick and not args.variants:
        eager_baselines(args, big, small, iters, flops, peak)

    for i, name in enumerate(chosen):
        if i > 0 and elapsed_s() > args.budget_s:
            emit(B, "budget_spent", skipped=chosen[i:], elapsed_s=elapsed_s())
            break
        parts[name]()
    emit(B, "done", elapsed_s=elapsed_s())


def eager_baselines(args, big: int, small: int, iters: int, flops: float, peak: float) -> None:
    """The issue's cached-latent baseline (eager bf16, NCHW) and eager channels_last, cuDNN autotuning off and on."""
    eager = build(args, "eager", CACHED + BASELINE + [f"train.batch_size={big}"])
    measure(eager, "eager_bf16_nchw", small, 3, iters, flops, peak, note="the issue's cached-latent baseline")
    torch.backends.cudnn.benchmark = True
    measure(eager, "eager_bf16_nchw_cudnn_benchmark", small, 3, iters, flops, peak)
    del eager
    gc.collect()
    eager = build(args, "eager_cl", CACHED + [f"train.batch_size={big}"])  # channels_last + cudnn benchmark on
    measure(eager, "eager_bf16_channels_last", small, 3, iters, flops, peak)
    measure(eager, "eager_bf16_channels_last", big, 3, iters, flops, peak)
    del eager
    gc.collect()


def grad_checkpointing(args, big: int, flops: float, peak: float) -> None:
    if torch.cuda.is_available():
        tr = build(args, "memory_gc", CACHED + [f"train.batch_size={big}", "unet.gradient_checkpointing=true"])
        measure(tr, "eager_channels_last_grad_checkpointing", big, 2, 10, flops, peak)
        max_batch(tr, "max_batch_eager_channels_last_grad_checkpointing", 1024, 256)
        del tr
        gc.collect()


def compiled_small(args, small: int, iters: int, flops: float, peak: float) -> None:
    tr = build(args, "compiled_small", CACHED + ["speed.compile=true", f"train.batch_size={small}"])
    measure(tr, "compiled_channels_last", small, 3, iters, flops, peak, compile_mode="default")
    del tr
    gc.collect()


if __name__ == "__main__":
    main()

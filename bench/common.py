"""Shared pieces of the benchmarks: the reference workload's config, a random SD-VAE, timing, JSON lines.

Every measurement is one JSON line on stdout (and appended to $OUT/results.jsonl when OUT is set), with the card
named in it. Timings use CUDA events after warm-up; a result is the median over many steps.
`--tiny` swaps in 32x32 frames, a tiny VAE and a tiny UNet so that a script can be smoke-tested on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import load_config  # noqa: E402

REFERENCE_CONFIG = ROOT / "configs" / "config_video_prediction.yaml"
# stabilityai/sd-vae-ft-mse's architecture (its config.json); weights are random: they cannot be fetched here,
# and speed does not depend on their values.
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16, layers_per_block=1)
TINY_OVERRIDES = ["data.height=32", "data.width=32",
                  "unet.block_out_channels=[32, 64]", "unet.attention=[false, true]", "unet.attention_head_dim=16",
                  "unet.norm_num_groups=16", "vae.chunk_size=8"]

_T0 = time.perf_counter()


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 32x32 frames, tiny VAE and UNet, few steps")
    p.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/vp_bench"), help="scratch folder")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the optional variants once this is spent")
    if extra:
        extra(p)
    args = p.parse_args()
    if args.tiny and not torch.cuda.is_available():
        _trace_only_compile()
    return args


def _trace_only_compile() -> None:
    """CPU smoke tests only: torch.compile traces with dynamo but generates no code (inductor's C++ build of a
    UNet's backward takes many minutes on a small CPU). Timings of a --tiny run on CPU mean nothing anyway."""
    real = torch.compile

    def compile_eager(model=None, **kw):
        kw.update(backend="eager", mode=None)
        return real(model, **kw) if model is not None else real(**kw)

    torch.compile = compile_eager
    torch.nn.Module.compile = lambda self, *a, **kw: setattr(self, "_compiled_call_impl",
                                                             real(self._call_impl, backend="eager"))


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def emit(bench: str, name: str, **fields) -> dict:
    """One measurement as one JSON line (stdout and $OUT/results.jsonl)."""
    rec = {"bench": bench, "name": name, "card": card(), **fields}
    line = json.dumps(rec, default=lambda v: round(v, 4) if isinstance(v, float) else str(v))
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "results.jsonl", "a") as f:
            f.write(line + "\n")
    return rec


def emit_env(bench: str) -> None:
    import diffusers
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    emit(bench, "env", torch=torch.__version__, diffusers=diffusers.__version__, cuda=torch.version.cuda,
         cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count(),
         gpu_mem_gib=props.total_memory / 2 ** 30 if props else None,
         sms=props.multi_processor_count if props else None)


def elapsed_s() -> float:
    return time.perf_counter() - _T0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_each(fn, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls after `warmup` calls: CUDA events on GPU, a host clock on CPU."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return times


def time_block(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call over `iters` back-to-back calls (one pair of events around all of them), so
    the host may run ahead of the GPU as it would in a loop without syncs."""
    for _ in range(warmup):
        fn()
    sync()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1e3 * (time.perf_counter() - t) / iters
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def stats(times: list[float]) -> dict:
    s = sorted(times)
    return {"median_ms": statistics.median(s), "p10_ms": s[len(s) // 10], "p90_ms": s[(9 * len(s)) // 10],
            "n": len(s)}


def peak_matmul_tflops(n: int = 8192, iters: int = 30) -> float:
    """The card's bf16 matrix rate as PyTorch reaches it (n^3 product on random data): the MFU denominator."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(time_each(lambda: a @ b, 5, iters))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def gpu_mem_gib() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30}


def reset_mem() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_vae_folder(folder: Path, tiny: bool) -> Path:
    """A random AutoencoderKL of the SD-VAE architecture (or a tiny one) saved in diffusers format, once."""
    from diffusers import AutoencoderKL
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)).save_pretrained(folder)
    return folder


def reference_config(args, overrides: list[str]):
    """configs/config_video_prediction.yaml with the scratch folders, wandb off, and `overrides` on top."""
    work = Path(args.work)
    base = [f"vae.pretrained={make_vae_folder(work / ('tiny_vae' if args.tiny else 'sd_vae'), args.tiny)}",
            f"logging.run_dir={work / 'runs'}", "logging.wandb.mode=disabled",
            f"cache.dir={work / 'latents'}"]
    return load_config(REFERENCE_CONFIG, base + (TINY_OVERRIDES if args.tiny else []) + overrides)

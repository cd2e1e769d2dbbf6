"""DDP scaling (goal 4) through the real entry point: `torchrun` of `train_video_pred.py` on N GPUs, then 1 GPU,
at the same per-GPU batch, on a synthetic world at 256x448 with the latent cache. samples/s comes from each run's
metrics.jsonl (the Trainer's own log: global batch x steps / wall time between log lines); the first intervals
(compilation, cuDNN autotuning, worker start) are left out.

    python bench/bench_ddp.py [--tiny] [--gpus N] [--batch-per-gpu 256] [--steps 60] [--set key=value ...]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import REFERENCE_CONFIG, ROOT, emit, emit_env, make_vae_folder, parse_args  # noqa: E402

B = "ddp"


def extra(p):
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--batch-per-gpu", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--skip", type=int, default=2, help="first log intervals left out (compile, warm-up)")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides for both runs")
    p.add_argument("--clips", type=int, default=12, help="synthetic clips of the world (256x448)")
    p.add_argument("--frames", type=int, default=160, help="frames per synthetic clip")
    p.add_argument("--variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="another N-GPU run with these overrides (repeatable), each with its own scaling line")
    p.add_argument("--profile-at", type=int, default=0,
                   help="profile steps [N, N+5) of every run on every rank (profile.at); the summaries are "
                        "printed and rank 0's trace is copied to $OUT/profile/<run>/")
    p.add_argument("--variant-reference", action="store_true",
                   help="give each --variant its own 1-GPU run with the same overrides (exact scaling per variant)")
    p.add_argument("--only-multi", action="store_true",
                   help="skip the 1-GPU run (its number must then come from another run: say so)")


def run(args, gpus: int, name: str, extra: list[str] = ()) -> dict:
    work = Path(args.work)
    tiny = args.tiny
    h, w, clips, frames = (32, 32, 4, 24) if tiny else (256, 448, args.clips, args.frames)
    overrides = [
        f"data.root={work / f'ddp_world_{h}x{w}'}", "data.synthetic.enabled=true", f"data.synthetic.height={h}",
        f"data.synthetic.width={w}", f"data.synthetic.num_clips={clips}", f"data.synthetic.frames_per_clip={frames}",
        f"data.height={h}", f"data.width={w}", "data.val_fraction=0.1", f"data.num_workers={0 if tiny else 8}",
        f"vae.pretrained={make_vae_folder(work / ('tiny_vae' if tiny else 'sd_vae'), tiny)}", "vae.dtype=bf16",
        f"train.batch_size={gpus * args.batch_per_gpu}", f"train.max_steps={args.steps}", "optim.warmup_steps=0",
        f"train.log_every={args.log_every}", "eval.visualize_every=0", "eval.every=0", "checkpoint.every=0",
        "eval.vis_clips=0", "eval.clips=1", "eval.steps=2",
        "speed.sampler_compile=false",  # the final evaluation is not timed: compiling the sampler would cost a minute
        f"cache.dir={work / 'ddp_latents'}",
        f"logging.run_dir={work / 'ddp_runs'}", f"logging.name={name}", "logging.wandb.mode=disabled",
        f"profile.at={args.profile_at}",
    ] + (["unet.block_out_channels=[32, 64]", "unet.attention=[false, true]", "unet.attention_head_dim=16",
          "unet.norm_num_groups=16"] if tiny else []) + args.set + list(extra)
    script = [str(ROOT / "train_video_pred.py"), "--config", str(REFERENCE_CONFIG), "--set", *overrides]
    if gpus == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if gpus == 1 and torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = "0"
    shutil.rmtree(work / "ddp_runs" / name, ignore_errors=True)  # a run of the same name would resume, not restart
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        emit(B, f"{name}_failed", gpus=gpus, rc=proc.returncode, stderr=proc.stderr[-3000:])
        return {}
    lines = [json.loads(x) for x in (work / "ddp_runs" / name / "metrics.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in lines if "samples_per_s" in r]
    kept = sps[args.skip:] or sps
    rec = emit(B, name, gpus=gpus, global_batch=gpus * args.batch_per_gpu, batch_per_gpu=args.batch_per_gpu,
               steps=args.steps, samples_per_s_median=statistics.median(kept), samples_per_s_all=sps,
               per_gpu_samples_per_s=statistics.median(kept) / gpus, wall_s=wall,
               final_loss=next((r["loss"] for r in reversed(lines) if "loss" in r), None),
               overrides=args.set + list(extra))
    profiles = sorted((work / "ddp_runs" / name / "profile").glob("rank*.json"))
    for path in profiles:
        emit(B, f"{name}_profile", gpus=gpus, **{k: v for k, v in json.loads(path.read_text()).items() if k != "top"})
    if profiles and os.environ.get("OUT"):
        dest = Path(os.environ["OUT"]) / "profile" / name
        dest.mkdir(parents=True, exist_ok=True)
        for path in profiles:
            shutil.copy(path, dest)
        shutil.copy(profiles[0].with_suffix(".trace.json.gz"), dest)
    return rec


def main() -> None:
    args = parse_args(__doc__, extra)
    emit_env(B)
    if args.gpus < 2:
        emit(B, "skipped", reason=f"{args.gpus} GPU(s) visible; DDP scaling needs 2 or more")
        return
    # the N-GPU run first (it pays for the world and the cache, reused by the others), then the 1-GPU reference,
    # then the variants: a call cut short keeps a scaling number
    many = run(args, args.gpus, f"ddp_{args.gpus}gpu")
    one = run(args, 1, "ddp_1gpu") if not args.only_multi else {}
    scaling(args, one, many)
    for i, v in enumerate(args.variant):
        rec = run(args, args.gpus, f"ddp_{args.gpus}gpu_v{i}", v.split())
        ref = run(args, 1, f"ddp_1gpu_v{i}", v.split()) if args.variant_reference and rec else one
        scaling(args, ref, rec)


def scaling(args, one: dict, rec: dict) -> None:
    if one and rec:
        eff = rec["samples_per_s_median"] / (args.gpus * one["samples_per_s_median"])
        emit(B, "scaling", gpus=args.gpus, batch_per_gpu=args.batch_per_gpu, efficiency=eff,
             samples_per_s_1gpu=one["samples_per_s_median"], samples_per_s_ngpu=rec["samples_per_s_median"],
             overrides=rec["overrides"])


if __name__ == "__main__":
    main()

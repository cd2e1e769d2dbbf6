#!/usr/bin/env python
r"""Train a diffusers AutoencoderKL (from scratch or from --init) on clips of frames; save it with its measured scale.

    python tools/train_vae.py --synthetic --synthetic-pan both --height 64 --width 64 --out runs/vae_synthetic
    python tools/train_vae.py --data-root /data/clips --frame-glob "*.jpg" --height 256 --width 256 \
        --init stabilityai/sd-vae-ft-mse --lr 1e-5 --steps 20000 --out runs/vae_ft

Stages: data (discover clips, scan every frame as the trainer does, split by clip) -> model (new from the architecture flags, or --init) -> fit (L1/L2
reconstruction + KL, AdamW) -> measure the std of the raw posterior-mean latents on training frames and set
scaling_factor = 1/std (shift_factor = their mean with --shift) -> save_pretrained -> reload the saved folder
through model.vae.FrozenVAE and report what the project will see: held-out PSNR and scaled-latent statistics
(metrics.json). The saved folder loads with AutoencoderKL.from_pretrained exactly like stabilityai/sd-vae-ft-mse.

Bad frames (truncated, unreadable, wrong mode) are found by the scan before training (data/scan.py): --bad-data
error stops there listing them, skip trains without them. Every --save-every steps, and on SIGTERM or Ctrl-C (a
second Ctrl-C exits at once), <out>/checkpoints/ckpt_N.pt is written atomically (model/checkpoint.py);
--resume latest continues it with the same batches and noise as an uninterrupted run.
exit codes: 0 done; 2 bad arguments, bad data or a checkpoint that does not resume; 143 / 130 saved and stopped by
SIGTERM / SIGINT.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repo root on path

from configs.schema import DataConfig, SyntheticConfig  # noqa: E402
from data import prepare_clips, read_clip_frames, spread, to_uint8_hwc, to_unit  # noqa: E402
from data.clips import Clip  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.workers import ignore_stop_signals  # noqa: E402
from model.checkpoint import CheckpointError, resolve_resume, save_checkpoint  # noqa: E402
from model.vae import FrozenVAE, load_diffusers_vae  # noqa: E402
from training.distributed import resolve_device  # noqa: E402
from training.evaluation import frame_psnr  # noqa: E402

_SYN = SyntheticConfig()
_ARCH_DEFAULTS = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
                  "norm_num_groups": 32}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=_HelpFormatter,
        epilog="No perceptual (LPIPS) or adversarial loss: their pretrained weights are not bundled and nothing here "
               "downloads. Deterministic on CPU for the same --seed and --threads; CUDA runs are close, not bit-exact.")
    g = p.add_argument_group("data (clips are split into train/val by clip, never by frame)")
    g.add_argument("--data-root", action="append", default=None,
                   help="folder of clips: root/<clip>/<frames> or video files root/<clip>.mp4; repeat for several. "
                        "With --synthetic: where the world is written (default data_cache/vae_synthetic)")
    g.add_argument("--frame-glob", default="*", help="frames inside a clip folder, e.g. 'camera/rgb_front/*.jpg'")
    g.add_argument("--height", type=int, default=256, help="frame height fed to the VAE, pixels")
    g.add_argument("--width", type=int, default=256, help="frame width, pixels")
    g.add_argument("--resize-mode", default="crop", choices=("crop", "stretch"),
                   help="crop: resize to cover, centre-crop; stretch: resize each axis")
    g.add_argument("--frame-stride", type=int, default=1, help="use every k-th frame of each clip; 1 = all frames")
    g.add_argument("--val-fraction", type=float, default=0.1, help="fraction of clips held out; 0 = none")
    g.add_argument("--split-seed", type=int, default=0, help="the clip split is a pure function of it and clip names")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes; 0 = main process")
    g.add_argument("--bad-data", default="error", choices=("error", "skip"),
                   help="frames the scan finds bad (truncated, unreadable): error = stop before training listing "
                        "them; skip = train without them (data.bad_data)")
    g.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="with --bad-data skip, stop if more than this fraction of frames is bad")
    g = p.add_argument_group("synthetic world (data/synthetic.py; rendered at --height x --width)")
    g.add_argument("--synthetic", action="store_true", help="train on the synthetic world instead of real clips")
    g.add_argument("--synthetic-clips", type=int, default=_SYN.num_clips, help="clips per world")
    g.add_argument("--synthetic-frames", type=int, default=_SYN.frames_per_clip, help="frames per clip")
    g.add_argument("--synthetic-objects", type=int, default=_SYN.num_objects, help="objects per clip")
    g.add_argument("--synthetic-speed", type=float, default=_SYN.speed, help="max object speed, pixels per frame")
    g.add_argument("--synthetic-pan", default="off", choices=("off", "on", "both"),
                   help="camera pan by an action: off, on, or both (two worlds, <root>/still and <root>/pan)")
    g.add_argument("--synthetic-pan-speed", type=float, default=_SYN.pan_speed, help="pixels per frame at action 1")
    g.add_argument("--synthetic-seed", type=int, default=_SYN.seed, help="the world is a pure function of it")
    g = p.add_argument_group("model (architecture flags only without --init)")
    g.add_argument("--init", default=None, help="fine-tune this AutoencoderKL (folder or hub id) instead of a new one")
    g.add_argument("--init-subfolder", default="", help="e.g. 'vae' inside a full pipeline folder")
    g.add_argument("--block-out-channels", type=int, nargs="+", default=argparse.SUPPRESS,
                   help=f"channels per level; downsampling = 2^(levels-1) (default {_ARCH_DEFAULTS['block_out_channels']})")
    g.add_argument("--layers-per-block", type=int, default=argparse.SUPPRESS,
                   help=f"ResNet blocks per encoder level (decoder: +1) (default {_ARCH_DEFAULTS['layers_per_block']})")
    g.add_argument("--latent-channels", type=int, default=argparse.SUPPRESS,
                   help=f"latent channels (default {_ARCH_DEFAULTS['latent_channels']})")
    g.add_argument("--norm-num-groups", type=int, default=argparse.SUPPRESS,
                   help=f"GroupNorm groups; must divide every level's channels (default {_ARCH_DEFAULTS['norm_num_groups']})")
    g.add_argument("--no-mid-attention", action="store_true",
                   help="drop the self-attention of the mid blocks (cheaper; converged faster on the synthetic world)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=16, help="frames per step")
    g.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (fine-tuning: ~1e-5)")
    g.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"),
                   help="after warm-up: cosine to 0 at --steps, or constant")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear LR warm-up, steps; 0 = off")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay; 0 = off")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = off")
    g.add_argument("--rec-loss", default="l1", choices=("l1", "l2"),
                   help="pixel reconstruction loss (l2 optimises PSNR directly; the bundled VAE used it)")
    g.add_argument("--kl-weight", type=float, default=1e-6,
                   help="KL weight relative to the reconstruction loss, both summed per image as in the LDM "
                        "autoencoder (Rombach et al. 2022); 0 = off")
    g.add_argument("--seed", type=int, default=0, help="model init, batch order and posterior samples")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    g.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (ignored on CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder: config.json + safetensors, metrics.json, PNGs")
    g.add_argument("--fp16", action="store_true", help="save fp16 weights (half the size)")
    g.add_argument("--shift", action="store_true",
                   help="also set shift_factor = mean of the raw latents (else shift_factor = None)")
    g.add_argument("--scale-frames", type=int, default=1024, help="training frames the latent std is measured on")
    g.add_argument("--val-frames", type=int, default=256, help="held-out frames PSNR is measured on; 0 = all")
    g.add_argument("--sample-every", type=int, default=500,
                   help="write samples/step_N.png (top: input, bottom: reconstruction) and val PSNR; 0 = end only")
    g.add_argument("--sample-count", type=int, default=8, help="frames in each sample grid")
    g = p.add_argument_group("checkpoints (<out>/checkpoints, for resuming; the VAE itself is saved at the end)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps; 0 = only on SIGTERM/SIGINT")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    g.add_argument("--resume", metavar="latest|PATH",
                   help="continue from <out>/checkpoints' newest valid checkpoint (latest) or a checkpoint file; "
                        "with latest and none yet, start from step 0")
    args = p.parse_args(argv)

    problems = []
    arch = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
    if args.init:
        given = [f"--{a.replace('_', '-')}" for a in arch if hasattr(args, a)]
        if given or args.no_mid_attention:
            problems.append(f"{' '.join(given + ['--no-mid-attention'] * args.no_mid_attention)}: "
                            "the architecture comes from --init")
    else:
        for a in arch:
            if not hasattr(args, a):
                setattr(args, a, _ARCH_DEFAULTS[a])
        bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
        if bad:
            problems.append(f"--norm-num-groups {args.norm_num_groups} does not divide --block-out-channels {bad}")
        factor = 2 ** (len(args.block_out_channels) - 1)
        if args.height % factor or args.width % factor:
            problems.append(f"--height/--width {args.height}x{args.width} must be multiples of the downsampling "
                            f"factor {factor}")
    if not args.synthetic and not args.data_root:
        problems.append("--data-root is required without --synthetic")
    for name in ("steps", "batch_size", "frame_stride", "scale_frames", "sample_count", "keep_last"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup_steps", "num_workers", "val_frames", "sample_every", "threads", "save_every"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    if args.lr <= 0 or args.kl_weight < 0 or args.grad_clip < 0:
        problems.append("--lr must be > 0, --kl-weight and --grad-clip >= 0")
    for cfg in data_configs(args) if not problems else []:
        cfg.validate(problems, "data")  # the schema's checks, e.g. --height/--width multiples of 8
    if problems:
        p.error("\n  ".join(["invalid arguments:"] + problems))
    return args


# ---------------------------------------------------------------------------------------------------- data
def data_configs(args) -> list[DataConfig]:
    """One DataConfig per source: each --data-root, or each synthetic world (still and/or pan)."""
    base = dict(frame_glob=args.frame_glob, height=args.height, width=args.width, resize_mode=args.resize_mode,
                val_fraction=args.val_fraction, split_seed=args.split_seed, t_past=1, t_future=1,
                bad_data=args.bad_data, max_bad_fraction=args.max_bad_fraction)
    if not args.synthetic:
        return [DataConfig(root=root, **base) for root in args.data_root]
    root = Path(args.data_root[0] if args.data_root else "data_cache/vae_synthetic")
    pans = {"off": [False], "on": [True], "both": [False, True]}[args.synthetic_pan]
    return [DataConfig(root=str(root / ("pan" if pan else "still")), **base, synthetic=SyntheticConfig(
        enabled=True, num_clips=args.synthetic_clips, frames_per_clip=args.synthetic_frames, height=args.height,
        width=args.width, num_objects=args.synthetic_objects, speed=args.synthetic_speed, action_pan=pan,
        pan_speed=args.synthetic_pan_speed, seed=args.synthetic_seed)) for pan in pans]


def gather_clips(cfgs: list[DataConfig]) -> tuple[list[Clip], list[Clip]]:
    """(train, val) clips over all sources, each scanned (DataError listing every bad frame under --bad-data error)
    and split by clip; names prefixed by source when several."""
    train, val = [], []
    for k, cfg in enumerate(cfgs):
        t, v, report = prepare_clips(cfg, scan=True)
        if report is not None and not report.ok:
            print(f"warning: training without the bad data (--bad-data skip): {report}")
        if len(cfgs) > 1:
            t, v = ([dataclasses.replace(c, name=f"{k}/{c.name}", source=f"{k}/{c.source_name}") for c in s]
                    for s in (t, v))
        train += t
        val += v
    return train, val


def frame_items(clips: list[Clip], stride: int) -> list[tuple[Clip, int]]:
    return [(clip, i) for clip in clips for i in range(0, clip.num_frames, stride)]


def spread_items(items: list, n: int) -> list:
    """n items evenly spaced over the list (all of them when n = 0 or n >= len), picked by data.spread."""
    return [items[i] for i in spread(len(items), n or len(items))]


class FrameDataset(Dataset):
    """Single frames (3, H, W) in [-1, 1] of (clip, frame index) items."""

    def __init__(self, items: list[tuple[Clip, int]], cfg: DataConfig):
        self.items, self.cfg = items, cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        clip, i = self.items[index]
        return read_clip_frames(clip, [i], self.cfg)[0]


def batches(items, cfg, batch_size: int, num_workers: int):
    """Frames of `items` in order, as (b, 3, H, W) batches."""
    return DataLoader(FrameDataset(items, cfg), batch_size=batch_size, num_workers=num_workers,
                      worker_init_fn=ignore_stop_signals)


class EpochBatches(Sampler):
    """Endless batches of item indices, each epoch a permutation drawn from (seed, epoch): batch k of a run is a
    pure function of k, so a resumed run sees the batches the uninterrupted one would have seen."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self):
        per_epoch = math.ceil(self.n / self.batch_size)
        epoch, b = divmod(self.start, per_epoch)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            for i in range(b, per_epoch):
                yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            epoch, b = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------- checkpoints
RESUME_MUST_MATCH = ("height", "width", "resize_mode", "frame_stride", "batch_size", "seed", "steps", "lr",
                     "lr_schedule", "warmup_steps", "init", "synthetic", "data_root", "frame_glob", "val_fraction",
                     "split_seed", "bad_data")


def fail(message: str):
    """A user error: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Stop:
    """SIGTERM / SIGINT ask for a save and a stop at the end of the step; a second SIGINT exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: no save
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping")

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def training_state(step: int, vae, opt, sched, posterior_gen, history, recent, train_s: float, args) -> dict:
    """Everything a resume needs, as tensors and plain data (model/checkpoint.py loads with weights_only=True)."""
    return {"step": step, "vae": vae.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "posterior": posterior_gen.get_state()},
            "history": history, "recent": list(recent), "train_s": train_s,
            "args": {k: v for k, v in vars(args).items() if k in RESUME_MUST_MATCH}}


def find_resume(args, folder: Path) -> tuple[Path, dict] | None:
    """The checkpoint --resume names, checked against the arguments; SystemExit(2) naming the problem."""
    try:
        found = resolve_resume(folder, args.resume)
    except CheckpointError as e:
        fail(f"--resume {args.resume}: {e}")
    if found is None:
        print(f"--resume latest: no checkpoint in {folder} yet; starting from step 0")
        return None
    path, state = found
    if not isinstance(state, dict) or "vae" not in state or "step" not in state:
        fail(f"--resume: {path} is not a checkpoint of tools/train_vae.py (no 'vae' / 'step')")
    saved = state.get("args", {})
    changed = [f"--{k.replace('_', '-')}: {saved[k]!r} -> {getattr(args, k)!r}" for k in RESUME_MUST_MATCH
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        fail(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); resume with the same "
             "ones, or start a new --out")
    return path, state


# ---------------------------------------------------------------------------------------------------- model
def build_vae(args) -> AutoencoderKL:
    if args.init:
        vae = load_diffusers_vae(args.init, args.init_subfolder, "fp32")
        if not isinstance(vae, AutoencoderKL):
            raise SystemExit(f"--init {args.init}: {type(vae).__name__} has no KL posterior; only AutoencoderKL trains here")
        return vae
    levels = len(args.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(args.block_out_channels),
                         layers_per_block=args.layers_per_block, latent_channels=args.latent_channels,
                         norm_num_groups=args.norm_num_groups, sample_size=max(args.height, args.width),
                         mid_block_add_attention=not args.no_mid_attention)


def psnr(frames: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB of (b, 3, H, W) frames in [-1, 1], measured in [0, 1] as in the model's evaluation."""
    return frame_psnr(to_unit(frames.float()), to_unit(target.float()))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, frames: torch.Tensor) -> torch.Tensor:
    """Posterior-mean round trip (what the project uses), clamped to [-1, 1]."""
    return vae.decode(vae.encode(frames).latent_dist.mode()).sample.clamp(-1, 1)


def save_grid(path: Path, inputs: torch.Tensor, recons: torch.Tensor) -> None:
    """PNG: top row the input frames, bottom row their reconstructions."""
    rows = [np.concatenate(list(to_uint8_hwc(x)), axis=1) for x in (inputs, recons)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


@torch.no_grad()
def evaluate_psnr(vae, items, cfg, args, device) -> float:
    """Mean per-frame PSNR of the posterior-mean round trip over `items`, in dB."""
    values = [psnr(reconstruct(vae, x.to(device)).cpu(), x) for x in batches(items, cfg, args.batch_size, args.num_workers)]
    return float(torch.cat(values).mean())


@torch.no_grad()
def latent_moments(encode, items, cfg, args, device) -> tuple[float, float]:
    """(mean, std) over every element of encode(frames) for the frames of `items` (float64 sums)."""
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches(items, cfg, args.batch_size, args.num_workers):
        z = encode(x.to(device)).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)  # metrics.json records the device used
    device = torch.device(args.device)

    # 1. data: clips split by clip; fixed held-out frames for PSNR and sample grids
    cfgs = data_configs(args)
    read_cfg = cfgs[0]  # reading needs only height, width and resize_mode, shared by all sources
    try:
        train_clips, val_clips = gather_clips(cfgs)
    except DataError as e:
        fail(f"{e}\n(here: --bad-data skip)")
    train_items = frame_items(train_clips, args.frame_stride)
    val_items = frame_items(val_clips, args.frame_stride)
    if not val_items:
        print("warning: no validation clips (one clip, or --val-fraction 0): PSNR below is on TRAINING frames")
    held_out = spread_items(val_items or train_items, args.val_frames)
    sample_frames = torch.stack([FrameDataset(held_out, read_cfg)[i] for i in
                                 spread(len(held_out), args.sample_count)])
    print(f"data: {len(train_clips)} train clips ({len(train_items)} frames), {len(val_clips)} val clips "
          f"({len(val_items)} frames), {args.height}x{args.width}")
    ckpt_dir = out / "checkpoints"
    resume = find_resume(args, ckpt_dir) if args.resume else None
    first = resume[1]["step"] + 1 if resume else 1
    loader = DataLoader(FrameDataset(train_items, read_cfg), batch_sampler=EpochBatches(
        len(train_items), args.batch_size, args.seed, start=first - 1), num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals)

    # 2. model and optimizer
    vae = build_vae(args).to(device).train()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    print(f"model: AutoencoderKL {list(vae.config.block_out_channels)}, {vae.config.latent_channels} latent channels, "
          f"downsampling {factor}, {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = get_scheduler("cosine" if args.lr_schedule == "cosine" else "constant_with_warmup", opt,
                          num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    posterior_gen = torch.Generator(device).manual_seed(args.seed + 1)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    history, recent, train_s = [], deque(maxlen=50), 0.0
    if resume:
        path, state = resume
        try:
            vae.load_state_dict(state["vae"])
        except RuntimeError as e:
            fail(f"--resume: {path} holds another architecture: {str(e).splitlines()[0]}")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        posterior_gen.set_state(state["rng"]["posterior"])
        history, train_s = state["history"], state["train_s"]
        recent.extend(state["recent"])
        print(f"resumed from {path} at step {state['step']}")

    def save(step: int) -> Path:
        return save_checkpoint(training_state(step, vae, opt, sched, posterior_gen, history, recent,
                                              train_s + time.time() - start, args),
                               ckpt_dir, step, keep_last=args.keep_last, protect=(resume[0],) if resume else ())

    # 3. fit: reconstruction of a posterior sample + KL, weighted against each other as in LDM (both per pixel here)
    start = time.time()
    stop = Stop()
    bar = tqdm(range(first, args.steps + 1), initial=first - 1, total=args.steps, desc="train vae", dynamic_ncols=True)
    data_iter = iter(loader)
    for step in bar:
        x = next(data_iter).to(device)
        with autocast:
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=posterior_gen)).sample
        recon = recon.float()
        rec = (recon - x).abs() if args.rec_loss == "l1" else (recon - x).square()
        rec = rec.mean()
        kl = posterior.kl().float().mean() / x[0].numel()  # per-pixel units, so kl_weight means what it does in LDM
        loss = rec + args.kl_weight * kl
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step}: non-finite loss {loss.item()} (lower --lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        recent.append(psnr(recon.detach().clamp(-1, 1), x).mean().item())
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.1f}", psnr=f"{np.mean(recent):.2f}")
        if (args.sample_every and step % args.sample_every == 0) or step == args.steps:
            vae.eval()
            val_psnr = evaluate_psnr(vae, held_out, read_cfg, args, device)
            save_grid(out / "samples" / f"step_{step:06d}.png", sample_frames,
                      reconstruct(vae, sample_frames.to(device)).cpu())
            vae.train()
            history.append({"step": step, "train_psnr": float(np.mean(recent)), "val_psnr": val_psnr,
                            "loss": loss.item(), "kl": kl.item(), "elapsed_s": train_s + time.time() - start})
            tqdm.write(f"step {step}: held-out PSNR {val_psnr:.2f} dB (train, running: {np.mean(recent):.2f} dB)")
        if stop.signum is not None:
            bar.close()
            path = save(step)
            print(f"saved {path} at step {step}; continue with --resume latest", file=sys.stderr)
            stop.restore()
            raise SystemExit(128 + stop.signum)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            save(step)
    stop.restore()
    train_s += time.time() - start
    vae.eval()

    # 4. measure the latent scale on training frames (DESIGN cause 3: scaled latents of real data have std ~ 1)
    scale_items = spread_items(train_items, args.scale_frames)
    raw_mean, raw_std = latent_moments(lambda x: vae.encode(x).latent_dist.mode(), scale_items, read_cfg, args, device)
    vae.register_to_config(scaling_factor=1.0 / raw_std, shift_factor=raw_mean if args.shift else None)
    if getattr(vae.config, "latents_mean", None) is not None or getattr(vae.config, "latents_std", None) is not None:
        vae.register_to_config(latents_mean=None, latents_std=None)  # per-channel stats of --init: stale now
    print(f"raw latents on {len(scale_items)} training frames: mean {raw_mean:.4f}, std {raw_std:.4f} -> "
          f"scaling_factor {1 / raw_std:.5f}, shift_factor {raw_mean if args.shift else None}")

    # 5. save in diffusers format (config.json + diffusion_pytorch_model.safetensors)
    vae = vae.cpu().half() if args.fp16 else vae.cpu()  # .half(), not .to(dtype): diffusers warns on the latter
    vae.save_pretrained(out, safe_serialization=True)

    # 6. reload through the project's wrapper: the numbers that count
    frozen = FrozenVAE(load_diffusers_vae(str(out)), dtype="fp32", chunk_size=args.batch_size, name=str(out)).to(device)
    encode = lambda x: frozen.encode(x[:, None])  # noqa: E731  (b, 3, H, W) -> (b, 1, C, h, w) scaled latents
    roundtrip = lambda x: frozen.decode(encode(x))[:, 0]  # noqa: E731
    train_lat = latent_moments(encode, scale_items, read_cfg, args, device)
    held_lat = latent_moments(encode, held_out, read_cfg, args, device)
    wrapper_psnr = float(torch.cat([psnr(roundtrip(x.to(device)).cpu(), x)
                                    for x in batches(held_out, read_cfg, args.batch_size, args.num_workers)]).mean())
    save_grid(out / "reconstructions.png", sample_frames, roundtrip(sample_frames.to(device)).cpu())
    h, w = args.height // frozen.downsample, args.width // frozen.downsample
    metrics = {
        "heldout_psnr_db": wrapper_psnr if val_items else None,  # saved VAE through FrozenVAE, posterior mean
        "train_frames_psnr_db": None if val_items else wrapper_psnr,
        "psnr_frames": len(held_out),
        "scaled_latent_mean_train": train_lat[0], "scaled_latent_std_train": train_lat[1],
        "scaled_latent_mean_heldout": held_lat[0], "scaled_latent_std_heldout": held_lat[1],
        "raw_latent_mean": raw_mean, "raw_latent_std": raw_std, "scale_frames": len(scale_items),
        "scaling_factor": frozen.scaling_factor, "shift_factor": raw_mean if args.shift else None,
        "latent_shape": [frozen.latent_channels, h, w], "downsample": frozen.downsample,
        "parameters": sum(p.numel() for p in frozen.parameters()), "weights_dtype": "fp16" if args.fp16 else "fp32",
        "train_clips": len(train_clips), "train_frames": len(train_items), "val_clips": len(val_clips),
        "val_frames": len(val_items), "steps": args.steps, "train_wall_s": round(train_s, 1),
        "history": history, "args": vars(args), "argv": sys.argv[1:] if argv is None else list(argv),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    label = "held-out" if val_items else "TRAINING-frame"
    print(f"trained {args.steps} steps in {train_s:.0f} s on {device}; saved {out} ({metrics['weights_dtype']})")
    print(f"through FrozenVAE: {label} PSNR {wrapper_psnr:.2f} dB on "
          f"{len(held_out)} frames; scaled latents mean {train_lat[0]:.3f} std {train_lat[1]:.3f} (train), "
          f"mean {held_lat[0]:.3f} std {held_lat[1]:.3f} ({label}); latents {metrics['latent_shape']} per frame")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, without a traceback
        sys.exit(130)

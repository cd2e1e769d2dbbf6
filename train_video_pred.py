"""Train a latent-diffusion video predictor.

    python train_video_pred.py --config configs/demo.yaml
    torchrun --nproc_per_node=4 train_video_pred.py --config configs/config_video_prediction.yaml \\
        --set data.root=/data/frames train.batch_size=128 [--resume latest]

One script for one process, torchrun on N GPUs and several nodes (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from configs import ConfigError, dump_config, load_config

EPILOG = """\
overrides: any config key as section.key=value (YAML value), after --set or bare, e.g.
  --set train.lr=2e-4 train.batch_size=32 data.root=/data/ped2 sampler.num_inference_steps=50
  vae.pretrained=stabilityai/sd-vae-ft-mse logging.wandb.mode=disabled
exit codes: 0 done; 1 error (the message names the rank and the cause); 143 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (continue with --resume latest).
The config reference is configs/schema.py: every key with its unit, default and how to turn it off."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (default: the schema's defaults)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more dotted overrides")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the run's newest valid checkpoint (latest) or from a checkpoint file; "
                        "'latest' with no checkpoint yet starts from step 0 (safe for torchrun --max-restarts)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    return p.parse_args(argv)


def find_resume(cfg, which: str) -> Path | None:
    """The checkpoint `--resume` names, verified and checked against the config's model shape; None = fresh start.

    Runs on every rank before any process group exists, so a bad resume (no valid checkpoint, a changed model shape)
    fails on every rank with the same message instead of after the group, the data scan and the latent cache."""
    import torch

    from model.unet import ConditionalUNet
    from training.checkpoint import resolve_resume

    if which == "latest" and not cfg.logging.name:
        raise ValueError("--resume latest needs logging.name (the run folder to continue)")
    found = resolve_resume(Path(cfg.logging.run_dir) / cfg.logging.name / "checkpoints", which)
    if found is None:
        return None
    path, state = found
    args = state.get("model_args") or {}
    vae_config = Path(cfg.vae.pretrained).expanduser() / cfg.vae.subfolder / "config.json"
    if vae_config.is_file() and args.get("latent_channels") is not None:  # a local VAE: its channels are known now
        try:
            channels = json.loads(vae_config.read_text()).get("latent_channels")
        except json.JSONDecodeError:
            channels = None  # the VAE loader reports it with its path
        if channels is not None and channels != args["latent_channels"]:
            raise ValueError(f"cannot resume from {path}: its UNet works on {args['latent_channels']}-channel "
                             f"latents but the VAE {cfg.vae.pretrained} has latent_channels={channels} "
                             f"(the checkpoint's VAE: {(state.get('vae') or {}).get('name')})")
    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = ConditionalUNet(cfg.unet, args.get("latent_channels", 4), cfg.data.t_past, cfg.data.t_future,
                               cfg.cond_dim)
    mine = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["unet"].items()}
    if mine != theirs:
        old = state.get("config") or {}
        changed = [f"{sec}.{k}: {old[sec][k]!r} -> {v!r}" for sec, keys in
                   (("unet", None), ("data", ("t_past", "t_future", "cond_keys")))
                   for k, v in vars(getattr(cfg, sec)).items()
                   if (keys is None or k in keys) and k in old.get(sec, {}) and old[sec][k] != v]
        diff = [f"{k}: {theirs.get(k)} -> {mine.get(k)}" for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)][:3]
        raise ValueError(f"cannot resume from {path}: the model's shape changed (checkpoint -> config): "
                         f"{'; '.join(changed) or 'see tensors'}; tensors e.g. {'; '.join(diff)}")
    return path


def main(argv=None) -> int:
    # ---- config: every problem reported before any process group exists, identically on every rank
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, [*args.set, *args.overrides])
        per_rank = cfg.train.batch_size / (world * cfg.train.grad_accum_steps)
        if per_rank != int(per_rank):
            raise ConfigError([f"train.batch_size: {cfg.train.batch_size} (global) is not divisible by "
                               f"{world} ranks x train.grad_accum_steps={cfg.train.grad_accum_steps}"],
                              args.config or "defaults")
    except (ConfigError, FileNotFoundError) as e:
        print(f"[rank {rank}] config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if rank == 0:
            print(dump_config(cfg), end="")
        return 0
    resume = args.resume
    if args.resume:
        from training.checkpoint import CheckpointError
        try:
            resume = str(find_resume(cfg, args.resume) or args.resume)  # the Trainer reloads exactly this file
        except (CheckpointError, ValueError) as e:
            print(f"[rank {rank}] resume error: {e}", file=sys.stderr)
            return 2

    # ---- distributed setup, run folder
    from training import distributed
    from video_prediction_trainer import EXIT_PREEMPTED, Preempted, Trainer, TrainingHalted
    info = distributed.setup(cfg.train.dist_timeout_s, args.device)
    try:
        name = cfg.logging.name or distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"), info)
        run_dir = Path(cfg.logging.run_dir) / name

        # ---- build and fit
        Trainer(cfg, info, run_dir, resume=resume).fit()
        return 0
    except Preempted as e:
        print(f"[rank {info.rank}] {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingHalted as e:
        print(f"[rank {info.rank}] training halted: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line naming the rank and the cause, then the traceback
        print(f"[rank {info.rank}] error: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())

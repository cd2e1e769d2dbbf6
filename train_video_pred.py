"""Train a latent-diffusion video predictor.

    python train_video_pred.py --config configs/demo.yaml
    torchrun --nproc_per_node=4 train_video_pred.py --config configs/config_video_prediction.yaml \\
        --set data.root=/data/frames train.batch_size=128 [--resume latest]

One script for one process, torchrun on N GPUs and several nodes (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from configs import Config, ConfigError, dump_config, load_config
from data import DataError, latent_cache, pipeline
from model import VideoPredictionDiffusion, checkpoint, performance
from model.checkpoint import CheckpointError
from model.export import ExportError
from model.loading import LoadError
from model.vae import VAEError, read_downsample
from training import distributed, tracking
from training import optim as optimization
from training.distributed import DistInfo
from training.resume import Resume, check_same_start, restore
from training.resume import share as share_resume
from training.resume import find as find_resume
from video_prediction_trainer import EXIT_INTERRUPTED, Preempted, Trainer, TrainingHalted, WriteFailed

# errors of the user's making (bad data, a VAE or checkpoint that does not load): one line naming the cause, exit 2;
# any other error is a bug or the machine's and keeps its traceback
USER_ERRORS = (DataError, VAEError, LoadError, ExportError)

EPILOG = """\
overrides: any config key as section.key=value (YAML value), after --set or bare, e.g.
  --set optim.lr=2e-4 train.batch_size=32 data.root=/data/ped2 sampler.num_inference_steps=50
  vae.pretrained=stabilityai/sd-vae-ft-mse logging.wandb.mode=disabled
exit codes: 0 done; 1 error (the message names the rank and the cause, then the traceback); 2 a config error,
bad data, a VAE or checkpoint that does not load, a refused resume or run folder (one line; --traceback for more); 143 / 130 stopped by SIGTERM or SIGUSR1 / Ctrl-C after saving a checkpoint (continue with --resume
latest; a second Ctrl-C stops at once, unsaved).
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
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run folder that holds an earlier one, deleting its checkpoints, "
                        "metrics, samples and eval tables (without it such a start is refused)")
    p.add_argument("--allow-objective-change", action="store_true",
                   help="resume although the config changes what is learnt (diffusion.*, data.frame_interval, "
                        "frame size, VAE); without it such a resume is refused")
    p.add_argument("--traceback", action="store_true",
                   help="print the traceback of expected errors too (bad config, data, VAE, checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in the folder, --overwrite deletes it: give one of them")
    return args


def frame_size_problem(cfg: Config, downsample: int | None) -> str | None:
    """Why data.height/width do not fit a VAE that downsamples `downsample`x and the UNet's levels (each but the
    last halves the latents), or None; None also when the VAE's factor is not known yet."""
    if downsample is None:
        return None
    levels = len(cfg.unet.block_out_channels)
    cell = downsample * 2 ** (levels - 1)
    bad = [f"data.{k}: {v}" for k, v in (("height", cfg.data.height), ("width", cfg.data.width)) if v % cell]
    if not bad:
        return None
    return (f"{', '.join(bad)} must be a multiple of {cell}: the VAE {cfg.vae.pretrained} downsamples {downsample}x "
            f"and the UNet's {levels} levels (unet.block_out_channels) halve the latents {levels - 1} more times")


def build(cfg: Config, info: DistInfo, run_dir: Path, resume: Resume | str | None = None,
          overwrite: bool = False) -> Trainer:
    """Every stage of a run's setup, in the order it happens, each a call into the module named for it; the Trainer
    receives the finished parts. `resume`: found by `resume.find` (or its `--resume` argument); `overwrite`: delete
    an earlier run's files in the run folder first."""
    tc = cfg.train
    say = distributed.printer(info)
    if isinstance(resume, str):
        resume = find_resume(cfg, resume)

    # ---- run folder (rank 0): an earlier run's files gone with --overwrite, no temp file of an interrupted save
    # (the folder itself is made by the tracking stage: a start that fails before leaves none behind)
    if info.is_main:
        if overwrite and (removed := tracking.clear_run_folder(run_dir)):
            say(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {run_dir}")
        if removed := checkpoint.clean_leftovers(run_dir / "checkpoints"):
            say(f"removed {len(removed)} leftover temp file(s) of an interrupted save")
    if overwrite and info.enabled:  # the same folder on another node's own disk: cleared there (after rank 0's, so
        distributed.barrier(info)   # a shared one is cleared once), or a later --resume latest would refuse it
        if info.local_rank == 0 and not info.is_main and (removed := tracking.clear_run_folder(run_dir)):
            print(f"[rank {info.rank}] --overwrite: deleted the earlier run's {', '.join(removed)} in {run_dir} on "
                  "this node's disk", file=sys.stderr)

    # ---- data: rank 0 writes the synthetic world (if on), scans every frame and splits by clip; all ranks share it
    splits = distributed.broadcast_object(pipeline.split_data(cfg.data) if info.is_main else None, info)
    if info.is_main and splits.report is not None and not splits.report.ok:
        say(f"data scan: {splits.report}\nskipping them (data.bad_data=skip)")

    # ---- model: frozen VAE + UNet, identical initial weights on every rank; DDP and torch.compile around the UNet.
    # The one global seed of the run; each training step reseeds from (train.seed, rank, step) (Trainer._seed_step)
    performance.set_cudnn_benchmark(cfg.speed.cudnn_benchmark)
    torch.manual_seed(tc.seed)
    model = VideoPredictionDiffusion.from_config(cfg, info.device)
    if problem := frame_size_problem(cfg, model.vae.downsample):  # a hub VAE whose config was not readable before
        raise ConfigError([problem], "the config")
    net = distributed.wrap(model.unet, cfg, info)

    # ---- optimizer: AdamW, warm-up + cosine LR, EMA
    optim = optimization.build(model.unet, cfg.optim, cfg.ema, tc.max_steps)

    # ---- training data: windows over cached latents (the cache is built once, by all ranks) or over pixels
    micro_batch = tc.batch_size // (info.world_size * tc.grad_accum_steps)
    train_set = latent_cache.training_set(splits, cfg, model.vae, info, micro_batch * info.world_size, log=say)
    if cfg.diffusion.motion_anchor and isinstance(train_set, latent_cache.LatentWindowDataset):
        # each window's anchors once, here, instead of the VAE on every step (every rank: its windows change per epoch)
        started = time.perf_counter()
        train_set.attach_anchors(lambda past, frames: model.anchor_latents(past.to(info.device), frames),
                                 lambda z: model.vae.decode(z.to(info.device)), model.anchor_positions,
                                 max(micro_batch, 16), show_progress=info.is_main)
        say(f"motion anchors: {len(train_set)} windows in {time.perf_counter() - started:.0f} s")

    # ---- resume: the checkpoint rank 0 found (and sent to every rank), loaded into the parts; every rank must
    # then hold the same weights and step
    progress = restore(resume, model.unet, optim, info, say)
    check_same_start(model.unet, progress.step, info)

    # ---- tracking (rank 0): the run folder with samples/ and eval/, config.yaml, metrics.jsonl, wandb
    if info.is_main:
        tracking.make_run_folder(run_dir)
    tracker = tracking.start(run_dir, cfg, info, progress.resumed_from, progress.step, progress.wandb_id, say)
    return Trainer(cfg, info, run_dir, model, net, optim, train_set, splits.val_set(cfg.data), tracker, progress)


def run_folder_refusal(cfg: Config, args: argparse.Namespace, run_dir: Path, info: DistInfo) -> str | None:
    """Why this start is refused for what the run folder holds on any rank's disk (logging.run_dir shared or not),
    on every rank; None when nothing. A collective: rank 0 compares every rank's copy. An earlier run on any node is
    continued (--resume) or deleted (--overwrite), never mixed with this one, and `--resume latest` is refused when
    another node holds a newer checkpoint than rank 0 does."""
    listed = distributed.all_gather_object(
        (tracking.earlier_run(run_dir), [int(p.stem[5:]) for p in checkpoint.list_checkpoints(run_dir / "checkpoints")]),
        info)
    refusal = None
    if info.is_main and cfg.logging.name and not (args.resume or args.overwrite):
        if held := [(r, found) for r, (found, _) in enumerate(listed) if found]:
            r, found = held[0]
            where = "" if r == 0 else f" on the disk of rank {r}'s node"
            refusal = (f"{run_dir}{where} holds an earlier run ({', '.join(found)}): continue "
                       "it with --resume latest, or start over with --overwrite (deletes its checkpoints and metrics "
                       "on every node), or set logging.name to another folder")
    elif info.is_main and args.resume == "latest":
        own = max(listed[0][1], default=-1)
        if newer := [(r, max(steps)) for r, (_, steps) in enumerate(listed) if max(steps, default=-1) > own]:
            r, step = newer[0]
            refusal = (f"resume error: rank 0 finds {f'step {own}' if own >= 0 else 'no checkpoint'} in "
                       f"{run_dir / 'checkpoints'}, but the same folder on rank {r}'s node holds step {step}: "
                       "logging.run_dir is not shared and the node that holds the run is not node rank 0 this time. "
                       "Start that node as node rank 0 (torchrun --node_rank=0 with --rdzv_backend=static; with c10d, "
                       "node ranks follow the sorted --local-addr or host names), or put logging.run_dir on a "
                       "filesystem every node sees")
    return distributed.broadcast_object(refusal, info)


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
        # the VAE's downsampling, from its config.json: a frame size it does not divide fails here, not after the
        # scan and a whole run (the final grid's decode)
        if problem := frame_size_problem(cfg, read_downsample(cfg.vae.pretrained, cfg.vae.subfolder)):
            raise ConfigError([problem], args.config or "defaults")
    except (ConfigError, FileNotFoundError) as e:
        print(f"[rank {rank}] config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if rank == 0:
            print(dump_config(cfg), end="")
        return 0

    # ---- resume: the checkpoint read from this rank's disk and checked against the config, also before any process
    # group (a rank on a node whose disk lacks it gets rank 0's, below)
    resume = None
    if args.resume:
        try:
            resume = find_resume(cfg, args.resume, args.allow_objective_change, required=rank == 0)
        except (CheckpointError, ValueError) as e:
            print(f"[rank {rank}] resume error: {e}", file=sys.stderr)
            return 2

    # ---- distributed: process group (NCCL on GPU, gloo on CPU), device, run folder name
    info = distributed.setup(cfg.ddp.timeout_s, args.device)
    try:
        name = cfg.logging.name or distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"), info)
        run_dir = Path(cfg.logging.run_dir) / name

        # ---- the run folder on every rank's disk: an earlier run is continued (--resume) or deleted (--overwrite),
        # never mixed with this one, refused on all ranks together (a rank refusing alone before the process group
        # would leave the others waiting in it); then rank 0 sends its checkpoint to every rank whose disk does not
        # hold the same file, so all ranks start from rank 0's state
        if refusal := run_folder_refusal(cfg, args, run_dir, info):
            print(f"[rank {info.rank}] {refusal}", file=sys.stderr)
            return 2
        if args.resume:
            resume = share_resume(resume, cfg, info)

        # ---- data, model, optimizer, latent cache, resume, tracking; then fit
        build(cfg, info, run_dir, resume, overwrite=args.overwrite).fit()
        return 0
    except Preempted as e:
        print(f"[rank {info.rank}] {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: out at once, without a traceback
        print(f"[rank {info.rank}] interrupted (Ctrl-C): stopped without saving", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as e:  # found once the VAE is loaded
        print(f"[rank {info.rank}] config error: {e}", file=sys.stderr)
        if args.traceback:
            traceback.print_exc()
        return 2
    except USER_ERRORS as e:
        print(f"[rank {info.rank}] error: {type(e).__name__}: {e}", file=sys.stderr)
        if args.traceback:
            traceback.print_exc()
        return 2
    except WriteFailed as e:  # a full disk: named, saved, no traceback
        print(f"[rank {info.rank}] error: {e}", file=sys.stderr)
        return 1
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

"""What the tools that study a trained run share: its command-line arguments, loading it, its validation windows."""
from __future__ import annotations

import argparse
import sys

from data.dataset import VideoWindowDataset
from data.pipeline import prepare_clips
from model.loading import LoadedModel, LoadError, load_model


def add_run_args(p: argparse.ArgumentParser, run_help: str, seed_help: str, outputs: str) -> None:
    """--run, --checkpoint, --steps, --seed, --out (outputs: the files written into --out)."""
    p.add_argument("--run", required=True, help=run_help)
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint file")
    p.add_argument("--steps", type=int, default=0, help="DDIM steps; 0 = the run's sampler.num_inference_steps")
    p.add_argument("--seed", type=int, default=777, help=seed_help)
    p.add_argument("--out", help=f"folder for {outputs} (default: <run>/eval)")


def load_run(args: argparse.Namespace) -> LoadedModel | None:
    """The run's model (newest valid checkpoint, or --checkpoint; --set overrides and --device where the tool has
    them, "auto" = CUDA when present); None after printing why it cannot load."""
    device = getattr(args, "device", "cpu")
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return load_model(run=args.run, checkpoint=args.checkpoint, overrides=getattr(args, "set", None) or (),
                          device=device)
    except LoadError as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return None


def val_windows(loaded: LoadedModel) -> VideoWindowDataset:
    """The validation windows of the run's data (the same clip split as in training)."""
    _, val_clips, _ = prepare_clips(loaded.cfg.data, scan=False, progress=False)
    return VideoWindowDataset(val_clips, loaded.cfg.data)

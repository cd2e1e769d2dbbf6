"""What the tools that study a trained run share: its command-line arguments, loading it, its validation windows."""
from __future__ import annotations

import argparse
import sys

from data.dataset import VideoWindowDataset
from data.pipeline import split_as_trained
from model.loading import LoadedModel, LoadError, load_model
from training.distributed import resolve_device


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
    try:
        return load_model(run=args.run, checkpoint=args.checkpoint, overrides=getattr(args, "set", None) or (),
                          device=resolve_device(getattr(args, "device", "cpu")))
    except LoadError as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return None


def val_dataset(loaded: LoadedModel) -> VideoWindowDataset:
    """Every validation window of the run's data (the clip split of training, data.pipeline.split_as_trained)."""
    return VideoWindowDataset(split_as_trained(loaded.cfg.data).val, loaded.cfg.data)

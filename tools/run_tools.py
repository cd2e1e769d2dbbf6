"""What the tools that study a trained run share: its command-line arguments, loading it, its validation windows."""
from __future__ import annotations

import argparse
import dataclasses
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


def load_synthetic_run(args: argparse.Namespace) -> LoadedModel | None:
    """load_run for the tools that need the synthetic world's ground truth; None after printing why not."""
    loaded = load_run(args)
    if loaded is not None and not loaded.cfg.data.synthetic.enabled:
        print("error: this run was not trained on the synthetic world (data.synthetic.enabled is false)",
              file=sys.stderr)
        return None
    return loaded


def val_dataset(loaded: LoadedModel, rollout: int = 1) -> VideoWindowDataset:
    """Every validation window of the run's data (the clip split of training, data.pipeline.split_as_trained),
    t_past + rollout * t_future frames long."""
    cfg = dataclasses.replace(loaded.cfg.data, t_future=rollout * loaded.cfg.data.t_future)
    return VideoWindowDataset(split_as_trained(cfg).val, cfg)

"""Resuming: find the checkpoint `--resume` names and check that it fits the config (every rank, before any process
group, so a bad resume fails everywhere with one message), then load it into the built parts. Each rank unpickles
the checkpoint once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import Config
from model import performance
from model.loading import check_fits
from model.checkpoint import resolve_resume
from training.distributed import DistInfo
from training.optim import Optimization


@dataclass
class Resume:
    """`--resume WHICH` resolved: the checkpoint file and its state, or path None when `latest` found none yet."""
    which: str
    folder: Path  # the run's checkpoints/ folder
    path: Path | None = None
    state: dict | None = None


@dataclass
class Progress:
    """Where training stands, besides the weights: what a checkpoint restores."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # micro-batches consumed in this epoch
    nonfinite_skips: int = 0  # consecutive non-finite steps
    resumed_from: Path | None = None  # never deleted by retention
    wandb_id: str | None = None
    rng: dict | None = None  # this rank's saved RNG states (None: a fresh start or another world size)


def find(cfg: Config, which: str) -> Resume:
    """The checkpoint `--resume WHICH` names (latest: the run's newest valid one), verified and checked against
    the config; ValueError or CheckpointError naming it when it cannot be resumed."""
    if which == "latest" and not cfg.logging.name:
        raise ValueError("--resume latest needs logging.name (the run folder to continue)")
    folder = Path(cfg.logging.run_dir) / cfg.logging.name / "checkpoints"
    found = resolve_resume(folder, which)
    if found is None:
        return Resume(which, folder)
    path, state = found
    if (reason := check_fits(cfg, state, resume=True)) is not None:  # a weights-only file: refused before the scan
        raise ValueError(f"cannot resume from {path}: {reason}")
    return Resume(which, folder, path, state)


def restore(resume: Resume | None, unet: torch.nn.Module, optim: Optimization, info: DistInfo, say=print) -> Progress:
    """Load the checkpoint into the UNet, optimizer, EMA and LR schedule; return where training stands."""
    if resume is None:
        return Progress()
    if resume.state is None:
        say(f"--resume {resume.which}: no checkpoint in {resume.folder} yet; starting from step 0")
        return Progress()
    state = resume.state
    unet.load_state_dict(state["unet"])
    if optim.ema is not None and state["ema"] is not None:
        optim.ema.load_state_dict(state["ema"])
    optim.optimizer.load_state_dict(state["optimizer"])
    performance.match_param_layout(list(unet.parameters()), optim.optimizer, optim.ema)  # NCHW <-> NHWC
    optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
    progress = Progress(state["step"], state["epoch"], state["position"], state.get("nonfinite_skips", 0),
                        resume.path, state.get("wandb_id"))
    if state["world_size"] == info.world_size:
        progress.rng = state["rng"][info.rank]
    else:
        warnings.warn(f"resuming {resume.path} saved with {state['world_size']} ranks on {info.world_size}: "
                      "data order and noise will differ from an uninterrupted run", stacklevel=2)
        progress.position = 0
        progress.epoch += 1
    say(f"resumed from {resume.path} at step {progress.step}")
    return progress

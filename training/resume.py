"""Resuming: find the checkpoint `--resume` names and check that it fits the config, then load it into the built parts.

Under torchrun, each rank finds the checkpoint on its own disk before any process group (`find`, so a bad resume fails
everywhere with one message); then rank 0 sends its file to the ranks whose disk does not hold the same one (`share`),
so the other nodes need no shared filesystem and all ranks start from rank 0's state; `check_same_start` refuses to
train when they do not.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import Config, config_to_dict
from model import performance
from model.loading import LoadError, check_fits, stored_config
from model.checkpoint import footer_digest, load_bytes, resolve_resume
from training.distributed import DistInfo, all_gather_object, broadcast_bytes, broadcast_object
from training.optim import Optimization, lr_factor

# settings that define what is learnt: changed mid-run they train another objective on the old weights, so a resume
# refuses them unless --allow-objective-change (every diffusion.* key, and these)
OBJECTIVE_KEYS = ("data.frame_interval", "data.height", "data.width", "data.resize_mode", "data.t_past",
                  "data.t_future", "data.cond_keys", "vae.pretrained", "vae.subfolder", "vae.latent")
# settings applied to the resumed optimizer and EMA (their checkpointed state would keep the old values); the LR
# schedule's shape (optim.lr_schedule, warmup_steps, min_lr_ratio, train.max_steps) is read from the config anyway
OPTIMIZER_KEYS = ("optim.lr", "optim.weight_decay", "optim.adam_betas", "ema.decay", "ema.warmup_power")


@dataclass
class Resume:
    """`--resume WHICH` resolved: the checkpoint file and its state, or path None when `latest` found none yet."""
    which: str
    folder: Path  # the run's checkpoints/ folder
    path: Path | None = None
    state: dict | None = None
    cfg: Config | None = None  # the config it was checked against
    changed: list[tuple[str, object, object]] | None = None  # (dotted key, checkpoint's value, config's value)


@dataclass
class Progress:
    """Where training stands, besides the weights: what a checkpoint restores."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # micro-batches consumed in this epoch
    nonfinite_skips: int = 0  # consecutive non-finite steps
    resumed_from: Path | None = None  # never deleted by retention
    wandb_id: str | None = None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_settings(cfg: Config, state: dict) -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint's value, config's value) of every setting that differs from the checkpoint's config
    (stored under an older layout: upgraded first; keys it does not hold are not compared)."""
    try:
        old = config_to_dict(stored_config(state))
    except LoadError:  # a stored config the schema no longer accepts: compare what it holds
        old = state.get("config") or {}
    new = _flat(config_to_dict(cfg))
    return [(k, v, new[k]) for k, v in _flat(old).items() if k in new and new[k] != v]


def is_objective(key: str) -> bool:
    return key.startswith("diffusion.") or key in OBJECTIVE_KEYS


def find(cfg: Config, which: str, allow_objective_change: bool = False, required: bool = True) -> Resume:
    """The checkpoint `--resume WHICH` names (latest: the run's newest valid one), verified and checked against
    the config; ValueError or CheckpointError naming it when it cannot be resumed, or when the config changes the
    training objective (unless `allow_objective_change`). `required` False (a rank other than 0): a checkpoint file
    this disk lacks is no error (path None), as rank 0 sends it (`share`)."""
    if which == "latest" and not cfg.logging.name:
        raise ValueError("--resume latest needs logging.name (the run folder to continue)")
    folder = Path(cfg.logging.run_dir) / cfg.logging.name / "checkpoints"
    if not required and which != "latest" and not Path(which).exists():
        return Resume(which, folder)
    found = resolve_resume(folder, which)
    if found is None:
        return Resume(which, folder)
    path, state = found
    if (reason := check_fits(cfg, state, resume=True)) is not None:  # a weights-only file: refused before the scan
        raise ValueError(f"cannot resume from {path}: {reason}")
    changed = changed_settings(cfg, state)
    if not allow_objective_change and (objective := [c for c in changed if is_objective(c[0])]):
        raise ValueError(f"cannot resume from {path}: the config changes the training objective ("
                         + "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in objective)
                         + "); put it back, or pass --allow-objective-change to train on with it")
    return Resume(which, folder, path, state, cfg, changed)


def share(resume: Resume | None, cfg: Config, info: DistInfo) -> Resume | None:
    """Rank 0's `resume` on every rank. Each rank found one on its own disk (`find`); a rank whose disk does not hold
    rank 0's checkpoint file (another node's disk, when logging.run_dir is not shared; the same file: the same
    checksum in its footer) receives the file as it is on rank 0's disk, checks it against its checksum and loads
    it as a file is loaded. A collective; on one shared filesystem nothing is sent."""
    if not info.enabled or resume is None:
        return resume
    held = resume.path.name if resume.path is not None else None, footer_digest(resume.path) if resume.path else None
    held = all_gather_object(held, info)
    if all(h == held[0] for h in held):
        return resume
    head = broadcast_object((resume.path, resume.changed) if info.is_main else None, info)
    path, changed = head
    if path is None:  # rank 0 starts from step 0 (--resume latest before the first checkpoint)
        return Resume(resume.which, resume.folder)
    data = broadcast_bytes(path.read_bytes() if info.is_main else None, info)
    if info.is_main or held[info.rank] == held[0]:
        return resume
    return Resume(resume.which, resume.folder, path, load_bytes(data, path), cfg, changed)


def check_same_start(unet: torch.nn.Module, step: int, info: DistInfo) -> None:
    """RuntimeError naming the ranks when the UNet's weights or the step differ between ranks after start or resume:
    DDP would average their gradients and train on silently (nodes that resumed from different checkpoints)."""
    if not info.enabled:
        return
    h = hashlib.sha256(str(step).encode())
    with torch.no_grad():
        for p in unet.parameters():
            h.update(p.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    found = all_gather_object((step, h.hexdigest()[:16]), info)
    if differ := [r for r, f in enumerate(found) if f != found[0]]:
        raise RuntimeError("ranks start from different states (step, weights digest): "
                           + ", ".join(f"rank {r}: {found[r]}" for r in [0, *differ])
                           + "; refusing to train them together")


def apply_optimizer_settings(optim: Optimization, cfg: Config) -> None:
    """The config's optim.lr, weight decay and betas into the resumed AdamW and LR schedule, its ema.decay and
    warm-up into the resumed EMA (as training/optim.build sets them)."""
    oc, ec = cfg.optim, cfg.ema
    scheduler = optim.lr_scheduler
    scheduler.base_lrs = [oc.lr] * len(optim.optimizer.param_groups)
    for group in optim.optimizer.param_groups:
        group.update(initial_lr=oc.lr, lr=oc.lr * lr_factor(oc, cfg.train.max_steps, scheduler.last_epoch),
                     weight_decay=oc.weight_decay, betas=tuple(oc.adam_betas))
    scheduler._last_lr = [g["lr"] for g in optim.optimizer.param_groups]
    if optim.ema is not None:
        warm = ec.warmup_power > 0
        optim.ema.decay, optim.ema.use_ema_warmup = ec.decay, warm
        optim.ema.power, optim.ema.min_decay = (ec.warmup_power if warm else 2 / 3), (0.0 if warm else ec.decay)


def restore(resume: Resume | None, unet: torch.nn.Module, optim: Optimization, info: DistInfo, say=print) -> Progress:
    """Load the checkpoint into the UNet, optimizer, EMA and LR schedule; return where training stands."""
    if resume is None:
        return Progress()
    if resume.state is None:
        say(f"--resume {resume.which}: no checkpoint in {resume.folder} yet; starting from step 0")
        return Progress()
    state = resume.state
    for key, old, new in resume.changed or []:
        say(f"changed since the checkpoint: {key}: {old!r} -> {new!r}")
    unet.load_state_dict(state["unet"])
    if optim.ema is not None:
        if state["ema"] is not None:
            optim.ema.load_state_dict(state["ema"])
        else:  # ema.decay turned on: the average starts from the resumed weights, not the initial ones
            optim.ema.shadow_params = [p.detach().clone() for p in unet.parameters()]
    optim.optimizer.load_state_dict(state["optimizer"])
    performance.match_param_layout(list(unet.parameters()), optim.optimizer, optim.ema)  # NCHW <-> NHWC
    optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if resume.cfg is not None and any(k in OPTIMIZER_KEYS for k, _, _ in resume.changed or []):
        apply_optimizer_settings(optim, resume.cfg)
        say("applied to the resumed optimizer and EMA: "
            + ", ".join(k for k, _, _ in resume.changed if k in OPTIMIZER_KEYS))
    progress = Progress(state["step"], state["epoch"], state["position"], state.get("nonfinite_skips", 0),
                        resume.path, state.get("wandb_id"))
    # no RNG state to restore: the trainer derives each step's from (train.seed, rank, step); the "rng" entry of a
    # checkpoint written before that is ignored
    if state["world_size"] != info.world_size:
        warnings.warn(f"resuming {resume.path} saved with {state['world_size']} ranks on {info.world_size}: the data "
                      "order restarts at the next epoch (each rank's share of an epoch depends on the world size) and "
                      "each rank draws its own noise, so the run differs from an uninterrupted one; it stays "
                      "deterministic (this resume, repeated, gives the same run)", stacklevel=2)
        progress.position = 0
        progress.epoch += 1
    say(f"resumed from {resume.path} at step {progress.step}")
    return progress

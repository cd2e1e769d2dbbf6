"""Rebuild a VideoPredictionDiffusion from a run folder or a checkpoint file alone.

A checkpoint carries everything inference needs (STYLE habit 2): the resolved config under "config", the UNet
weights under "unet", the EMA state under "ema" (diffusers `EMAModel.state_dict()`: shadow_params, decay,
optimization_step, ...), the optimizer step under "step" and the UNet's shape under "model_args". The VAE is
loaded from the folder or hub id the stored config names. The original YAML is never needed.

    loaded = load_model(run="runs/demo")                  # newest valid checkpoint of the run
    loaded = load_model(checkpoint="runs/demo/checkpoints/ckpt_000001000.pt")
    loaded = load_model(config="configs/demo.yaml")       # random weights (loaded.random_weights is True)
    loaded = load_model(run="runs/demo/export")           # an export folder (tools/export.py): safetensors + JSON
    frames = loaded.model.predict(past_frames, net=loaded.net("ema"))

Non-finite weights do not stop loading: `loaded.nonfinite` lists them, so a diagnosis can report them.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from diffusers.training_utils import EMAModel

from configs import Config, apply_overrides, config_from_dict, load_config
from configs.loader import ConfigError, resolve_paths
from configs.schema import MOVED_KEYS
from model import performance
from model.unet import ConditionalUNet
from model.vae import FrozenVAE
from model.video_prediction_diffusion import VideoPredictionDiffusion
from model.checkpoint import CheckpointError, resolve_resume
from model.export import ExportError, is_export, read_export


class LoadError(RuntimeError):
    """The model could not be rebuilt: no checkpoint, a bad config, shapes that do not match, a missing VAE."""


@dataclass
class LoadedModel:
    model: VideoPredictionDiffusion  # model.unet holds the raw (trained) weights
    cfg: Config  # the stored config (plus any overrides)
    ema_unet: ConditionalUNet | None  # the EMA weights in a UNet of the same shape; None without EMA
    ema_state: dict | None  # the stored EMA state without its tensors (decay, optimization_step, power, ...)
    step: int  # optimizer steps trained (0 for random weights)
    checkpoint: Path | None  # None = random weights built from a YAML config
    state: dict = field(default_factory=dict, repr=False)  # the rest of the checkpoint ("vae" identity, ...)
    nonfinite: dict[str, list[str]] = field(default_factory=dict)  # "unet" / "ema" -> names of non-finite tensors

    @property
    def random_weights(self) -> bool:
        return self.checkpoint is None

    @property
    def raw_unet(self) -> ConditionalUNet:
        return self.model.unet

    def net(self, which: str = "ema") -> ConditionalUNet:
        """The UNet to sample with: "ema" (falls back to raw when the run has no EMA) or "raw"."""
        if which not in ("ema", "raw"):
            raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
        return self.ema_unet if which == "ema" and self.ema_unet is not None else self.model.unet

    def describe(self) -> str:
        if self.random_weights:
            return "RANDOM WEIGHTS (no checkpoint): outputs are noise by construction"
        ema = "EMA and raw weights" if self.ema_unet is not None else "raw weights only (no EMA)"
        return f"{self.checkpoint} (step {self.step}, {ema})"


# no RNG state: each step's randomness is derived from (train.seed, rank, step); an older checkpoint's "rng" is ignored
RESUME_KEYS = ("unet", "ema", "optimizer", "lr_scheduler", "step", "epoch", "position", "world_size")


def check_fits(cfg: Config, state: dict, latent_channels: int | None = None, resume: bool = False) -> str | None:
    """Why the checkpoint `state` cannot be loaded into the model `cfg` builds, or None when it fits: the one
    answer for resuming (before any process group, every rank) and for inference. `latent_channels`: the VAE's,
    when loaded; else read from a local VAE folder's config.json if there is one (a hub id is checked on load).
    `resume`: also require the training state (optimizer, schedule, data position), which inference does not need."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint of this project (a dict with 'unet', 'config')"
    if resume and (missing := [k for k in RESUME_KEYS if k not in state]):
        return (f"it holds no {', '.join(repr(k) for k in missing)}: not a training checkpoint of this project "
                "(weights alone, e.g. an export, load in the tools but do not resume)")
    args = state.get("model_args") or {}
    if latent_channels is None:
        vae_config = Path(cfg.vae.pretrained).expanduser() / cfg.vae.subfolder / "config.json"
        try:
            latent_channels = json.loads(vae_config.read_text()).get("latent_channels")
        except (OSError, json.JSONDecodeError):
            latent_channels = None  # no local VAE (a hub id), or one the VAE loader reports with its path
    stored = args.get("latent_channels")
    if latent_channels is not None and stored is not None and latent_channels != stored:
        return (f"its UNet works on {stored}-channel latents but the VAE {cfg.vae.pretrained} has "
                f"latent_channels={latent_channels} (the checkpoint's VAE: {(state.get('vae') or {}).get('name')})")
    if "unet" not in state:
        return "it holds no 'unet' weights"
    mine_args = {"latent_channels": latent_channels or stored or 4, "t_past": cfg.context_frames,
                 "t_future": cfg.data.t_future, "cond_dim": cfg.cond_dim}
    if args and any(args.get(k) != v for k, v in mine_args.items()):
        return f"its UNet was built for {args}, but the config and VAE give {mine_args}"
    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = ConditionalUNet(cfg.unet, **mine_args)
    mine = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["unet"].items()}
    if mine == theirs:
        return None
    old = state.get("config") or {}
    changed = [f"{sec}.{k}: {old[sec][k]!r} -> {v!r}" for sec, keys in
               (("unet", None), ("data", ("t_past", "t_future", "cond_keys")))
               for k, v in vars(getattr(cfg, sec)).items()
               if (keys is None or k in keys) and k in old.get(sec, {}) and old[sec][k] != v]
    diff = [f"{k}: {theirs.get(k)} -> {mine.get(k)}" for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)][:3]
    return (f"the model's shape changed (checkpoint -> config): {'; '.join(changed) or 'see tensors'}; "
            f"tensors e.g. {'; '.join(diff)}")


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of tensors holding a NaN or an Inf."""
    return [name for name, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


def find_checkpoint(run: str | Path | None, which: str = "latest") -> tuple[Path, dict]:
    """(path, state) of the checkpoint to load: `which` = "latest" (the run's newest valid checkpoint; `run` is
    the run folder or its checkpoints/ folder) or a checkpoint file path. An export folder (model/export.py), as
    `run` or as `which`, gives its state without unpickling anything."""
    try:
        for folder in (which, run):
            if folder is not None and folder != "latest" and Path(folder).is_dir() and is_export(folder):
                return Path(folder), read_export(folder)
        if which != "latest":
            found = resolve_resume(Path(which).parent, which)
        else:
            if run is None:
                raise LoadError("give a run folder (--run) or a checkpoint file (--checkpoint PATH)")
            run = Path(run)
            if not run.is_dir():
                raise LoadError(f"run folder {run} does not exist")
            folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
            found = resolve_resume(folder, "latest")
            if found is None:
                raise LoadError(f"no checkpoint in {folder} (has the run saved one yet? checkpoint.every)")
    except (CheckpointError, ExportError) as e:
        raise LoadError(str(e)) from None
    if not isinstance(found[1], dict):
        raise LoadError(f"{found[0]} holds a {type(found[1]).__name__}, not a checkpoint of this project")
    return found


RETIRED_KEYS = {("train", "step_checks")}  # settings that no longer exist; checkpoints written before still load


def _upgrade(raw: dict) -> dict:
    """A stored config as plain data, with the keys of older versions of this project removed or moved."""
    for section, key in RETIRED_KEYS:
        if isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (section, key) = old.split("."), new.split(".")
        if isinstance(raw.get(old_section), dict) and old_key in raw[old_section]:
            raw.setdefault(section, {})[key] = raw[old_section].pop(old_key)
    return raw


def stored_config(state: dict, overrides: Iterable[str] = (), source: str = "checkpoint") -> Config:
    """The resolved config a checkpoint carries, with dotted overrides (e.g. sampler.num_inference_steps=50)."""
    if "config" not in state:
        raise LoadError(f"{source} holds no 'config' (not a checkpoint of this project?)")
    raw = _upgrade(copy.deepcopy(state["config"]))
    problems: list[str] = []
    apply_overrides(raw, list(overrides), problems)
    try:
        if problems:
            raise ConfigError(problems, source)
        return config_from_dict(raw, source)
    except ConfigError as e:
        raise LoadError(f"the config stored in {source} does not load: {e}") from None


def _ema_unet(unet: ConditionalUNet, ema_state: dict, source: str) -> ConditionalUNet:
    """A copy of `unet` holding the EMA shadow weights (in the order of unet.parameters(), as EMAModel keeps them)."""
    params = list(unet.parameters())
    shadow = ema_state.get("shadow_params")
    if not isinstance(shadow, list) or len(shadow) != len(params):
        raise LoadError(f"{source}: EMA holds {len(shadow) if isinstance(shadow, list) else 'no'} shadow tensors, "
                        f"the UNet has {len(params)} parameters")
    bad = [i for i, (p, s) in enumerate(zip(params, shadow)) if p.shape != s.shape]
    if bad:
        raise LoadError(f"{source}: EMA shadow tensor {bad[0]} has shape {tuple(shadow[bad[0]].shape)}, the UNet "
                        f"parameter has {tuple(params[bad[0]].shape)}")
    ema = EMAModel(params, foreach=False)  # diffusers validates the state's fields; copy_to writes the shadow weights
    ema.load_state_dict(ema_state)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema.copy_to(ema_unet.parameters())
    return ema_unet.eval()


def ema_schedule(ema_state: dict) -> EMAModel:
    """An EMAModel holding the stored EMA settings (not its weights): `.get_decay(k)` is the decay of update k."""
    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))])
    ema.load_state_dict({k: v for k, v in ema_state.items() if k != "shadow_params"})
    return ema


def _project_of(checkpoint: Path, cfg: Config) -> Path | None:
    """The folder a run was launched from, read off its checkpoint's place: <project>/<logging.run_dir>/<name>/
    checkpoints/<file> (None when run_dir is absolute or the file does not sit there). Its stored relative
    data.root / vae.pretrained point into it, also when the tools run from another checkout of the code."""
    run_dir = Path(cfg.logging.run_dir)
    folder = checkpoint.resolve().parent
    if run_dir.is_absolute() or folder.name != "checkpoints":
        return None
    parents = folder.parent.parents  # [<project>/<run_dir>, ..., <project>, ...]
    return parents[len(run_dir.parts)] if len(parents) > len(run_dir.parts) else None


def load_model(run: str | Path | None = None, checkpoint: str = "latest", config: str | Path | None = None,
               overrides: Iterable[str] = (), device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Rebuild the model from a checkpoint (the run's newest valid one, or a file), or with random weights from a
    YAML config (`config`, no checkpoint). Raises LoadError with a one-line reason."""
    overrides = list(overrides)
    device = torch.device(device)
    # ---- config and weights
    if config is not None:
        try:
            cfg = load_config(config, overrides)
        except (ConfigError, FileNotFoundError) as e:
            raise LoadError(str(e)) from None
        path, state = None, {}
    else:
        path, state = find_checkpoint(run, checkpoint)
        cfg = stored_config(state, overrides, str(path))
        project = _project_of(Path(path), cfg)
        if project is not None:  # paths relative to where the run was made, from another checkout or directory
            resolve_paths(cfg, project)
        if "unet" not in state:
            raise LoadError(f"{path} holds no 'unet' weights")

    # ---- the frozen VAE the config names
    try:
        vae = FrozenVAE.from_config(cfg.vae).to(device)
    except (ValueError, OSError) as e:  # VAEError is a ValueError
        raise LoadError(f"VAE {cfg.vae.pretrained!r}: {e} (override with --set vae.pretrained=FOLDER)") from None
    if cfg.speed.vae_fuse_upsample:  # the decoder the trainer evaluates with (sub-pixel upsampling, any device)
        performance.fuse_upsample_convs(vae.vae)

    # ---- the UNet, shaped as the checkpoint says
    args = {"latent_channels": vae.latent_channels, "t_past": cfg.context_frames, "t_future": cfg.data.t_future,
            "cond_dim": cfg.cond_dim}
    if state and (reason := check_fits(cfg, state, vae.latent_channels)) is not None:
        raise LoadError(f"{path} does not fit its config: {reason} (were data.t_past/t_future/cond_keys, unet.* or "
                        "vae.pretrained overridden?)")
    torch.manual_seed(seed)  # random weights (--config) are reproducible
    try:
        unet = ConditionalUNet(cfg.unet, **args)
        model = VideoPredictionDiffusion(cfg, vae, unet)
    except (ValueError, AssertionError) as e:
        raise LoadError(f"cannot build the model: {e}") from None
    nonfinite = {}
    ema_unet, ema_state = None, None
    if state:
        try:
            unet.load_state_dict(state["unet"])
        except RuntimeError as e:
            raise LoadError(f"{path}: UNet weights do not fit the stored config: {str(e).splitlines()[0]}") from None
        nonfinite["unet"] = nonfinite_names(unet.state_dict().items())
        if state.get("ema_unet") is not None:  # an export: the EMA weights under the UNet's names
            ema_unet = copy.deepcopy(unet).requires_grad_(False)
            try:
                ema_unet.load_state_dict(state["ema_unet"])
            except RuntimeError as e:
                raise LoadError(f"{path}: EMA weights do not fit the stored config: {str(e).splitlines()[0]}") from None
            ema_unet.eval()
            ema_state = state.get("ema_settings") or {}
            nonfinite["ema"] = nonfinite_names((f"ema.{n}", p) for n, p in ema_unet.named_parameters())
        elif state.get("ema") is not None:
            ema_unet = _ema_unet(unet, state["ema"], str(path))
            ema_state = {k: v for k, v in state["ema"].items() if k != "shadow_params"}
            nonfinite["ema"] = nonfinite_names((f"ema.{n}", p) for n, p in ema_unet.named_parameters())
    unet.to(device).eval().requires_grad_(False)
    if ema_unet is not None:
        ema_unet.to(device)
    rest = {k: v for k, v in state.items() if k not in ("unet", "ema", "ema_unet", "optimizer")}
    return LoadedModel(model=model, cfg=cfg, ema_unet=ema_unet, ema_state=ema_state, step=int(state.get("step", 0)),
                       checkpoint=path, state=rest, nonfinite={k: v for k, v in nonfinite.items() if v})

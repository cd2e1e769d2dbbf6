"""Trained weights to share: a folder of safetensors and JSON that loads without unpickling anything.

    <folder>/config.json        {"format", "config" (the resolved config), "model_args", "step", "vae", "ema", "source"}
    <folder>/unet.safetensors   the raw (trained) UNet weights, its state_dict
    <folder>/unet_ema.safetensors   the EMA weights under the same names (absent when the run has no EMA)
    <folder>/vae/               the VAE's config.json and *.safetensors, when the run's VAE is a local folder holding
                                safetensors (config.json then names it "vae", found next to this file); a hub id is kept

Written by tools/export.py from a run or checkpoint; read by model/loading.load_model (`--run FOLDER` in every tool),
like diffusers' `from_pretrained` folders. A checkpoint (model/checkpoint.py) is for resuming; this is for sharing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "video-prediction-export/1"
CONFIG = "config.json"
UNET = "unet.safetensors"
UNET_EMA = "unet_ema.safetensors"
VAE = "vae"  # the subfolder name, also what config.json's vae.pretrained says when the VAE is bundled


class ExportError(RuntimeError):
    pass


def is_export(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG).is_file() and (folder / UNET).is_file()


def _tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    # safetensors stores dense, contiguous, unshared tensors (channels_last weights come back as NCHW)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_export(folder: str | Path, *, config: dict, model_args: dict, unet: dict, ema_unet: dict | None,
                ema_settings: dict | None, step: int, vae: dict | None, source: str, bundle_vae: bool = True) -> Path:
    """Write the export folder (created; files in it replaced). `config` is the resolved config as plain data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config))  # a copy, and proof that it is plain data
    save_file(_tensors(unet), folder / UNET, metadata={"format": FORMAT, "weights": "raw"})
    (folder / UNET_EMA).unlink(missing_ok=True)
    if ema_unet is not None:
        save_file(_tensors(ema_unet), folder / UNET_EMA, metadata={"format": FORMAT, "weights": "ema"})
    vae_src = Path(config["vae"]["pretrained"]).expanduser() / config["vae"].get("subfolder", "")
    if bundle_vae and (vae_src / "config.json").is_file() and any(vae_src.glob("*.safetensors")):
        shutil.rmtree(folder / VAE, ignore_errors=True)
        (folder / VAE).mkdir()
        for f in [vae_src / "config.json", *vae_src.glob("*.safetensors")]:  # never a pickled .bin
            shutil.copy2(f, folder / VAE / f.name)
        config["vae"].update(pretrained=VAE, subfolder="")
    meta = {"format": FORMAT, "config": config, "model_args": model_args, "step": int(step), "vae": vae,
            "ema": ema_settings, "source": source}
    (folder / CONFIG).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return folder


def read_export(folder: str | Path) -> dict:
    """The export as a checkpoint-like state: "config", "model_args", "step", "vae", "unet" (tensors), and
    "ema_unet" (tensors or None) with "ema_settings". ExportError naming the file when it does not read."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{folder / CONFIG} does not read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{folder / CONFIG} is not an export of this project (format {found!r}, expected {FORMAT!r})")
    try:
        unet = load_file(folder / UNET)
        ema_unet = load_file(folder / UNET_EMA) if (folder / UNET_EMA).is_file() else None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise ExportError(f"weights in {folder} do not read: {e}") from None
    config = meta["config"]
    if config.get("vae", {}).get("pretrained") == VAE and (folder / VAE / "config.json").is_file():
        config["vae"]["pretrained"] = str((folder / VAE).resolve())
    return {"config": config, "model_args": meta.get("model_args") or {}, "step": meta.get("step", 0),
            "vae": meta.get("vae"), "unet": unet, "ema_unet": ema_unet, "ema_settings": meta.get("ema")}

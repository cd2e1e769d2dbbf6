"""Tiny builders shared by the tests: small diffusers VAEs saved to a temporary folder, small valid configs.

Nothing here downloads: every VAE is built from a config and saved with `save_pretrained`.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast instead of hanging

import copy  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, AutoencoderTiny  # noqa: E402

from configs.loader import config_from_dict  # noqa: E402
from configs.schema import Config  # noqa: E402

LATENT_CHANNELS = 4
DOWNSAMPLE = 2  # pixels per latent cell of the tiny VAEs (two encoder levels)


def tiny_kl_vae(seed: int = 0, latent_channels: int = LATENT_CHANNELS, scaling_factor: float = 0.18215,
                shift_factor: float | None = None) -> AutoencoderKL:
    """A randomly initialised two-level AutoencoderKL (about 0.4M parameters), deterministic in `seed`."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=16, layers_per_block=1, scaling_factor=scaling_factor,
                         shift_factor=shift_factor)


def tiny_vae_folder(tmp_path: Path, name: str = "vae", **kw) -> Path:
    """A tiny AutoencoderKL saved in diffusers format (config.json + safetensors) under tmp_path/name."""
    folder = Path(tmp_path) / name
    tiny_kl_vae(**kw).save_pretrained(folder)
    return folder


def tiny_taesd_folder(tmp_path: Path, name: str = "taesd", seed: int = 0) -> Path:
    """A tiny AutoencoderTiny (TAESD architecture, two levels) saved under tmp_path/name."""
    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=LATENT_CHANNELS)
    folder = Path(tmp_path) / name
    vae.save_pretrained(folder)
    return folder


def tiny_config(vae_path: str | Path = "unused-in-memory-vae", **overrides) -> Config:
    """A valid Config for 16x16 frames, 2 past + 2 future, a two-level 16/32-channel UNet.

    overrides are dotted keys, e.g. tiny_config(**{"diffusion.prediction_type": "v_prediction"}); the result goes
    through the same loader checks as a YAML file."""
    raw = {
        "data": {"height": 16, "width": 16, "t_past": 2, "t_future": 2, "num_workers": 0},
        "vae": {"pretrained": str(vae_path), "chunk_size": 4},
        "unet": {"block_out_channels": [16, 32], "attention": [False, True], "layers_per_block": 1,
                 "attention_head_dim": 8, "norm_num_groups": 8},
        "sampler": {"num_inference_steps": 4},
        "logging": {"wandb": {"mode": "disabled"}},
    }
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[key] = value
    return config_from_dict(raw, "tiny_config")


def smooth_frames(b: int, t: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    """(b, t, 3, h, w) smooth colour gradients with a random phase per clip/frame, pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(b, t, 3, 1, 1, generator=g) * 6.28
    yy = torch.linspace(0, 3.14, h).reshape(1, 1, 1, h, 1)
    xx = torch.linspace(0, 3.14, w).reshape(1, 1, 1, 1, w)
    return 0.9 * torch.sin(yy + 0.5 * xx + phase)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a test module with one intra-op thread (restored after). These tensors are tiny; with 2 threads on a
    shared 2-core machine, OpenMP's spinning workers made the same tests 10-20x slower under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def set_dotted(raw: dict, dotted: dict) -> dict:
    """Set {"section.key": value} entries (Python values, not YAML text) in a raw config dict; returns raw."""
    for key, value in dotted.items():
        *sections, leaf = key.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return raw


@dataclass
class World:
    """A tiny VAE and a synthetic world on disk (root/vae, root/world; latent cache under root/cache), and the base
    config of the runs that read them, as plain data (logging.run_dir and logging.name are filled in per run)."""
    root: Path
    raw: dict

    def config(self, run_dir: Path, name: str | None = None, **dotted) -> dict:
        """A deep copy of the base config with logging.run_dir (and .name) set and dotted overrides applied."""
        raw = copy.deepcopy(self.raw)
        raw["logging"]["run_dir"] = str(run_dir)
        if name is not None:
            raw["logging"]["name"] = name
        return set_dotted(raw, dotted)

    def yaml(self, path: Path, run_dir: Path, name: str | None = None, **dotted) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config(run_dir, name, **dotted), sort_keys=False))
        return path


def make_world(root: Path, **sections: dict) -> World:
    """A tiny random AutoencoderKL under root/vae and the synthetic world of `sections["data"]` generated under
    root/world; `sections` are the config sections of the runs (paths into root are filled in)."""
    from data import ensure_synthetic

    raw = copy.deepcopy(sections)
    raw.setdefault("data", {})["root"] = str(root / "world")
    raw.setdefault("vae", {}).update(pretrained=str(tiny_vae_folder(root)), chunk_size=8)
    raw.setdefault("cache", {})["dir"] = str(root / "cache")
    raw.setdefault("logging", {}).update(run_dir="unset", name="run", wandb={"mode": "disabled"})
    ensure_synthetic(config_from_dict(raw).data, progress=False)
    return World(root, raw)

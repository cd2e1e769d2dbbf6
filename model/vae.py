"""The frozen, pretrained VAE behind one wrapper that owns its latent scaling (after EDM2's `encoders.py`).

frames  (B, T, 3, H, W) pixels in [-1, 1]          (what SD-family VAEs expect; DESIGN cause 2)
latents (B, T, C, H/f, W/f) = (z - shift) * scale   (scale and shift from vae.config, never a literal; cause 3)
This is the only place in the project that knows the scale.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


class VAEError(ValueError):
    pass


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_diffusers_vae(pretrained: str, subfolder: str = "", dtype: str = "fp32") -> torch.nn.Module:
    """AutoencoderKL or AutoencoderTiny from a local folder or a hub id, chosen by its config's _class_name."""
    path = Path(pretrained).expanduser()
    local = path.exists()
    if not local and not _looks_like_hub_id(pretrained):
        raise VAEError(f"VAE not found: {pretrained!r} is neither a folder nor a hub id (owner/name); "
                       "set vae.pretrained to a folder holding config.json and weights")
    if local:
        folder = path / subfolder if subfolder else path
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise VAEError(f"VAE folder {folder} has no config.json (is it a diffusers-format VAE? "
                           f"for a full pipeline folder set vae.subfolder: vae)")
        import json
        try:
            class_name = json.loads(cfg_file.read_text()).get("_class_name", "AutoencoderKL")
        except json.JSONDecodeError as e:
            raise VAEError(f"VAE config {cfg_file} is not valid JSON: {e}") from None
    else:
        class_name = "AutoencoderKL"  # hub ids are read by AutoencoderKL; use a local folder for a Tiny VAE
    cls = _CLASSES.get(class_name)
    if cls is None:
        raise VAEError(f"VAE class {class_name!r} in {pretrained} is not supported (use {list(_CLASSES)})")
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        return cls.from_pretrained(str(path) if local else pretrained, torch_dtype=_DTYPES[dtype],
                                   low_cpu_mem_usage=False, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        where = f"folder {path}" if local else f"hub id {pretrained!r} (offline? no cached copy?)"
        raise VAEError(f"could not load the VAE from {where}: {str(e).splitlines()[0]}") from e


def read_downsample(pretrained: str, subfolder: str = "") -> int | None:
    """Pixels per latent cell of the VAE `pretrained` names, from its config.json alone (no weights), so a frame
    size can be checked before the data scan; None when the config cannot be read here (loading reports why)."""
    path = Path(pretrained).expanduser()
    try:  # a hub id only from the local cache: no network before the run starts
        cfg = AutoencoderKL.load_config(str(path) if path.exists() else pretrained, subfolder=subfolder or None,
                                        local_files_only=True)
    except (OSError, ValueError):
        return None
    tiny = cfg.get("_class_name") == "AutoencoderTiny"
    blocks = cfg.get("encoder_block_out_channels" if tiny else "block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else None


class FrozenVAE(torch.nn.Module):
    """Encodes pixel frames to scaled latents and back, in chunks of frames; never trained."""

    def __init__(self, vae: torch.nn.Module, dtype: str = "fp32", chunk_size: int = 32, latent: str = "mean",
                 name: str = ""):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        if next(vae.parameters()).dtype != _DTYPES[dtype]:
            self.vae.to(_DTYPES[dtype])
        self.dtype = _DTYPES[dtype]
        self.chunk_size = chunk_size
        self.latent_mode = latent
        self.name = name
        self.is_tiny = isinstance(vae, AutoencoderTiny)
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        blocks = cfg.encoder_block_out_channels if self.is_tiny else cfg.block_out_channels
        self.downsample = 2 ** (len(blocks) - 1)  # pixels per latent cell along each axis
        for p_name, p in self.vae.named_parameters():
            if not torch.isfinite(p).all():
                raise VAEError(f"VAE {name or ''} has non-finite weights in {p_name}")
        self.train(False)  # the wrapper's own flag too: nn.Module starts with training=True

    @classmethod
    def from_config(cls, cfg) -> "FrozenVAE":
        """From a `VAEConfig`."""
        vae = load_diffusers_vae(cfg.pretrained, cfg.subfolder, cfg.dtype)
        return cls(vae, dtype=cfg.dtype, chunk_size=cfg.chunk_size, latent=cfg.latent, name=cfg.pretrained)

    def train(self, mode: bool = True):  # frozen: stays in eval whatever the caller does
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def identity(self) -> dict:
        """What the latents depend on (for cache keys and checkpoints)."""
        return {"name": self.name, "class": type(self.vae).__name__, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "latent_channels": self.latent_channels,
                "dtype": str(self.dtype), "config": dict(self.vae.config)}

    # ------------------------------------------------------------------ scaled latent <-> raw latent
    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode_moments(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, 3, H, W) in [-1, 1] -> scaled posterior (mean, std), each (B, T, C, h, w) float32.

        std is None for AutoencoderTiny (deterministic encoder)."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"expected frames of shape (B, T, 3, H, W), got {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        flat = frames.reshape(B * T, *frames.shape[2:])
        means, stds = [], []
        for chunk in flat.split(self.chunk_size):
            chunk = chunk.to(self.device, self.dtype)
            if self.is_tiny:
                means.append(self.scale(self.vae.encode(chunk).latents.float()))
            else:
                dist = self.vae.encode(chunk).latent_dist
                means.append(self.scale(dist.mean.float()))
                stds.append(dist.std.float() * self.scaling_factor)
        mean = torch.cat(means).reshape(B, T, *means[0].shape[1:])
        std = torch.cat(stds).reshape(B, T, *stds[0].shape[1:]) if stds else None
        return mean, std

    def latents_from_moments(self, mean: torch.Tensor, std: torch.Tensor | None,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior mean, or a posterior sample when vae.latent = sample (and std is known)."""
        if self.latent_mode == "mean" or std is None:
            return mean
        z = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
        return mean + std * z.to(mean.device)

    def encode(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, 3, H, W) pixels in [-1, 1] -> (B, T, C, h, w) scaled latents (float32)."""
        return self.latents_from_moments(*self.encode_moments(frames), generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) scaled latents -> (B, T, 3, H, W) pixels, clamped to [-1, 1], float32."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents (B, T, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        B, T = latents.shape[:2]
        flat = latents.reshape(B * T, *latents.shape[2:])
        # copy=True: a decoder compiled with CUDA graphs (speed.vae_compile, speed.vae_compile_mode=reduce-overhead)
        # returns its graph's output buffer, which the next chunk's replay overwrites; an fp32 `.float()` would alias it
        out = [self.vae.decode(self.unscale(c.to(self.device, torch.float32)).to(self.dtype)).sample.to(
               torch.float32, copy=True) for c in flat.split(self.chunk_size)]
        return torch.cat(out).clamp(-1, 1).reshape(B, T, *out[0].shape[1:])

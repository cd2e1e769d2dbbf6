"""The denoiser: a diffusers `UNet2DModel` on [noisy future latents | clean past latents] stacked on channels.

All T_future frames are predicted jointly (out channels = C * T_future), so each output channel group knows
which future frame it is (MCVD, Voleti et al. 2022; DIAMOND, Alonso et al. 2024): DESIGN cause 5.
An optional conditioning vector enters through a learned projection added to the time embedding
(UNet2DModel's class_embed_type="identity"). `t_past` counts every clean conditioning frame: the past latents, and
under diffusion.motion_anchor one anchor per future frame after them (Config.context_frames).
"""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from configs.schema import UNetConfig


class ConditionalUNet(torch.nn.Module):
    def __init__(self, cfg: UNetConfig, latent_channels: int, t_past: int, t_future: int, cond_dim: int = 0):
        super().__init__()
        self.latent_channels, self.t_past, self.t_future, self.cond_dim = latent_channels, t_past, t_future, cond_dim
        self.levels = len(cfg.block_out_channels)
        time_dim = cfg.block_out_channels[0] * 4
        self.unet = UNet2DModel(
            in_channels=latent_channels * (t_future + t_past),
            out_channels=latent_channels * t_future,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups,
            dropout=cfg.dropout,
            add_attention=any(cfg.attention),
            class_embed_type="identity" if cond_dim else None,
        )
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.cond_proj = None
        if cond_dim:
            self.cond_proj = torch.nn.Sequential(
                torch.nn.Linear(cond_dim, time_dim), torch.nn.SiLU(), torch.nn.Linear(time_dim, time_dim))

    def check_latent_size(self, h: int, w: int) -> None:
        f = 2 ** (self.levels - 1)
        if h % f or w % f:
            raise ValueError(f"latent size {h}x{w} must be divisible by {f} for a UNet with {self.levels} levels "
                             f"(choose data.height/width as multiples of {8 * f} for an 8x VAE)")

    def forward(self, noisy_future: torch.Tensor, past: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor | None = None, cond_keep: torch.Tensor | None = None) -> torch.Tensor:
        """noisy_future (B, Tf, C, h, w), past (B, Tp, C, h, w) scaled latents, t (B,) long, cond (B, D).

        cond_keep (B,) in {0, 1} zeroes the conditioning embedding per sample (condition dropout / unconditional
        branch of guidance). Returns the prediction for every future frame, (B, Tf, C, h, w)."""
        B, Tf, C, h, w = noisy_future.shape
        assert (Tf, C) == (self.t_future, self.latent_channels), f"future latents {tuple(noisy_future.shape)}"
        assert past.shape == (B, self.t_past, C, h, w), f"past latents {tuple(past.shape)} vs future {(B, Tf, C, h, w)}"
        self.check_latent_size(h, w)  # else UNet2DModel fails deep inside with a skip-connection size mismatch
        x = torch.cat([noisy_future, past], dim=1).reshape(B, (Tf + self.t_past) * C, h, w)
        class_labels = None
        if self.cond_proj is not None:
            if cond is None or cond.shape != (B, self.cond_dim):
                raise ValueError(f"this model needs a conditioning vector of shape (B, {self.cond_dim}), "
                                 f"got {None if cond is None else tuple(cond.shape)}")
            class_labels = self.cond_proj(cond.to(x.dtype))
            if cond_keep is not None:
                class_labels = class_labels * cond_keep.to(class_labels.dtype).reshape(B, 1)
        out = self.unet(x, t, class_labels=class_labels).sample  # (B, Tf*C, h, w)
        return out.reshape(B, Tf, C, h, w)

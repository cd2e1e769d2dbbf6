"""The one noise schedule shared by training and sampling.

Betas come from diffusers' `DDPMScheduler` (so they are exactly what diffusers would use for the same
config); everything the trainer and the sampler need is derived here from `alphas_cumprod`.

Notation (Ho et al. 2020; Song et al. 2021, "DDIM"; Salimans & Ho 2022 for v):
    alpha_bar_t   cumulative product of (1 - beta), t = 0 .. T-1; alpha_bar_{-1} := 1 (clean data)
    x_t           = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    v_t           = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from configs.schema import DiffusionConfig


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`, same dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_train_timesteps = cfg.num_train_timesteps
        self.prediction_type = cfg.prediction_type
        # diffusers scheduler used for its beta construction and for compute_snr; we never call its step().
        self.scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
            clip_sample=False, rescale_betas_zero_snr=cfg.zero_terminal_snr)
        self.betas = self.scheduler.betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64, (T,)
        self._alpha_bar_tables: dict[torch.device, torch.Tensor] = {}  # alpha_bar padded with 1 at t=-1, per device

    # ------------------------------------------------------------------ training side
    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for integer t in [-1, T-1] (t = -1 is clean data, alpha_bar = 1). float64, on t's device:
        a CUDA t is looked up on the GPU, since copying it to the CPU would stall every training and sampling step."""
        t = torch.as_tensor(t, dtype=torch.long)
        if t.device.type not in ("cpu", "cuda"):  # float64 tables are not supported everywhere (e.g. MPS)
            t = t.cpu()
        if t.device not in self._alpha_bar_tables:
            padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
            self._alpha_bar_tables[t.device] = padded.to(t.device)
        return self._alpha_bar_tables[t.device][t + 1]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return _expand(ab.sqrt(), x0) * x0 + _expand((1 - ab).sqrt(), x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_t, t)."""
        if self.prediction_type == "epsilon":
            return noise
        ab = self.alpha_bar(t)
        return _expand(ab.sqrt(), x0) * noise - _expand((1 - ab).sqrt(), x0) * x0

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE weights: min-SNR-gamma (Hang et al. 2023, eq. 9-10) or ones when snr_gamma = 0."""
        t = torch.as_tensor(t, dtype=torch.long)
        gamma = self.cfg.snr_gamma
        if gamma <= 0:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = compute_snr(self.scheduler, t)
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        w = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
        return w.float()

    # ------------------------------------------------------------------ sampling side
    def split_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Network output at (x_t, t) -> (x0_pred, eps_pred), for either prediction type."""
        ab = self.alpha_bar(t)
        a, s = _expand(ab.sqrt(), x_t), _expand((1 - ab).sqrt(), x_t)
        if self.prediction_type == "epsilon":
            eps = output
            x0 = (x_t - s * eps) / a
        else:  # v = a * eps - s * x0  =>  x0 = a x_t - s v, eps = s x_t + a v
            x0 = a * x_t - s * output
            eps = s * x_t + a * output
        return x0, eps

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The epsilon consistent with (x_t, x0): used after x0 is clipped (DDIM eq. 12 needs the pair to agree)."""
        ab = self.alpha_bar(t)
        return (x_t - _expand(ab.sqrt(), x_t) * x0) / _expand((1 - ab).sqrt(), x_t)

    def timesteps(self, num_steps: int, spacing: str = "trailing") -> list[int]:
        """Descending model-call timesteps for `num_steps` DDIM steps; the step after the last goes to t = -1.

        trailing (Lin et al. 2024, "Common diffusion noise schedules are flawed", table 2): starts at T-1.
        leading / linspace as in diffusers (leading starts at T - T/num_steps, e.g. 950 for 20 of 1000).
        """
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps={num_steps} must be in [1, {T}]")
        if spacing == "trailing":
            # diffusers' float np.arange(T, 0, -T/n) yields n+1 entries for some n (61, 103, 121, ... of 1000), the
            # last t = -1: a model call at alpha_bar = 1, where the step divides by zero. Keep the first n entries
            # (identical to diffusers' values; the n-th is about T/n, so round(T/n) - 1 >= 0).
            ts = np.round(np.arange(T, 0, -T / num_steps)[:num_steps]).astype(np.int64) - 1
        elif spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64)
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}")
        return [int(t) for t in ts]

    def step_pairs(self, num_steps: int, spacing: str = "trailing") -> list[tuple[int, int]]:
        """(t, t_prev) for every DDIM step: consecutive entries of `timesteps`, the last going to -1 (alpha_bar = 1)."""
        ts = self.timesteps(num_steps, spacing)
        return list(zip(ts, ts[1:] + [-1]))

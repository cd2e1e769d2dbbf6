"""DDIM sampling with x0 clipping, as a small pure function of (denoiser, noise, schedule).

Knows nothing about VAEs, data, DDP or files. Diagnosis watches it through `callback`.
Adapted from Song et al. 2021 ("Denoising Diffusion Implicit Models"), eq. 12 and 16; the step is written
to match diffusers' `DDIMScheduler.step(..., use_clipped_model_output=True)` where that one is correct, but
each step goes to the NEXT timestep actually in the schedule (diffusers uses t - T//n, which for step counts
that do not divide T skips to timesteps the schedule never visits).

Notation: ab_t = alpha_bar_t; sigma_t = eta * sqrt((1-ab_prev)/(1-ab_t)) * sqrt(1 - ab_t/ab_prev)  (eq. 16).
"""
from __future__ import annotations

from typing import Callable

import torch

from model.schedule import NoiseSchedule

# denoise(x_t, t) -> network output in the schedule's prediction type; t is a (B,) long tensor.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def clip_x0(x0: torch.Tensor, mode: str, bound: float, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip predicted x0 (scaled-latent units). Returns (clipped x0, bool mask of entries that were clipped).

    static: |x0| <= bound. dynamic (Saharia et al. 2022, "Imagen", sec. 2.3, adapted to latents): per sample,
    s = max(bound, quantile(|x0|, percentile)); x0 is clamped to [-s, s]. Latents are not in [-1, 1], so we do
    not rescale by s as Imagen does for pixels; `bound` is the floor, so in-range samples are untouched.
    """
    if mode == "none":
        return x0, torch.zeros_like(x0, dtype=torch.bool)
    if mode == "static":
        s = torch.full((x0.shape[0],), float(bound), device=x0.device, dtype=x0.dtype)
    elif mode == "dynamic":
        # quantile needs float32 or float64: upcast half precision only, so a float64 x0 keeps its exact bound
        q = torch.quantile(x0.detach().abs().flatten(1).to(torch.promote_types(x0.dtype, torch.float32)),
                           percentile, dim=1).to(x0.dtype)
        s = torch.clamp(q, min=bound)
    else:
        raise ValueError(f"unknown clip mode {mode!r}")
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    clipped = x0.abs() > s
    return torch.maximum(torch.minimum(x0, s), -s), clipped


def _step_noise(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like x, on x's device, from one generator or one per batch row."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == x.shape[0], f"{len(generator)} generators for a batch of {x.shape[0]}"
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                            for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device,
                       dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddim_sample(denoise: Denoiser, noise: torch.Tensor, schedule: NoiseSchedule, num_steps: int,
                eta: float = 0.0, spacing: str = "trailing", clip: str = "none", clip_bound: float = 4.0,
                clip_percentile: float = 0.995, generator: torch.Generator | list[torch.Generator] | None = None,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Run DDIM from `noise` (= x_T, standard normal) down to x0. Returns the final x0 (after clipping).
    The step noise (eta > 0) comes from `generator`, or from one generator per batch row (a list): each row then
    draws what it would draw sampled alone, so a batch changes no result.

    callback(info) is called once per step with: step, t, t_prev, x_t, output, eps_pred, x0_pred_raw
    (before clipping), x0_pred (after), num_clipped, clip_fraction.
    """
    x = noise
    pairs = schedule.step_pairs(num_steps, spacing)
    for i, (t, t_prev) in enumerate(pairs):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        output = denoise(x, t_batch).to(x.dtype)
        # 1. predicted x0 and eps from the network output (eq. 12's "predicted x0")
        x0_raw, eps = schedule.split_output(output, x, t_batch)
        # 2. clip x0, then re-derive eps from the clipped x0 so that (x_t, x0, eps) stay consistent
        x0, clipped = clip_x0(x0_raw, clip, clip_bound, clip_percentile)
        if clip != "none":
            eps = schedule.eps_from_x0(x0, x, t_batch)
        # 3. variance of the step (eq. 16)
        ab_t = float(schedule.alpha_bar(t))
        ab_prev = float(schedule.alpha_bar(t_prev))
        sigma = eta * ((1 - ab_prev) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_prev) ** 0.5
        # 4. "direction pointing to x_t" and the update (eq. 12)
        direction = (max(1 - ab_prev - sigma ** 2, 0.0)) ** 0.5 * eps
        x_prev = ab_prev ** 0.5 * x0 + direction
        if sigma > 0:
            x_prev = x_prev + sigma * _step_noise(x, generator)
        if callback is not None:
            n = int(clipped.sum())
            callback({"step": i, "t": t, "t_prev": t_prev, "x_t": x, "output": output, "eps_pred": eps,
                      "x0_pred_raw": x0_raw, "x0_pred": x0, "num_clipped": n, "clip_fraction": n / x0.numel()})
        x = x_prev
    return x

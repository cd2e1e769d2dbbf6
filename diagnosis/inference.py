"""Prediction for the sanity check: autoregressive rollout, tensor statistics, per-horizon metrics."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from diagnosis.inputs import Windows
from model.sliding import WindowKey, precision_context, predict_windows
from model.video_prediction_diffusion import VideoPredictionDiffusion
from training.evaluation import frame_metrics
from training.visualize import clip_gif, enlarge, frame_rows, sample_grid, sequence_gif


def tensor_stats(x: torch.Tensor) -> dict:
    """min / max / mean / std over the finite entries, and how many entries are NaN / Inf."""
    x = x.detach().float()
    finite = x[torch.isfinite(x)]
    stats = {"nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}
    if finite.numel():
        stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
                     std=float(finite.std()) if finite.numel() > 1 else 0.0)
    return stats


def window_key(name: str, index: int) -> WindowKey:
    """A window named "<clip>@<first frame>" (diagnosis/inputs.py) -> its seed key, so the sanity check predicts a
    window exactly as tools/evaluate.py and tools/predict.py do; other names key by position."""
    clip, _, start = name.rpartition("@")
    return WindowKey(clip, int(start)) if clip and start.isdigit() else WindowKey(name, index)


@torch.no_grad()
def rollout(model: VideoPredictionDiffusion, net: torch.nn.Module, past_frames: torch.Tensor,
            conds: list[torch.Tensor | None], steps: int | None = None, seed: int = 0,
            names: list[str] | None = None, precision: str = "no") -> dict:
    """Predict len(conds) rounds of t_future frames, each round's prediction fed back as (part of) the next round's
    past, in latent space, through model/sliding.py (noise seeded per window by its name "<clip>@<first frame>").

    past_frames (B, Tp, 3, H, W) in [-1, 1] -> {"frames": (B, R*Tf, 3, H, W), "latents": (B, R*Tf, C, h, w),
    "past_latents": (B, Tp, C, h, w), "seconds": wall time of encode + sampling + decode}."""
    dev = model.vae.device
    start = time.perf_counter()
    B = past_frames.shape[0]
    keys = [window_key(n, b) for b, n in enumerate(names or [f"window{b}" for b in range(B)])]
    cond = None if conds[0] is None else torch.cat([c.reshape(B, -1) for c in conds], dim=1)
    past_frames = past_frames.to(dev)
    with precision_context(dev, precision):
        mean, std = model.vae.encode_moments(past_frames)
        latents = predict_windows(model, net, mean, keys, std, cond, len(conds), steps, seed)
        frames = model.decode_future(latents, past_frames, mean)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"frames": frames.float().cpu(), "latents": latents.float().cpu(), "past_latents": mean.cpu(),
            "seconds": time.perf_counter() - start}


def horizon_metrics(pred: torch.Tensor, truth: torch.Tensor, past: torch.Tensor) -> dict:
    """PSNR (dB) and SSIM per horizon step, averaged over clips, for the prediction and copy-the-last-past-frame,
    on the first truth.shape[1] predicted frames. Non-finite predictions give NaN rows."""
    H = truth.shape[1]
    if H == 0:
        return {}
    rows = {"model": pred[:, :H], "copy_last": past[:, -1:].expand_as(truth)}
    out = {}
    for name, frames in rows.items():
        psnr, ssim = frame_metrics(frames, truth)
        bad = ~torch.isfinite(frames).flatten(2).all(2)  # (B, H): a frame with a NaN has no PSNR
        psnr, ssim = psnr.masked_fill(bad, math.nan), ssim.masked_fill(bad, math.nan)
        out[name] = {"psnr": [round(float(v), 3) for v in psnr.mean(0)],
                     "ssim": [round(float(v), 4) for v in ssim.mean(0)]}
    return out


def save_pictures(windows: Windows, pred: torch.Tensor, out: Path) -> None:
    """grid.png (one row per window) and clip.gif (the first window): past | truth | prediction | error through
    training/visualize.py when the truth covers the prediction; else labelled rows of past, prediction (and the
    truth that exists). Small frames (e.g. 32x32) are enlarged so that the pictures stay readable."""
    Ht, big = windows.truth.shape[1], enlarge
    if Ht == pred.shape[1]:
        sample_grid(big(windows.past), big(windows.truth), {"prediction": big(pred)}, out / "grid.png")
        clip_gif(big(windows.past[0]), big(windows.truth[0]), {"prediction": big(pred[0])}, out / "clip.gif")
        return
    rows = {}
    for b in range(pred.shape[0]):
        rows[f"{b} past"], rows[f"{b} pred"] = windows.past[b], pred[b]
        if Ht:
            rows[f"{b} truth"] = windows.truth[b]
    frame_rows(rows).save(out / "grid.png")
    sequence_gif({"prediction": torch.cat([windows.past[0], pred[0]])}, out / "clip.gif",
                       n_past=windows.past.shape[1])

"""Per-frame scores of a whole clip: every frame predicted from the t_past frames before it (model/sliding.py), PSNR
and SSIM at each horizon that predicts it, next to copying the frame h steps back. What tools/predict.py writes as a
CSV and tools/anomaly.py turns into regularity scores.

Frames are pixels in [-1, 1] at the model's size and frame interval; "frame f" is position f in that sampled clip;
its number in the clip (for names and seeding) is `frame_indices[f]`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.schema import DataConfig
from data import DataError, read_clip_frames, read_cond
from diagnosis.anomaly import patch_psnr
from diagnosis.inputs import source_clip
from model.sliding import by_frame, precision_context, slide
from training.evaluation import frame_metrics


@dataclass
class SourceClip:
    name: str
    frames: torch.Tensor  # (N, 3, H, W) pixels in [-1, 1], every data.frame_interval-th frame of the clip
    frame_indices: list[int]  # (N,) their frame numbers in the clip (0-based)
    frame_cond: torch.Tensor | None  # (N, len(cond_keys)) conditioning values per frame; None = the model has none
    cond_source: str = ""  # "sidecars", "command line", "zeros" or ""


def read_source(path: str | Path, cfg: DataConfig, cond_values: list[float] | None = None) -> SourceClip:
    """A video file or a folder of frames as one clip at the model's size and frame interval. Conditioning values
    (data.cond_keys): `cond_values` for every frame (a counterfactual) when given, else the frames' JSON sidecars,
    else zeros with a warning (videos have no sidecars)."""
    clip = source_clip(path, cfg.frame_glob)
    indices = list(range(0, clip.num_frames, cfg.frame_interval))
    frames = read_clip_frames(clip, indices, cfg)
    cond, source = None, ""
    if cfg.cond_keys:
        K = len(cfg.cond_keys)
        if cond_values is not None:
            if len(cond_values) != K:
                raise DataError(f"--cond gives {len(cond_values)} values; the model's cond_keys are {cfg.cond_keys}")
            cond, source = torch.tensor(cond_values, dtype=torch.float32).expand(len(indices), K).clone(), "command line"
        elif clip.kind == "frames":
            cond, source = torch.stack([read_cond(clip, i, cfg) for i in indices]), "sidecars"
        else:
            warnings.warn(f"{path}: a video has no sidecars for cond_keys {cfg.cond_keys}; zeros are used "
                          "(give values on the command line)", stacklevel=2)
            cond, source = torch.zeros(len(indices), K), "zeros"
    return SourceClip(clip.name, frames, indices, cond, source)


@dataclass
class ClipScores:
    name: str
    frame_indices: list[int]  # (N,)
    psnr: torch.Tensor  # (N, H): PSNR (dB) of frame f predicted at horizon h+1; NaN where no window predicts it
    ssim: torch.Tensor  # (N, H)
    copy_psnr: torch.Tensor  # (N, H): PSNR of frame f - (h+1) taken as frame f (copy-last at that horizon); NaN before
    patch_psnr: torch.Tensor  # (N, H): as psnr, of the worst patch of the frame (diagnosis/anomaly.patch_psnr)
    copy_patch_psnr: torch.Tensor  # (N, H): as copy_psnr, of the worst patch
    predictions: torch.Tensor | None  # (N, 3, H', W') frame f as predicted at horizon `kept` (NaN where none)
    kept: int  # that horizon (1-based); 0 = predictions not kept

    @property
    def psnr_t1(self) -> torch.Tensor:
        return self.psnr[:, 0]

    @property
    def psnr_mean(self) -> torch.Tensor:
        """(N,) mean PSNR over the horizons that predict each frame (NaN where none does)."""
        return self.psnr.nanmean(1)


def copy_last_psnr(frames: torch.Tensor, horizons: int, patch: int = 0) -> torch.Tensor:
    """(N, 3, H, W) -> (N, horizons): PSNR of frame f - h as a prediction of frame f, h = 1 .. horizons; patch > 0:
    of the worst patch x patch window (diagnosis/anomaly.patch_psnr)."""
    N = frames.shape[0]
    out = torch.full((N, horizons), float("nan"))
    for h in range(1, min(horizons, N - 1) + 1):
        out[h:, h - 1] = (patch_psnr(frames[:N - h], frames[h:], patch) if patch else
                          frame_metrics(frames[None, :N - h], frames[None, h:])[0][0])
    return out


@torch.no_grad()
def score_clip(model, net, clip: SourceClip, rounds: int = 1, batch_size: int = 16, steps: int | None = None,
               seed: int = 0, sample: int = 0, keep: int = 0, precision: str = "no", progress=None,
               patch: int = 16) -> ClipScores:
    """Predict every frame of `clip` from the t_past before it (every window, `rounds` * t_future horizons) and score
    each prediction against the frame (and its worst `patch` x `patch` window, pixels). keep = h > 0 also returns the
    frames as predicted at horizon h."""
    Tp, H = model.t_past, rounds * model.t_future
    N = clip.frames.shape[0]
    if N <= Tp:
        raise DataError(f"{clip.name}: {N} frames; predicting needs more than t_past = {Tp}")
    if not 0 <= keep <= H:
        raise ValueError(f"keep={keep} is not a horizon in 1 .. {H}")
    starts, psnr_w, ssim_w, patch_w = [], [], [], []
    kept = torch.full((N, *clip.frames.shape[1:]), float("nan")) if keep else None
    with precision_context(model.vae.device, precision):
        for batch in slide(model, net, clip.frames, clip.name, frame_indices=clip.frame_indices,
                           frame_cond=clip.frame_cond, rounds=rounds, batch_size=batch_size, steps=steps, seed=seed,
                           sample=sample, progress=progress):
            targets = torch.tensor([[min(s + Tp + h, N - 1) for h in range(H)] for s in batch.starts])  # (B, H)
            inside = torch.tensor([[s + Tp + h < N for h in range(H)] for s in batch.starts])
            pred = batch.frames.float().cpu()
            psnr, ssim = frame_metrics(pred, clip.frames[targets])
            psnr_w.append(psnr.masked_fill(~inside, float("nan")))
            ssim_w.append(ssim.masked_fill(~inside, float("nan")))
            patch_w.append(patch_psnr(pred, clip.frames[targets], patch).masked_fill(~inside, float("nan")))
            starts += batch.starts
            if keep:
                for i, s in enumerate(batch.starts):
                    if s + Tp + keep - 1 < N:
                        kept[s + Tp + keep - 1] = pred[i, keep - 1]
    return ClipScores(clip.name, clip.frame_indices, by_frame(starts, torch.cat(psnr_w), N, Tp),
                      by_frame(starts, torch.cat(ssim_w), N, Tp), copy_last_psnr(clip.frames, H),
                      by_frame(starts, torch.cat(patch_w), N, Tp), copy_last_psnr(clip.frames, H, patch), kept, keep)

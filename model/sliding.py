"""Sliding-window prediction: windows of t_past frames of a clip -> their next frames at horizons 1 .. rounds * t_future.

The one place that knows how a window is seeded and rolled out. The trainer's evaluation (training/evaluation.py),
the sanity script (diagnosis/inference.py), tools/evaluate.py, tools/predict.py and tools/anomaly.py all call it, so
one checkpoint gives one number in every tool (DESIGN, "Using a trained model"). It lives in model/ because it is a
function of the model alone: no files, no metrics, no DDP.

Seeding: every window owns a generator seeded by (seed, clip name, the clip's frame index of its first past frame,
sample k). Its draws, in order: the posterior noise of the past latents (vae.latent = sample only), then x_T of round
1, 2, ... (and, with sampler.eta > 0, each round's step noise, drawn per window inside the batched call). So neither
batch size, nor sharding, nor which other windows are predicted, nor the number of rounds changes a window's
prediction.

Spaces: frames are pixels in [-1, 1]; latents are scaled VAE latents. Horizon h (1-based) is the frame h steps after
the window's last past frame; rounds > 1 feed predicted latents back as past (never re-encoded).
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from model.video_prediction_diffusion import VideoPredictionDiffusion


@dataclass(frozen=True)
class WindowKey:
    clip: str  # clip name
    start: int  # the clip's own frame index of the window's first past frame


def window_seed(seed: int, key: WindowKey, sample: int = 0) -> int:
    """A 63-bit seed from (seed, clip, start, sample): stable across processes (sha256, not Python's hash)."""
    digest = hashlib.sha256(f"{seed}|{key.clip}|{key.start}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def precision_context(device: torch.device | str, precision: str):
    """The one precision switch of evaluation and the tools, train.mixed_precision's values: "bf16" = bf16 autocast on
    CUDA (what the trainer trains and evaluates under), "no" = fp32. CPU is fp32 either way."""
    if precision not in ("bf16", "no"):
        raise ValueError(f"precision {precision!r} is not 'bf16' or 'no'")
    if torch.device(device).type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_windows(model: VideoPredictionDiffusion, net: torch.nn.Module, past_mean: torch.Tensor,
                    keys: Sequence[WindowKey], past_std: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                    rounds: int = 1, steps: int | None = None, seed: int = 0, sample: int = 0) -> torch.Tensor:
    """Past latents (B, Tp, C, h, w) (posterior means, with `past_std` for vae.latent = sample) -> predicted latents
    (B, rounds * Tf, C, h, w). `cond` (B, rounds * cond_dim), frame-major over the predicted frames, or None."""
    B, Tp = past_mean.shape[:2]
    assert Tp == model.t_past and len(keys) == B, f"past {tuple(past_mean.shape)}, {len(keys)} keys"
    assert cond is None or cond.shape == (B, rounds * model.cfg.cond_dim), f"cond {tuple(cond.shape)}"
    gens = [torch.Generator().manual_seed(window_seed(seed, k, sample)) for k in keys]
    past = torch.cat([model.vae.latents_from_moments(past_mean[b:b + 1], None if past_std is None else
                                                     past_std[b:b + 1], generator=g) for b, g in enumerate(gens)])
    # one batched call per round; each window draws x_T and (eta > 0) its step noise from its own generator
    per_round = model.cfg.cond_dim
    context, preds = past, []
    for r in range(rounds):
        c = None if cond is None or per_round == 0 else cond[:, r * per_round:(r + 1) * per_round]
        pred = model.predict_latents(context, None if c is None else c.to(context.device), steps=steps,
                                     generator=gens, net=net)
        preds.append(pred)
        context = torch.cat([context, pred], dim=1)[:, -Tp:]
    return torch.cat(preds, dim=1)


# ---------------------------------------------------------------- whole clips

def window_starts(num_frames: int, t_past: int) -> list[int]:
    """Positions of every window whose first predicted frame lies in a clip of `num_frames` frames."""
    return list(range(max(num_frames - t_past, 0)))


def window_cond(frame_cond: torch.Tensor | None, start: int, t_past: int, horizon: int) -> tuple[torch.Tensor, bool]:
    """Conditioning values of a window's predicted frames, frame-major (horizon * K,), from per-frame values
    frame_cond (N, K); frames past the clip's end get zeros (the bool says whether any did)."""
    K = frame_cond.shape[1]
    part = frame_cond[start + t_past:start + t_past + horizon]
    missing = horizon - part.shape[0]
    if missing:
        part = torch.cat([part, torch.zeros(missing, K, dtype=part.dtype)])
    return part.reshape(-1), missing > 0


@dataclass
class SlideBatch:
    starts: list[int]  # positions (into the frames given) of each window's first past frame
    latents: torch.Tensor  # (B, H, C, h, w) predicted latents, horizon 1 .. H
    frames: torch.Tensor | None  # (B, H, 3, H', W') decoded predictions (None with decode=False)


@torch.no_grad()
def slide(model: VideoPredictionDiffusion, net: torch.nn.Module, frames: torch.Tensor, clip: str,
          frame_indices: Sequence[int] | None = None, starts: Sequence[int] | None = None,
          frame_cond: torch.Tensor | None = None, rounds: int = 1, batch_size: int = 16, steps: int | None = None,
          seed: int = 0, sample: int = 0, decode: bool = True, moments: tuple | None = None,
          progress=None) -> Iterator[SlideBatch]:
    """Predict every window of a whole clip, `batch_size` windows per model call.

    frames (N, 3, H, W) in [-1, 1] (the clip's frames at the model's frame interval); frame_indices (N,): their
    frame numbers in the clip, for seeding (default 0 .. N-1); starts: which windows (default `window_starts`);
    frame_cond (N, len(cond_keys)): per-frame conditioning values (None: the model has none; zeros past the end);
    moments: precomputed (mean, std) latents of `frames` (else encoded here, once per frame); progress: a tqdm
    bar to advance by windows. Yields SlideBatch in window order."""
    N = frames.shape[0]
    Tp, H = model.t_past, rounds * model.t_future
    dev = model.vae.device
    frame_indices = list(range(N)) if frame_indices is None else [int(i) for i in frame_indices]
    starts = window_starts(N, Tp) if starts is None else list(starts)
    assert len(frame_indices) == N and all(0 <= s <= N - Tp for s in starts), "windows outside the clip"
    if model.cfg.cond_dim and frame_cond is None:
        raise ValueError(f"the model takes a conditioning vector ({model.cfg.data.cond_keys}); give frame_cond")
    mean, std = moments if moments is not None else model.vae.encode_moments(frames[None].to(dev))
    mean, std = mean.reshape(N, *mean.shape[-3:]), None if std is None else std.reshape(N, *std.shape[-3:])
    padded = False
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        past_mean = torch.stack([mean[s:s + Tp] for s in chunk]).to(dev)
        past_std = None if std is None else torch.stack([std[s:s + Tp] for s in chunk]).to(dev)
        cond = None
        if model.cfg.cond_dim:
            parts = [window_cond(frame_cond, s, Tp, H) for s in chunk]
            cond, padded = torch.stack([p for p, _ in parts]).to(dev), padded or any(m for _, m in parts)
        keys = [WindowKey(clip, frame_indices[s]) for s in chunk]
        latents = predict_windows(model, net, past_mean, keys, past_std, cond, rounds, steps, seed, sample)
        decoded = None
        if decode:
            past_frames = torch.stack([frames[s:s + Tp] for s in chunk]).to(dev)
            decoded = model.decode_future(latents, past_frames, past_mean)
        if progress is not None:
            progress.update(len(chunk))
        yield SlideBatch(chunk, latents, decoded)
    if padded:
        warnings.warn(f"{clip}: windows near the end predict frames past the clip; their conditioning values are "
                      "zeros", stacklevel=2)


def by_frame(starts: Sequence[int], values: torch.Tensor, num_frames: int, t_past: int) -> torch.Tensor:
    """Per-window values (W, H, ...) at horizons 1 .. H -> per-frame values (num_frames, H, ...): entry [f, h-1] is
    what the window starting at f - t_past - (h-1) predicted for frame f; NaN where no window predicts it."""
    W, H = values.shape[:2]
    out = torch.full((num_frames, H, *values.shape[2:]), float("nan"), dtype=values.dtype)
    for w, s in enumerate(starts):
        for h in range(H):
            f = s + t_past + h
            if f < num_frames:
                out[f, h] = values[w, h]
    return out

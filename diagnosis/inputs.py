"""Frames to test a model on: validation windows read through the data pipeline, or a folder of frames / a video.

Both give `Windows`: past frames, the true continuation where it exists, and the conditioning vectors, all as the
data pipeline produces them (pixels in [-1, 1], (B, T, 3, H, W)).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from configs.schema import DataConfig
from data import Clip, DataError, VideoWindowDataset, list_frames, split_as_trained, spread
from data.clips import IMAGE_EXTENSIONS
from data.dataset import read_clip_frames
from data.video import VIDEO_EXTENSIONS, count_frames

# frames (B, T, 3, H, W) -> frames: applied to what the data pipeline returns, before anything else sees it.
PixelTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Windows:
    past: torch.Tensor  # (B, Tp, 3, H, W) pixels in [-1, 1]
    truth: torch.Tensor  # (B, Ht, 3, H, W) the frames that follow (Ht may be 0: nothing to compare with)
    cond: torch.Tensor | None  # (B, len(cond_keys) * Ht) frame-major over the truth frames; None = no cond keys
    names: list[str]  # "<clip>@<first frame index>"
    source: str  # "val split of <root>" or the folder / video given

    @property
    def frames(self) -> torch.Tensor:
        """past and truth together, (B, Tp + Ht, 3, H, W)."""
        return torch.cat([self.past, self.truth], dim=1)


def val_windows(cfg: DataConfig, n: int, horizon: int, pixel_transform: PixelTransform | None = None) -> Windows:
    """n windows of t_past + `horizon` frames from the validation split (the training split when there is none),
    spread over it. The horizon shrinks (in steps of t_future) when no clip is long enough for it.

    `pixel_transform` is applied to the frames the pipeline returns; None = the pipeline as is. (Hook for code that
    post-processes the pipeline's output, and for tests that plant a normalisation bug there.)"""
    splits = split_as_trained(cfg)  # as the trainer split them
    clips, source = ((splits.val, f"val split of {cfg.root}") if splits.val else
                     (splits.train, f"{cfg.root} (no val split: training clips)"))
    for h in range(horizon, 0, -1):
        if h != horizon and h % cfg.t_future:
            continue
        try:
            dataset = VideoWindowDataset(clips, dataclasses.replace(cfg, t_future=h))
        except DataError:  # every clip is too short for this horizon
            continue
        if len(dataset):
            break
    else:
        raise DataError(f"no clip in {source} has the {cfg.t_past + cfg.t_future} frames one window needs")
    items = [dataset[i] for i in spread(len(dataset), n)]
    frames = torch.stack([it["frames"] for it in items])
    if pixel_transform is not None:
        frames = pixel_transform(frames)
    cond = torch.stack([it["cond"] for it in items]) if cfg.cond_keys else None
    names = [f"{it['clip']}@{int(it['frame_indices'][0])}" for it in items]
    return Windows(frames[:, :cfg.t_past], frames[:, cfg.t_past:], cond, names, source)


def source_clip(path: str | Path, frame_glob: str = "*") -> Clip:
    """A folder of frames or a video file as one clip."""
    path = Path(path)
    if path.is_dir():
        frames = list_frames(path, frame_glob)
        if not frames:
            raise DataError(f"{path} holds no frames matching {frame_glob!r} ({', '.join(IMAGE_EXTENSIONS)})")
        return Clip(path.name, "frames", path, frames, len(frames))
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        return Clip(path.stem, "video", path, (), count_frames(path))
    raise DataError(f"{path} is neither a folder of frames nor a video file ({', '.join(VIDEO_EXTENSIONS)})")


def file_windows(path: str | Path, cfg: DataConfig, n: int, horizon: int) -> Windows:
    """Windows from one folder of frames or video (every cfg.frame_interval-th frame): the last n non-overlapping
    windows of t_past + `horizon` frames when it is long enough (the truth is known), else the last t_past frames
    alone (prediction only). No sidecars are read: a model with a conditioning vector gets zeros (a warning says so)."""
    clip = source_clip(path, cfg.frame_glob)
    step = cfg.frame_interval
    sampled = list(range(clip.num_frames))[::-1][::step][::-1]  # every step-th frame, ending at the last one
    span = cfg.t_past + horizon
    if len(sampled) >= span:
        count = min(n, len(sampled) // span)
        starts = [len(sampled) - span * (k + 1) for k in range(count)][::-1]
        windows = [sampled[s:s + span] for s in starts]
    elif len(sampled) >= cfg.t_past:
        windows = [sampled[-cfg.t_past:]]
    else:
        raise DataError(f"{path} has {len(sampled)} frames (interval {step}); the model needs {cfg.t_past} past frames")
    frames = torch.stack([read_clip_frames(clip, w, cfg) for w in windows])
    cond = None
    if cfg.cond_keys:
        warnings.warn(f"the model takes a conditioning vector ({cfg.cond_keys}); frames from {path} have none, so "
                      "zeros are used", stacklevel=2)
        cond = torch.zeros(len(windows), len(cfg.cond_keys) * (frames.shape[1] - cfg.t_past))
    names = [f"{clip.name}@{w[0]}" for w in windows]
    return Windows(frames[:, :cfg.t_past], frames[:, cfg.t_past:], cond, names, str(path))


def cond_rounds(windows: Windows, cfg: DataConfig, rounds: int) -> list[torch.Tensor | None]:
    """The conditioning vector of each autoregressive round (t_future frames each): from the windows' sidecars where
    known, zeros beyond (with a warning). [None] * rounds for a model without one."""
    if not cfg.cond_keys:
        return [None] * rounds
    per_round = len(cfg.cond_keys) * cfg.t_future
    cond = windows.cond if windows.cond is not None else torch.zeros(windows.past.shape[0], 0)
    out = []
    for k in range(rounds):
        part = cond[:, k * per_round:(k + 1) * per_round]
        if part.shape[1] < per_round:
            warnings.warn(f"round {k + 1}: no conditioning values known for these frames; zeros used", stacklevel=2)
            part = torch.zeros(cond.shape[0], per_round)
        out.append(part)
    return out

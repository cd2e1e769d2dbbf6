"""Pixels and conditioning vectors of windows: the torch Dataset over the window index."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from configs.schema import DataConfig
from data.clips import Clip
from data.errors import DataError
from data.pixels import pil_to_frames
from data.sidecar import read_sidecar_values
from data.video import read_video_frames
from data.windows import Window, build_windows


def read_image(path, cfg: DataConfig) -> torch.Tensor:
    """One image file -> (3, H, W) float32 in [-1, 1]; modes RGB, L and P, others as data.convert_modes says."""
    try:
        with Image.open(path) as img:
            return pil_to_frames(img, cfg.height, cfg.width, cfg.resize_mode, cfg.convert_modes)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def read_clip_frames(clip: Clip, indices: Sequence[int], cfg: DataConfig) -> torch.Tensor:
    """Frames `indices` of a clip, resized to cfg.height x cfg.width -> (n, 3, H, W) float32 in [-1, 1]."""
    bad = [i for i in indices if not 0 <= i < clip.num_frames]
    if bad:
        raise DataError(f"{clip.path}: frame indices {bad[:5]} out of range for a clip of {clip.num_frames} frames")
    if not len(indices):
        return torch.empty(0, 3, cfg.height, cfg.width)
    if clip.kind == "frames":
        frames = [read_image(clip.frames[i], cfg) for i in indices]
    else:
        frames = [pil_to_frames(Image.fromarray(a), cfg.height, cfg.width, cfg.resize_mode)
                  for a in read_video_frames(clip.path, indices)]
    return torch.stack(frames)  # (n, 3, H, W)


def read_cond(clip: Clip, frame_index: int, cfg: DataConfig) -> torch.Tensor:
    """The sidecar values of cfg.cond_keys for one frame -> (len(cond_keys),) float32."""
    if not cfg.cond_keys:
        return torch.zeros(0)
    if clip.kind != "frames":
        raise DataError(f"{clip.path}: data.cond_keys {cfg.cond_keys} need per-frame JSON sidecars, which video clips "
                        f"do not have; extract the video to a folder of frames with sidecars beside them")
    values = read_sidecar_values(clip.frames[frame_index], clip.path, cfg.sidecar_dir, cfg.cond_keys)
    return torch.tensor(values, dtype=torch.float32)


class VideoWindowDataset(Dataset):
    """Windows of t_past + t_future frames. Item: {"frames": (T, 3, H, W) float32 in [-1, 1],
    "cond": (len(cond_keys) * t_future,) float32, frame-major over the FUTURE frames ((0,) without cond keys),
    "clip": clip name, "index": window index, "frame_indices": (T,) int64 frame indices into the clip}."""

    def __init__(self, clips: Sequence[Clip], cfg: DataConfig, windows: list[Window] | None = None):
        self.clips = list(clips)
        self.cfg = cfg
        self.windows = build_windows(self.clips, cfg) if windows is None else windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        window = self.windows[index]
        clip = self.clips[window.clip]
        frames = read_clip_frames(clip, window.frames, self.cfg)
        future = window.frames[self.cfg.t_past:]
        if self.cfg.cond_keys:
            cond = torch.cat([read_cond(clip, i, self.cfg) for i in future])
        else:
            cond = torch.zeros(0)
        assert frames.shape == (self.cfg.window_frames, 3, self.cfg.height, self.cfg.width), frames.shape
        return {"frames": frames, "cond": cond, "clip": clip.name, "index": index,
                "frame_indices": torch.tensor(window.frames, dtype=torch.int64)}

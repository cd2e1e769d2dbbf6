"""The window index: which frames of which clip form each (past + future) training example. Knows no pixels."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

from configs.schema import DataConfig
from data.clips import Clip
from data.errors import DataError


@dataclass(frozen=True)
class Window:
    clip: int  # index into the clip list the windows were built from
    frames: tuple[int, ...]  # t_past + t_future frame indices into that clip, increasing by frame_interval


def spread(total: int, n: int) -> list[int]:
    """n indices evenly spread over range(total), first and last included (fixed, comparable picks of windows)."""
    n = min(n, total)
    return [round(i * (total - 1) / max(n - 1, 1)) for i in range(n)] if n > 1 else [0][:n]


def window_span(cfg: DataConfig) -> int:
    """Frames of a clip one window covers: (t_past + t_future - 1) * frame_interval + 1."""
    return (cfg.window_frames - 1) * cfg.frame_interval + 1


def clip_windows(num_frames: int, cfg: DataConfig) -> list[tuple[int, ...]]:
    """Frame indices of every window of a clip of `num_frames` frames; starts every window_stride sampled frames."""
    span, step = window_span(cfg), cfg.window_stride * cfg.frame_interval
    return [tuple(range(start, start + span, cfg.frame_interval)) for start in range(0, num_frames - span + 1, step)]


def build_windows(clips: Sequence[Clip], cfg: DataConfig) -> list[Window]:
    """All windows of all clips, clip-major. A clip shorter than one window is an error naming it
    (cfg.bad_data == "skip": a warning, and it gives no windows). Works for anything with `.num_frames` and `.path`."""
    windows: list[Window] = []
    short: list[str] = []
    span = window_span(cfg)
    for i, clip in enumerate(clips):
        per_clip = clip_windows(clip.num_frames, cfg)
        if not per_clip:
            short.append(f"{clip.path}: {clip.num_frames} frames, a window needs {span} "
                         f"((t_past + t_future - 1) * frame_interval + 1 = ({cfg.t_past} + {cfg.t_future} - 1) * "
                         f"{cfg.frame_interval} + 1)")
        windows.extend(Window(i, frames) for frames in per_clip)
    if short:
        msg = f"{len(short)} clip(s) too short for one window:\n  " + "\n  ".join(short)
        if cfg.bad_data != "skip":
            raise DataError(msg)
        warnings.warn(msg + "\nskipped (data.bad_data=skip)", stacklevel=2)
    if clips and not windows:
        raise DataError(f"no windows: every one of the {len(clips)} clip(s) is shorter than {span} frames")
    return windows

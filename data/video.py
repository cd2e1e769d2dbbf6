"""Video files (mp4/avi/mov/mkv/webm/gif) through PyAV: frame count and frames by index, in order."""
from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

try:
    import av
except ImportError:  # frame folders need no PyAV; opening a video file says what to install
    av = None

from data.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


@dataclass(frozen=True)
class VideoIndex:
    """Presentation timestamps of every frame (sorted) and of the keyframes, from one demux pass (no decoding)."""

    num_frames: int
    pts: tuple[int, ...] | None  # frame i has pts[i]; None when the container lacks timestamps (then: no seeking)
    keyframe_pts: tuple[int, ...]


def _open(path: Path):
    if av is None:
        raise DataError(f"{path}: reading video files needs PyAV (pip install av, as in requirements.txt)")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot open video ({e})") from None


@functools.lru_cache(maxsize=256)
def _index_cached(path: str, mtime_ns: int, size: int) -> VideoIndex:
    pts: list[int | None] = []
    keys: list[int] = []
    with _open(Path(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # flush packets; frames an edit list drops
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe and packet.pts is not None:
                    keys.append(packet.pts)
        except av.FFmpegError as e:
            raise DataError(f"{path}: cannot demux video ({e})") from None
    if not pts:
        raise DataError(f"{path}: video has no frames")
    timed = all(p is not None for p in pts) and len(set(pts)) == len(pts)
    return VideoIndex(len(pts), tuple(sorted(pts)) if timed else None, tuple(sorted(keys)))


def video_index(path: str | Path) -> VideoIndex:
    """The frame index of a video file, cached per process (keyed by path, mtime and size)."""
    st = os.stat(path)
    return _index_cached(str(path), st.st_mtime_ns, st.st_size)


def count_frames(path: str | Path) -> int:
    """Number of frames (packets of the first video stream; checked against a full decode in the tests)."""
    return video_index(path).num_frames


def iter_video_frames(path: str | Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode frames start .. stop-1 in order as (index, uint8 (H, W, 3) RGB), seeking to the keyframe before `start`."""
    path = Path(path)
    index = video_index(path)
    stop = index.num_frames if stop is None else min(stop, index.num_frames)
    if start >= stop:
        return
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        position = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
        seeked = False
        if position is not None and start > 0:
            k = bisect.bisect_right(index.keyframe_pts, index.pts[start]) - 1
            if k >= 0 and index.keyframe_pts[k] > index.pts[0]:  # only when it skips something
                container.seek(index.keyframe_pts[k], stream=stream, backward=True, any_frame=False)
                seeked = True
        count = 0
        try:
            for frame in container.decode(stream):
                if position is not None and frame.pts is not None:
                    i = position.get(frame.pts)
                    if i is None:
                        raise DataError(f"{path}: decoded a frame with pts {frame.pts} that the demuxer did not list")
                elif seeked:
                    raise DataError(f"{path}: decoded a frame without a timestamp after seeking")
                else:
                    i = count  # no timestamps: frames are numbered in decode order from the start
                count += 1
                if i < start:
                    continue
                if i >= stop:
                    break
                yield i, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise DataError(f"{path}: cannot decode video ({e})") from None


def read_video_frames(path: str | Path, indices: Sequence[int]) -> list[np.ndarray]:
    """Frames at `indices` (any order, repeats allowed) as uint8 (H, W, 3) RGB, decoding each GOP once."""
    if not len(indices):
        return []
    num_frames = count_frames(path)
    bad = [i for i in indices if not 0 <= i < num_frames]
    if bad:
        raise DataError(f"{path}: frame indices {bad[:5]} out of range for a video of {num_frames} frames")
    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    for i, array in iter_video_frames(path, min(wanted), max(wanted) + 1):
        if i in wanted:
            got[i] = array
    missing = sorted(wanted - got.keys())
    if missing:
        raise DataError(f"{path}: could not decode frames {missing[:10]} (the file may be truncated)")
    return [got[i] for i in indices]

"""Clip discovery: which clips live under `data.root`, and their frames in order."""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from configs.schema import DataConfig
from data.errors import DataError
from data.video import VIDEO_EXTENSIONS, count_frames

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # .tif: UCSD Ped1/Ped2's own release


@dataclass(frozen=True)
class Clip:
    """One clip: a folder of frames or a video file. Frame i is `frames[i]` (kind "frames") or video frame i."""

    name: str  # unique among the discovered clips; names a segment "<source>@<first frame>" after a bad-data split
    kind: str  # "frames" | "video"
    path: Path  # the clip folder, or the video file
    frames: tuple[Path, ...] = ()  # frame files in order (kind "frames"); empty for videos
    num_frames: int = 0
    source: str = ""  # the clip this one was cut from (bad-data segments); "" = itself. The split groups by it.

    def __post_init__(self):
        if self.kind not in ("frames", "video"):
            raise ValueError(f"Clip.kind {self.kind!r} is not 'frames' or 'video'")
        if self.kind == "frames" and len(self.frames) != self.num_frames:
            raise ValueError(f"Clip {self.name}: {len(self.frames)} frame paths but num_frames={self.num_frames}")

    @property
    def source_name(self) -> str:
        return self.source or self.name


def natural_key(text: str) -> list:
    """Sort key with digit runs compared as numbers: frame2 < frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def list_frames(clip_dir: Path, frame_glob: str) -> tuple[Path, ...]:
    """Image files matching `frame_glob` under `clip_dir`, naturally sorted by their path relative to it."""
    # hidden files are not frames: macOS archives carry "._001.tif" resource forks beside each frame
    found = [p for p in clip_dir.glob(frame_glob)
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return tuple(sorted(found, key=lambda p: natural_key(p.relative_to(clip_dir).as_posix())))


def discover_clips(cfg: DataConfig) -> list[Clip]:
    """Every clip under cfg.root, sorted by name: sub-folders (frames `cfg.frame_glob` inside) and video files.

    Hidden entries (".name") are ignored. A clip folder without frames or an unreadable video is an error naming
    it; with cfg.bad_data == "skip" it is a warning and the entry is left out.
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder")
    clips: list[Clip] = []
    empty: list[Path] = []
    unreadable: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            frames = list_frames(entry, cfg.frame_glob)
            if frames:
                clips.append(Clip(entry.name, "frames", entry, frames, len(frames)))
            else:
                empty.append(entry)
        elif entry.suffix.lower() in VIDEO_EXTENSIONS:
            try:
                clips.append(Clip(entry.name, "video", entry, (), count_frames(entry)))
            except DataError as e:
                unreadable.append(str(e))
    unusable = [f"{p}: no frames matching data.frame_glob={cfg.frame_glob!r} ({', '.join(IMAGE_EXTENSIONS)})"
                for p in empty] + unreadable
    if unusable:
        msg = f"{len(unusable)} unusable clip(s) under {root}:\n  " + "\n  ".join(unusable)
        if cfg.bad_data != "skip":
            raise DataError(msg)
        warnings.warn(msg + "\nskipped (data.bad_data=skip)", stacklevel=2)
    if not clips:
        raise DataError(f"data.root {root} holds no clips: no sub-folders with frames matching "
                        f"{cfg.frame_glob!r} and no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return clips


def clips_fingerprint(clips: list[Clip]) -> str:
    """A short hash of clip names, frame files (name, size, mtime) and lengths: changes when the data on disk does."""
    h = hashlib.sha256()
    for clip in clips:
        h.update(f"{clip.name}|{clip.kind}|{clip.num_frames}\n".encode())
        for p in clip.frames or (clip.path,):
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]

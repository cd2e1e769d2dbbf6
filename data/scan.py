"""The scan before training: decode every frame, list every bad path with its reason, apply `data.bad_data`.

Policy with bad_data = "skip" (decided here, once, from the files alone, so every rank agrees): a frame clip is
cut at each bad frame and each gap in its numbering into runs of good consecutive frames; runs long enough for one
window are kept as clips named "<clip>@<first frame index>" (their `source` is the original clip, so the split
keeps them on one side); shorter runs are dropped. A video with any problem is dropped whole. The bad fraction
(bad frames + frames of dropped videos, over all frames) above data.max_bad_fraction aborts.

The report names the first LISTED problems and counts all of them by kind; `python -m data.scan CONFIG [--set ...]`
scans a config's data and lists every one.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from configs.loader import ConfigError, load_config
from configs.schema import DataConfig
from data.clips import Clip, discover_clips
from data.errors import DataError
from data.pixels import mode_problem
from data.sidecar import read_sidecar_values
from data.video import iter_video_frames
from data.windows import window_span

_INLINE_BELOW = 256  # frames: fewer are scanned in this process (a pool costs more than it saves)
LISTED = 20  # problems named in a report's text; all of them are counted by kind


@dataclass(frozen=True)
class Problem:
    path: str  # the bad file (frame, sidecar or video), or the clip folder for gaps and short clips
    reason: str
    clip: int  # index into the scanned clip list
    frame: int | None  # the bad frame's index in its clip; None for clip-level problems (gap, short clip, video)
    kind: str = ""  # what the reason says in a few words ("corrupt or truncated image", ...): the report counts by it


@dataclass
class ScanReport:
    num_clips: int
    num_frames: int
    problems: list[Problem] = field(default_factory=list)
    bad_frames: dict[int, set[int]] = field(default_factory=dict)  # clip index -> bad frame indices (frame clips)
    gaps: dict[int, list[int]] = field(default_factory=dict)  # clip index -> frame i such that a gap precedes it
    bad_clips: set[int] = field(default_factory=set)  # clips unusable as a whole (videos that fail)
    num_bad: int = 0  # bad frames, counting every frame of a bad video

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / max(self.num_frames, 1)

    def __str__(self) -> str:
        return self.text(LISTED)

    def text(self, listed: int | None = None) -> str:
        """The summary, problem counts by kind, and the first `listed` problems (None: all of them)."""
        head = (f"scan: {self.num_clips} clips, {self.num_frames} frames, {len(self.problems)} problem(s), "
                f"{self.num_bad} bad frame(s) ({100 * self.bad_fraction:.2f}%)")
        if not self.problems:
            return head
        counts = Counter(p.kind or "other" for p in self.problems)
        lines = [head, "by kind: " + ", ".join(f"{kind} {n}" for kind, n in counts.most_common())]
        shown = self.problems if listed is None else self.problems[:listed]
        lines += [f"{p.path}: {p.reason}" for p in shown]
        if len(shown) < len(self.problems):
            lines.append(f"... and {len(self.problems) - len(shown)} more (python -m data.scan CONFIG lists all)")
        return "\n  ".join(lines)


def _check_image(path: str, clip_dir: str, sidecar_dir: str, cond_keys: list[str], convert_modes: str = "off"):
    """(size or None, [(path, kind, reason), ...]) for one frame file: fully decoded, mode checked, sidecar read."""
    problems: list[tuple[str, str, str]] = []
    size = None
    try:
        if os.path.getsize(path) == 0:
            problems.append((path, "empty file", "empty file (0 bytes)"))
        else:
            with Image.open(path) as img:
                img.load()  # full decode: truncated data raises here (ImageFile.LOAD_TRUNCATED_IMAGES is off)
                size = img.size
                if (problem := mode_problem(img.mode, convert_modes)) is not None:
                    problems.append((path, f"image mode {img.mode}", problem))
    except UnidentifiedImageError:
        problems.append((path, "unreadable image", "not a readable image (unknown format or random bytes)"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.append((path, "corrupt or truncated image", f"corrupt or truncated image ({e})"))
    if cond_keys:
        try:
            read_sidecar_values(Path(path), Path(clip_dir), sidecar_dir, cond_keys)
        except DataError as e:
            problems.append((path, "sidecar", f"sidecar: {e}"))
    return size, problems


def _check_video(path: str, num_frames: int):
    problems: list[tuple[str, str, str]] = []
    count, sizes = 0, Counter()
    try:
        for _, array in iter_video_frames(path):
            count += 1
            sizes[array.shape[:2]] += 1
    except DataError as e:
        problems.append((path, "video decode failed",
                         f"decode failed after {count} frame(s): {str(e).removeprefix(path + ': ')}"))
    else:
        if count != num_frames:
            problems.append((path, "video frame count", f"decoded {count} frames, the container lists {num_frames}"))
        if len(sizes) > 1:
            problems.append((path, "video frame sizes vary", f"frame sizes vary: {dict(sizes)}"))
    return None, problems


def _run(task):
    kind, args = task
    return _check_image(*args) if kind == "image" else _check_video(*args)


def _trailing_int(stem: str) -> int | None:
    m = re.search(r"(\d+)$", stem)
    return int(m.group(1)) if m else None


def _find_gaps(frames: tuple[Path, ...]) -> list[tuple[int, int]]:
    """(i, missing count) for each frame i whose number jumps from frame i-1 by more than the clip's usual step.
    Only for clips whose stems all end in distinct integers; the step is the most common difference (ties: smallest),
    so sequences saved every k-th frame are not flagged."""
    numbers = [_trailing_int(p.stem) for p in frames]
    if len(numbers) < 2 or None in numbers or len(set(numbers)) != len(numbers):
        return []
    diffs = [b - a for a, b in zip(numbers, numbers[1:])]
    counts = Counter(d for d in diffs if d > 0)
    if not counts:
        return []
    step = min(counts, key=lambda d: (-counts[d], d))
    return [(i + 1, d // step - 1) for i, d in enumerate(diffs) if d > step]


def scan_clips(clips: list[Clip], cfg: DataConfig, workers: int | None = None, progress: bool = True) -> ScanReport:
    """Decode every frame of every clip and list every problem (a pure function of the files: same on every rank)."""
    tasks, owners = [], []  # owners[k] = (clip index, frame index or None)
    for ci, clip in enumerate(clips):
        if clip.kind == "frames":
            for fi, p in enumerate(clip.frames):
                tasks.append(("image", (str(p), str(clip.path), cfg.sidecar_dir, list(cfg.cond_keys),
                                        cfg.convert_modes)))
                owners.append((ci, fi))
        else:
            tasks.append(("video", (str(clip.path), clip.num_frames)))
            owners.append((ci, None))
    report = ScanReport(len(clips), sum(c.num_frames for c in clips))
    weights = [1 if fi is not None else clips[ci].num_frames for ci, fi in owners]
    workers = min(os.cpu_count() or 1, 16) if workers is None else workers
    bar = tqdm(total=report.num_frames, desc="scan frames", unit="frame", disable=not progress, leave=False)
    if workers <= 1 or report.num_frames < _INLINE_BELOW:
        results = []
        for task, w in zip(tasks, weights):
            results.append(_run(task))
            bar.update(w)
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = []
            for r, w in zip(pool.map(_run, tasks, chunksize=max(1, min(64, len(tasks) // (4 * workers)))), weights):
                results.append(r)
                bar.update(w)
    bar.close()

    problems: list[Problem] = []
    sizes: dict[int, list[tuple[int, tuple[int, int] | None]]] = {}
    for (ci, fi), (size, found) in zip(owners, results):
        problems.extend(Problem(path, reason, ci, fi, kind) for path, kind, reason in found)
        if fi is None:
            if found:
                report.bad_clips.add(ci)
        else:
            sizes.setdefault(ci, []).append((fi, size))
            if found:
                report.bad_frames.setdefault(ci, set()).add(fi)
    # Size: frames must match the clip's usual size (the most common one; ties go to the earliest frame's).
    for ci, per_frame in sizes.items():
        counts = Counter(s for _, s in per_frame if s is not None)
        if len(counts) > 1:
            order = [s for _, s in per_frame if s is not None]
            usual = max(counts, key=lambda s: (counts[s], -order.index(s)))
            for fi, s in per_frame:
                if s is not None and s != usual:
                    problems.append(Problem(str(clips[ci].frames[fi]), f"size {s[0]}x{s[1]} differs from the clip's "
                                            f"{usual[0]}x{usual[1]}", ci, fi, "frame size differs"))
                    report.bad_frames.setdefault(ci, set()).add(fi)
    # Gaps in numbered sequences, and clips too short for one window.
    span = window_span(cfg)
    for ci, clip in enumerate(clips):
        if clip.kind == "frames":
            for fi, missing in _find_gaps(clip.frames):
                report.gaps.setdefault(ci, []).append(fi)
                problems.append(Problem(str(clip.path), f"{missing} frame(s) missing between "
                                        f"{clip.frames[fi - 1].name} and {clip.frames[fi].name}", ci, None,
                                        "frames missing"))
        elif cfg.cond_keys:
            report.bad_clips.add(ci)
            problems.append(Problem(str(clip.path), f"data.cond_keys {cfg.cond_keys} need per-frame JSON sidecars; "
                                    f"a video clip has none (extract it to frames)", ci, None,
                                    "video without sidecars"))
        if clip.num_frames < span:
            problems.append(Problem(str(clip.path), f"{clip.num_frames} frames, shorter than one window "
                                    f"({span} frames)", ci, None, "clip shorter than a window"))
    report.problems = sorted(problems, key=lambda p: (p.clip, -1 if p.frame is None else p.frame, p.path, p.reason))
    report.num_bad = (sum(len(s) for s in report.bad_frames.values())
                      + sum(clips[ci].num_frames for ci in report.bad_clips))
    return report


def apply_bad_data_policy(clips: list[Clip], report: ScanReport, cfg: DataConfig) -> list[Clip]:
    """The clips to train on. error: raise listing every problem; skip: cut/drop (module docstring), abort above
    data.max_bad_fraction or when nothing is left."""
    if report.ok:
        return list(clips)
    if cfg.bad_data != "skip":
        raise DataError(f"{report}\n(data.bad_data=error; set data.bad_data=skip to train without them)")
    if report.bad_fraction > cfg.max_bad_fraction:
        raise DataError(f"{report}\n{100 * report.bad_fraction:.2f}% of frames are bad, above "
                        f"data.max_bad_fraction={cfg.max_bad_fraction}")
    span = window_span(cfg)
    kept: list[Clip] = []
    for ci, clip in enumerate(clips):
        if ci in report.bad_clips or clip.num_frames < span:
            continue
        if clip.kind == "video":
            kept.append(clip)
            continue
        bad, cuts = report.bad_frames.get(ci, set()), set(report.gaps.get(ci, []))
        runs, start = [], None
        for fi in range(clip.num_frames + 1):
            if fi == clip.num_frames or fi in bad or fi in cuts:
                if start is not None:
                    runs.append((start, fi))
                start = None if fi in bad or fi == clip.num_frames else fi
            elif start is None:
                start = fi
        if runs == [(0, clip.num_frames)]:
            kept.append(clip)
            continue
        for a, b in runs:
            if b - a >= span:
                kept.append(Clip(f"{clip.name}@{a:06d}", "frames", clip.path, clip.frames[a:b], b - a,
                                 source=clip.source_name))
    if not kept:
        raise DataError(f"{report}\nno clip is left with a full window ({span} frames) after skipping bad data")
    return kept


def check_clips(clips: list[Clip], cfg: DataConfig, workers: int | None = None,
                progress: bool = True) -> tuple[list[Clip], ScanReport]:
    """scan_clips + apply_bad_data_policy: (clips to train on, report)."""
    report = scan_clips(clips, cfg, workers=workers, progress=progress)
    return apply_bad_data_policy(clips, report, cfg), report


def main(argv=None) -> int:
    """Scan the data a config names and list every problem; exit 1 when there are any."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("config", help="YAML config (its data section is scanned)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. data.root=DIR")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set).data
        clips = discover_clips(cfg)
    except (ConfigError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = scan_clips(clips, cfg)
    print(report.text(listed=None))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())

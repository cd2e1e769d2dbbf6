"""Pictures of frames, the project's one place for them: PNG grids and animated GIFs of
past | truth | prediction(s) | |error|, one row per clip (the trainer, the sanity check, the tools), and labelled rows
of frames for the diagnosis.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.pixels import to_uint8_hwc

_GAP = 4  # pixels between panels
_LABEL_H = 12


def _fit(frames: torch.Tensor, max_height: int) -> torch.Tensor:
    """Downscale (…, 3, H, W) so H <= max_height (keeps big driving frames readable in one picture)."""
    H, W = frames.shape[-2:]
    if H <= max_height:
        return frames
    flat = frames.reshape(-1, 3, H, W).float()
    h, w = max_height, max(1, round(W * max_height / H))
    out = torch.nn.functional.interpolate(flat, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*frames.shape[:-2], h, w)


def error_frames(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """|pred - true| in [-1, 1] pixel space, shown as pixels in [-1, 1] (black = 0 error, white = 1 or more)."""
    err = (pred - true).abs().mean(-3, keepdim=True).clamp(0, 1).expand_as(pred)
    return err * 2 - 1


def sample_grid(past: torch.Tensor, truth: torch.Tensor, preds: dict[str, torch.Tensor], path: Path,
                max_height: int = 96) -> Path:
    """past (B, Tp, 3, H, W), truth and each pred (B, Tf, 3, H, W), pixels in [-1, 1].

    Columns: past frames | truth | each prediction | |error| of the first prediction; one row per clip."""
    first = next(iter(preds.values()))
    panels = {"past": past, "truth": truth, **preds, f"|err| {next(iter(preds))}": error_frames(first, truth)}
    panels = {k: to_uint8_hwc(_fit(v.detach().cpu(), max_height)) for k, v in panels.items()}
    B = past.shape[0]
    h, w = next(iter(panels.values())).shape[-3:-1]
    widths = [v.shape[1] * w for v in panels.values()]
    canvas = Image.new("RGB", (sum(widths) + _GAP * (len(panels) - 1), _LABEL_H + B * h + (B - 1) * _GAP), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (name, arr), width in zip(panels.items(), widths):
        draw.text((x + 2, 0), name, fill=(0, 0, 0))
        for b in range(B):
            row = np.concatenate(list(arr[b]), axis=1)  # (h, T*w, 3)
            canvas.paste(Image.fromarray(row), (x, _LABEL_H + b * (h + _GAP)))
        x += width + _GAP
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def clip_gif(past: torch.Tensor, truth: torch.Tensor, preds: dict[str, torch.Tensor], path: Path,
             max_height: int = 128, ms_per_frame: int = 250) -> Path:
    """One clip: past (Tp, 3, H, W), truth/preds (Tf, 3, H, W). Side-by-side panels (truth, each prediction)
    play the past frames (same in every panel, red border) then the future (green border = predicted)."""
    names = ["truth", *preds]
    seqs = [torch.cat([past, truth])] + [torch.cat([past, p]) for p in preds.values()]
    seqs = [to_uint8_hwc(_fit(s.detach().cpu(), max_height)) for s in seqs]
    T, h, w = seqs[0].shape[:3]
    frames = []
    for t in range(T):
        canvas = Image.new("RGB", (len(seqs) * (w + _GAP) - _GAP, h + _LABEL_H + 4), "white")
        draw = ImageDraw.Draw(canvas)
        colour = (200, 0, 0) if t < past.shape[0] else (0, 160, 0)
        for i, (name, seq) in enumerate(zip(names, seqs)):
            x = i * (w + _GAP)
            draw.text((x + 2, 0), name, fill=(0, 0, 0))
            canvas.paste(Image.fromarray(seq[t]), (x, _LABEL_H + 2))
            draw.rectangle([x, _LABEL_H + 1, x + w - 1, _LABEL_H + h + 2], outline=colour)
        frames.append(canvas)
    return save_gif(frames, path, ms_per_frame)


def save_gif(frames: list[Image.Image], path: Path, ms_per_frame: int) -> Path:
    """The project's one animated-GIF writer: `frames` played in a loop, `ms_per_frame` each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path


def enlarge(frames: torch.Tensor, min_height: int = 96) -> torch.Tensor:
    """(..., 3, H, W) frames enlarged by an integer factor (nearest neighbour) to at least `min_height` pixels, so
    that pictures of small frames (32x32) stay readable."""
    H, W = frames.shape[-2:]
    k = max(1, math.ceil(min_height / H))
    if k == 1:
        return frames
    return frames.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def frame_rows(rows: dict[str, torch.Tensor], min_height: int = 64, column_labels: list[str] | None = None,
               gap: int = 2) -> Image.Image:
    """Labelled rows of frames: label -> (T, 3, H, W) pixels in [-1, 1] (rows may differ in length). Small frames are
    enlarged (nearest neighbour) to at least `min_height` pixels so that 32x32 frames stay readable."""
    first = next(iter(rows.values()))
    H, W = first.shape[-2:]
    zoom = max(1, math.ceil(min_height / H))
    h, w = H * zoom, W * zoom
    label_w = 8 + 6 * max(len(k) for k in rows)
    top = 12 if column_labels else 0
    T = max(v.shape[0] for v in rows.values())
    img = Image.new("RGB", (label_w + T * (w + gap), top + len(rows) * (h + gap)), "white")
    d = ImageDraw.Draw(img)
    for j, text in enumerate(column_labels or []):
        d.text((label_w + j * (w + gap) + 2, 0), text, fill=(0, 0, 0))
    for i, (label, frames) in enumerate(rows.items()):
        y = top + i * (h + gap)
        d.text((2, y + h // 2 - 5), label, fill=(0, 0, 0))
        arr = to_uint8_hwc(frames.detach().cpu())  # (T, H, W, 3)
        for j in range(arr.shape[0]):
            tile_img = Image.fromarray(np.ascontiguousarray(arr[j])).resize((w, h), Image.Resampling.NEAREST)
            img.paste(tile_img, (label_w + j * (w + gap), y))
    return img


def sequence_gif(sequences: dict[str, torch.Tensor], path: Path, n_past: int, min_height: int = 96,
                 ms_per_frame: int = 250) -> Path:
    """Side-by-side panels, label -> (T, 3, H, W) in [-1, 1], played frame by frame; the first n_past frames get a
    red border, the rest (predicted) a green one. For predictions without a true continuation."""
    T = max(s.shape[0] for s in sequences.values())
    frames = []
    for t in range(T):
        row = {k: v[min(t, v.shape[0] - 1)][None] for k, v in sequences.items()}
        img = frame_rows({"": torch.cat(list(row.values()))}, min_height, column_labels=list(row), gap=6)
        d = ImageDraw.Draw(img)
        colour = (200, 0, 0) if t < n_past else (0, 160, 0)
        d.rectangle([0, 0, img.width - 1, img.height - 1], outline=colour, width=2)
        frames.append(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_gif(frames, path, ms_per_frame)

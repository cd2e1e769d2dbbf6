"""The one module that converts pixels between spaces.

`frames` are float32 tensors in [-1, 1] (what SD-family VAEs expect), channels first: (..., 3, H, W).
`unit` images are in [0, 1] (metrics, pictures). uint8 HWC arrays are what PNG/GIF writers take.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC  # antialiased when downscaling (PIL widens the kernel by the scale factor)
READABLE_MODES = ("RGB", "L", "P")  # image modes read as RGB; anything else (RGBA, CMYK, I;16, ...) is bad data


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (model outputs overshoot)."""
    return ((frames + 1.0) * 0.5).clamp(0.0, 1.0)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def to_uint8_hwc(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """frames in [-1, 1], (..., 3, H, W) -> numpy uint8 (..., H, W, 3), rounded; exact inverse of `uint8_to_frames`."""
    x = torch.as_tensor(frames).detach().float().cpu()
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) frames, got shape {tuple(x.shape)}")
    u8 = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u8.movedim(-3, -1).numpy()


def uint8_to_frames(array: np.ndarray) -> torch.Tensor:
    """numpy uint8 (..., H, W, 3) -> float32 frames (..., 3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    if array.dtype != np.uint8 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3), got {array.dtype} {array.shape}")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # PIL's buffers are read-only; torch.from_numpy wants a writable one
        array = array.copy()
    x = torch.from_numpy(array).movedim(-1, -3).float()
    return x / 127.5 - 1.0


def resize_image(img: Image.Image, height: int, width: int, resize_mode: str) -> Image.Image:
    """Resize to exactly (height, width). crop: scale to cover, centre-crop (keeps aspect); stretch: scale each axis."""
    w, h = img.size
    if (w, h) == (width, height):
        return img  # untouched pixels: no resampling blur when the data is already at the model's size
    if resize_mode == "stretch":
        return img.resize((width, height), RESAMPLE)
    if resize_mode != "crop":
        raise ValueError(f"resize_mode {resize_mode!r} is not one of ['crop', 'stretch']")
    # The source box with the target's aspect, centred; resampled in one pass (no intermediate rounding).
    scale = max(width / w, height / h)
    box_w, box_h = width / scale, height / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return img.resize((width, height), RESAMPLE, box=(left, top, left + box_w, top + box_h))


def pil_to_frames(img: Image.Image, height: int, width: int, resize_mode: str = "crop") -> torch.Tensor:
    """A PIL image (mode RGB, L or P) -> float32 (3, height, width) in [-1, 1]."""
    if img.mode not in READABLE_MODES:
        raise ValueError(f"image mode {img.mode!r} is not one of {list(READABLE_MODES)}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = resize_image(img, height, width, resize_mode)
    return uint8_to_frames(np.asarray(img, dtype=np.uint8))

"""The one module that converts pixels between spaces.

`frames` are float32 tensors in [-1, 1] (what SD-family VAEs expect), channels first: (..., 3, H, W).
`unit` images are in [0, 1] (metrics, pictures). uint8 HWC arrays are what PNG/GIF writers take.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC  # antialiased when downscaling (PIL widens the kernel by the scale factor)
READABLE_MODES = ("RGB", "L", "P")  # image modes always read as RGB
# modes read only with data.convert_modes on (else bad data): alpha, 16-bit grey, CMYK / YCbCr (PIL's conversion)
ALPHA_MODES = ("RGBA", "LA", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNGs as older Pillow opens them
CONVERTIBLE_MODES = (*ALPHA_MODES, *SIXTEEN_BIT_MODES, "CMYK", "YCbCr")
CONVERT_MODES = ("off", "composite", "drop_alpha")  # the choices of data.convert_modes


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


def mode_problem(mode: str, convert_modes: str = "off") -> str | None:
    """Why an image of `mode` is not read under data.convert_modes, or None when it is."""
    if mode in READABLE_MODES or (convert_modes != "off" and mode in CONVERTIBLE_MODES):
        return None
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = "?"
    hint = ("; set data.convert_modes=composite (alpha over black) or drop_alpha to read it" if mode in ALPHA_MODES
            else "; set data.convert_modes=composite to read it (16-bit scaled to 8 bit; CMYK/YCbCr by PIL)"
            if mode in CONVERTIBLE_MODES else "")
    return f"image mode {mode} ({bands} channel(s)); only {'/'.join(READABLE_MODES)} are read{hint}"


def to_rgb(img: Image.Image, convert_modes: str = "off") -> Image.Image:
    """`img` as mode RGB. RGB, L and P always; with convert_modes composite / drop_alpha also RGBA, LA, PA (alpha
    composited over black / ignored), 16-bit grey (scaled to 8 bit: round(v / 257), so 65535 -> 255) and CMYK or
    YCbCr (PIL's conversion). ValueError naming the mode otherwise."""
    if img.mode == "RGB":
        return img
    if (problem := mode_problem(img.mode, convert_modes)) is not None:
        raise ValueError(problem)
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        if convert_modes == "drop_alpha":
            return rgba.convert("RGB")
        return Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr


def pil_to_frames(img: Image.Image, height: int, width: int, resize_mode: str = "crop",
                  convert_modes: str = "off") -> torch.Tensor:
    """A PIL image (mode RGB, L or P; more with convert_modes, see `to_rgb`) -> float32 (3, height, width) in
    [-1, 1]."""
    img = resize_image(to_rgb(img, convert_modes), height, width, resize_mode)
    return uint8_to_frames(np.asarray(img, dtype=np.uint8))

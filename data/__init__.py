"""The data pipeline: clips on disk -> windows of past + future frames as float32 pixels in [-1, 1].

One job per module: `clips` finds clips, `video` decodes video files, `sidecar` reads per-frame JSON, `split` holds
clips out for validation, `windows` indexes windows (no pixels), `dataset` reads pixels and conditioning vectors,
`scan` checks every frame before training, `synthetic` writes the synthetic world, `pixels` converts between pixel
spaces, `latent_cache` encodes every frame once and serves windows of latents, `pipeline` chains them: the one
call a trainer or a tool makes.
"""
from data.clips import IMAGE_EXTENSIONS, Clip, clips_fingerprint, discover_clips, list_frames, natural_key
from data.dataset import VideoWindowDataset, read_clip_frames, read_cond, read_image
from data.errors import DataError
from data.pipeline import Splits, build_datasets, prepare_clips, split_as_trained, split_data
from data.pixels import from_unit, pil_to_frames, to_uint8_hwc, to_unit, uint8_to_frames
from data.scan import Problem, ScanReport, apply_bad_data_policy, check_clips, scan_clips
from data.sidecar import read_sidecar_values, sidecar_path
from data.split import split_clips
from data.synthetic import ensure_synthetic, render_clip, write_world
from data.video import VIDEO_EXTENSIONS, count_frames, iter_video_frames, read_video_frames
from data.windows import Window, build_windows, clip_windows, spread, window_span

__all__ = [
    "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "Clip", "DataError", "Problem", "ScanReport", "Splits", "VideoWindowDataset",
    "Window", "apply_bad_data_policy", "build_datasets", "build_windows", "check_clips", "clip_windows",
    "clips_fingerprint", "count_frames", "discover_clips", "ensure_synthetic", "from_unit", "iter_video_frames",
    "list_frames", "natural_key", "pil_to_frames", "prepare_clips", "read_clip_frames", "read_cond", "read_image",
    "read_sidecar_values", "read_video_frames", "render_clip", "scan_clips", "sidecar_path", "split_clips",
    "split_as_trained", "split_data", "spread", "to_uint8_hwc", "to_unit", "uint8_to_frames", "window_span",
    "write_world",
]

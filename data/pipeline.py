"""The one call a trainer makes: synthetic world (if on) -> discover -> scan + bad-data policy -> split -> datasets."""
from __future__ import annotations

from configs.schema import DataConfig
from data.clips import Clip, discover_clips
from data.dataset import VideoWindowDataset
from data.scan import ScanReport, check_clips
from data.split import split_clips
from data.synthetic import ensure_synthetic


def prepare_clips(cfg: DataConfig, scan: bool = True, workers: int | None = None,
                  progress: bool = True) -> tuple[list[Clip], list[Clip], ScanReport | None]:
    """(train clips, val clips, scan report or None). Deterministic, so every rank gets the same answer; under DDP
    let rank 0 call `ensure_synthetic(cfg)` before a barrier so the others do not generate the world too."""
    ensure_synthetic(cfg, progress=progress)
    clips = discover_clips(cfg)
    report = None
    if scan:
        clips, report = check_clips(clips, cfg, workers=workers, progress=progress)
    train, val = split_clips(clips, cfg.val_fraction, cfg.split_seed)
    return train, val, report


def build_datasets(cfg: DataConfig, scan: bool = True, workers: int | None = None,
                   progress: bool = True) -> tuple[VideoWindowDataset, VideoWindowDataset | None, ScanReport | None]:
    """(train dataset, val dataset or None when there are no val clips, scan report or None)."""
    train, val, report = prepare_clips(cfg, scan=scan, workers=workers, progress=progress)
    return VideoWindowDataset(train, cfg), (VideoWindowDataset(val, cfg) if val else None), report

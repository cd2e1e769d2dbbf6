"""The one call a trainer or tool makes for its clips: synthetic world (if on) -> discover -> scan + bad-data
policy -> split by clip. `split_data` returns all of it; `prepare_clips`, `build_datasets` and `split_as_trained` (the
tools' view of a trained run's split) are its short forms."""
from __future__ import annotations

from dataclasses import dataclass

from configs.schema import DataConfig
from data.clips import Clip, discover_clips
from data.dataset import VideoWindowDataset
from data.scan import ScanReport, check_clips
from data.split import split_clips
from data.synthetic import ensure_synthetic


@dataclass
class Splits:
    clips: list[Clip]  # every usable clip, in the order the latent cache indexes them
    train: list[Clip]
    val: list[Clip]  # [] with data.val_fraction = 0
    report: ScanReport | None  # None when not scanned

    def val_set(self, cfg: DataConfig) -> VideoWindowDataset | None:
        return VideoWindowDataset(self.val, cfg) if self.val else None


def split_data(cfg: DataConfig, scan: bool = True, workers: int | None = None, progress: bool = True) -> Splits:
    """Deterministic, so every rank would get the same answer; under DDP rank 0 calls it and broadcasts the
    result, so the other ranks neither write the synthetic world nor scan the frames again."""
    ensure_synthetic(cfg, progress=progress)
    clips = discover_clips(cfg)
    report = None
    if scan:
        clips, report = check_clips(clips, cfg, workers=workers, progress=progress)
    train, val = split_clips(clips, cfg.val_fraction, cfg.split_seed)
    return Splits(clips, train, val, report)


def split_as_trained(cfg: DataConfig) -> Splits:
    """The clips split as the trainer split them, for the tools that read a run's data afterwards (quietly): scanned
    only where data.bad_data = skip, since there the trainer dropped bad clips before splitting."""
    return split_data(cfg, scan=cfg.bad_data == "skip", progress=False)


def prepare_clips(cfg: DataConfig, scan: bool = True, workers: int | None = None,
                  progress: bool = True) -> tuple[list[Clip], list[Clip], ScanReport | None]:
    """(train clips, val clips, scan report or None)."""
    s = split_data(cfg, scan=scan, workers=workers, progress=progress)
    return s.train, s.val, s.report


def build_datasets(cfg: DataConfig, scan: bool = True, workers: int | None = None,
                   progress: bool = True) -> tuple[VideoWindowDataset, VideoWindowDataset | None, ScanReport | None]:
    """(train dataset, val dataset or None when there are no val clips, scan report or None)."""
    s = split_data(cfg, scan=scan, workers=workers, progress=progress)
    return VideoWindowDataset(s.train, cfg), s.val_set(cfg), s.report

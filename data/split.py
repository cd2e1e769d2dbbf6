"""Train/val split by clip (never by window): a pure function of clip names and a seed."""
from __future__ import annotations

import hashlib

from data.clips import Clip


def _rank(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_clips(clips: list[Clip], val_fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """(train, val), each in the input order. Clips are grouped by `source_name`, so segments of one clip cut at
    bad frames stay on one side. The val groups are the round(val_fraction * n) with the smallest sha256(seed:name),
    at least 1 when val_fraction > 0 and there are >= 2 groups, and never all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 1)")
    groups = sorted({c.source_name for c in clips})
    num_val = 0
    if val_fraction > 0 and len(groups) >= 2:
        num_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    val_names = set(sorted(groups, key=lambda g: _rank(g, seed))[:num_val])
    train = [c for c in clips if c.source_name not in val_names]
    val = [c for c in clips if c.source_name in val_names]
    return train, val

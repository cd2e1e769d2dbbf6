"""Fault injection at named points, for the reliability tests. Off unless VP_FAULTS is set.

VP_FAULTS is a comma-separated list of `name[:rank=R][:step=S]`, e.g. `nan_loss:rank=1:step=3`.
Points: nan_loss (the loss of that rank/step becomes NaN).
"""
from __future__ import annotations

import os

import torch


def _active(name: str, step: int, rank: int) -> bool:
    spec = os.environ.get("VP_FAULTS", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if parts[0] != name:
            continue
        cond = dict(p.split("=", 1) for p in parts[1:])
        if "rank" in cond and int(cond["rank"]) != rank:
            continue
        if "step" in cond and int(cond["step"]) != step:
            continue
        return True
    return False


def corrupt_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fault point `nan_loss`: returns loss * NaN when active (the graph stays connected, so grads are NaN too)."""
    if _active("nan_loss", step, rank):
        return loss * float("nan")
    return loss

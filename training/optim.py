"""What trains the UNet: AdamW, the warm-up + cosine learning-rate schedule, and the EMA of the weights.

Built once by `build`; the Trainer steps them and checkpoints carry their state.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import torch
from diffusers.training_utils import EMAModel

from configs.schema import EMAConfig, OptimConfig


@dataclass
class Optimization:
    optimizer: torch.optim.AdamW
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMAModel | None  # None with ema.decay = 0
    ema_unet: torch.nn.Module  # a UNet the EMA weights are copied into for sampling; the UNet itself without EMA


def lr_factor(oc: OptimConfig, max_steps: int, step: int) -> float:
    """Multiplier of optim.lr after `step` optimizer steps: linear warm-up from 0, then constant or cosine to
    optim.min_lr_ratio at `max_steps`."""
    if oc.warmup_steps and step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - oc.warmup_steps) / max(1, max_steps - oc.warmup_steps))
    return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build(unet: torch.nn.Module, oc: OptimConfig, ec: EMAConfig, max_steps: int) -> Optimization:
    """Fused AdamW (it can mask a non-finite step on the device, see Trainer.train_step), LR schedule, EMA."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=oc.lr, betas=tuple(oc.adam_betas),
                                  weight_decay=oc.weight_decay, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, oc, max_steps))
    ema, ema_unet = None, unet
    if ec.decay > 0:
        warm = ec.warmup_power > 0
        ema = EMAModel(unet.parameters(), decay=ec.decay, use_ema_warmup=warm,
                       power=ec.warmup_power if warm else 2 / 3,
                       min_decay=0.0 if warm else ec.decay, foreach=True)
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
    return Optimization(optimizer, lr_scheduler, ema, ema_unet)

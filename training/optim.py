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

from configs.schema import TrainConfig


@dataclass
class Optimization:
    optimizer: torch.optim.AdamW
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMAModel | None  # None with train.ema_decay = 0
    ema_unet: torch.nn.Module  # a UNet the EMA weights are copied into for sampling; the UNet itself without EMA


def lr_factor(tc: TrainConfig, step: int) -> float:
    """Multiplier of train.lr after `step` optimizer steps: linear warm-up from 0, then constant or cosine to
    train.min_lr_ratio at train.max_steps."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build(unet: torch.nn.Module, tc: TrainConfig) -> Optimization:
    """Fused AdamW (it can mask a non-finite step on the device, see Trainer.train_step), LR schedule, EMA."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, tc))
    ema, ema_unet = None, unet
    if tc.ema_decay > 0:
        warm = tc.ema_warmup_power > 0
        ema = EMAModel(unet.parameters(), decay=tc.ema_decay, use_ema_warmup=warm,
                       power=tc.ema_warmup_power if warm else 2 / 3,
                       min_decay=0.0 if warm else tc.ema_decay, foreach=True)
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
    return Optimization(optimizer, lr_scheduler, ema, ema_unet)

"""The optimizer and the learning-rate schedule of a training run (config group `optim`).

    optimizer = make_optimizer(model, cfg.optim)                        # adam | adamw
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    ... optimizer.step(); scheduler.step()     # "plateau": scheduler.step(valid_bleu) instead

Schedules are torch's own (LambdaLR, ReduceLROnPlateau): they load and save with the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig
from .errors import MTError


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.name not in kinds:
        raise MTError(f"unknown optim.name={cfg.name!r}; use adam or adamw")
    return kinds[cfg.name](
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Stepped once per update, except "plateau", stepped with each validation BLEU."""
    warm = max(1, cfg.warmup_steps)
    if cfg.scheduler == "inverse_sqrt":  # linear warm-up, then lr * sqrt(warmup / step)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    if cfg.scheduler == "constant":  # linear warm-up, then constant
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0))
    if cfg.scheduler == "cosine":  # linear warm-up, then half a cosine down to min_lr at max_steps
        floor = min(1.0, cfg.min_lr / cfg.lr) if cfg.lr > 0 else 0.0
        span = max(1, max_steps - warm)

        def cosine(s: int) -> float:
            if s + 1 <= warm:
                return (s + 1) / warm
            progress = min(1.0, (s + 1 - warm) / span)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
    raise MTError(f"unknown optim.scheduler={cfg.scheduler!r}; use inverse_sqrt, cosine, constant or plateau")


def steps_per_update(scheduler) -> bool:
    """True for schedules stepped after every update; False for "plateau" (stepped by validation)."""
    return not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

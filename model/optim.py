"""Optimizer and learning-rate schedules of the paper (AdamW; cosine with warm-up; constant for PPO)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW and gradient clipping, one block nested as `optim` in every training stage's config (pretraining, SFT,
    reward models, PPO), at the paper's values (docs/paper.md). The learning rate and its schedule stay with each
    stage: their shapes differ (cosine after a warm-up share, a fixed warm-up, constant for PPO)."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm

    def __post_init__(self) -> None:
        errors = [f"{name} = {getattr(self, name)}: must be > 0" for name in ("eps", "grad_clip")
                  if not getattr(self, name) > 0]
        if self.weight_decay < 0:
            errors.append(f"weight_decay = {self.weight_decay}: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"betas = {self.betas}: must be two values in [0, 1)")
        if errors:
            raise ValueError("\n".join(errors))


def adamw(model: nn.Module, lr: float, optim: OptimConfig | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains towards zero only hurts."""
    optim = optim or OptimConfig()
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=optim.betas, eps=optim.eps)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` x peak at `total_steps`.

    The paper's RMs decay to 10% of the peak (min_lr_ratio=0.1) after a 3% (>= 5 steps) warm-up.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps_for(total_steps: int, share: float = 0.03, minimum: int = 5) -> int:
    """The paper's RM warm-up: 3% of the steps, at least 5 (never more than the run)."""
    return min(total_steps, max(minimum, round(share * total_steps)))

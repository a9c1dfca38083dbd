"""Learning-rate schedules the experiment configs name that torch has no single class for."""

from __future__ import annotations

import torch

from fmlab.errors import UserError


def warmup_polynomial_factor(step: int, warmup_steps: int, total_steps: int, power: float = 1.0) -> float:
    """The LR multiplier at optimiser step `step`: linear warm-up, then polynomial decay to zero,

    f(s) = (s + 1) / W                      for s < W,
    f(s) = (1 − (s − W) / (T − W))^p         for W ≤ s ≤ T (0 after T),

    with W = `warmup_steps`, T = `total_steps`, p = `power` (Lipman et al. 2023 train CIFAR-10 this way).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(total_steps - step, 0) / max(total_steps - warmup_steps, 1)
    return remaining**power


def warmup_polynomial(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, power: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_polynomial_factor` as a scheduler stepped once per optimiser step."""
    if not 0 <= warmup_steps < total_steps:
        raise UserError(
            f"scheduler.warmup_steps={warmup_steps} must satisfy 0 <= warmup_steps < total_steps={total_steps}"
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_polynomial_factor(step, warmup_steps, total_steps, power)
    )

"""Time embeddings shared by the backbones."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style features of a time batch (Vaswani et al. 2017; Ho et al. 2020 embed their step index):

    e(t) = [cos(s t ω_k), sin(s t ω_k)]_k,  ω_k = max_period^(−k / (dim/2)),  k = 0 .. dim/2 − 1,

    with s = `scale` mapping t ∈ [0, 1] onto the 0..1000 step range those frequencies were chosen for.
    Returns a (batch, dim) tensor; an odd `dim` gets one zero column.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (scale * t.float()).reshape(-1, 1) * frequencies
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


class ClassEmbedding(torch.nn.Embedding):
    """A learned vector per class plus one for the null class ∅ (index `num_classes`), the "no label" input of
    classifier-free guidance (Ho & Salimans 2022): one net is then both p(x | y) and p(x)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 for a class embedding")
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes
        torch.nn.init.normal_(self.weight, std=dim**-0.5)

    @property
    def null(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor | None, batch: int | None = None) -> Tensor:  # type: ignore[override]
        """The embedding of `labels` (a long tensor of class indices, `null` for ∅); None: ∅ for a whole batch."""
        if labels is None:
            labels = torch.full((batch or 1,), self.null, dtype=torch.long, device=self.weight.device)
        return super().forward(labels)


class ConditionEmbedding(torch.nn.Module):
    """A continuous condition c ∈ R^k (an x-coordinate, say) as the vector W c + b, and a learned vector for the
    null condition ∅: rows that hold NaN, or no conditions at all. Classifier-free guidance's "no condition" for
    continuous conditions, as `ClassEmbedding`'s null class is for classes."""

    def __init__(self, condition_dim: int, dim: int) -> None:
        super().__init__()
        if condition_dim < 1:
            raise ValueError(f"condition_dim={condition_dim} must be >= 1 for a condition embedding")
        self.condition_dim = condition_dim
        self.linear = torch.nn.Linear(condition_dim, dim)
        self.null = torch.nn.Parameter(torch.randn(dim) * dim**-0.5)

    def forward(self, conditions: Tensor | None, batch: int | None = None) -> Tensor:
        """(batch, dim): the embedding of each row's condition, ∅'s for NaN rows (and for every row without any)."""
        if conditions is None:
            return self.null.expand(batch or 1, -1)
        conditions = conditions.reshape(len(conditions), -1).to(self.linear.weight.dtype)
        missing = torch.isnan(conditions).any(1, keepdim=True)
        embedded = self.linear(torch.nan_to_num(conditions))
        return torch.where(missing, self.null.expand_as(embedded), embedded)


def condition_input(num_classes: int, condition_dim: int, dim: int) -> torch.nn.Module | None:
    """The embedding of a net's condition: a class table (`num_classes` > 0), a continuous one (`condition_dim`
    > 0), or None for an unconditional net."""
    if num_classes and condition_dim:
        from fmlab.errors import UserError

        raise UserError(f"net.num_classes={num_classes} and net.condition_dim={condition_dim}: a net takes one kind")
    if num_classes:
        return ClassEmbedding(num_classes, dim)
    return ConditionEmbedding(condition_dim, dim) if condition_dim else None


def check_time_inputs(time_inputs: int) -> int:
    """1: the net reads t; 2: t and the duration h of an interval (MeanFlow's average velocity u(x, t, t + h))."""
    if time_inputs not in (1, 2):
        from fmlab.errors import UserError

        raise UserError(f"net.time_inputs={time_inputs} is invalid; it must be 1 (t) or 2 (t and a duration h)")
    return time_inputs


def duration_input(duration: Tensor | None, t: Tensor, x: Tensor, time_inputs: int, net: str) -> Tensor | None:
    """The per-row duration h a two-time-input net reads (h = 0, the instantaneous velocity, when none is given);
    None for a one-time-input net, which refuses a duration."""
    if time_inputs == 1:
        if duration is not None:
            raise ValueError(f"a duration given to a {net} with one time input (net.time_inputs=1)")
        return None
    return (duration if duration is not None else torch.zeros_like(t)).to(x.dtype).expand(x.shape[0])

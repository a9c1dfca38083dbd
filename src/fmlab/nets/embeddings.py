"""Time embeddings shared by the backbones (a condition's embeddings live with the condition: fmlab.conditioning)."""

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

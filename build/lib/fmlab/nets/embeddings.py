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

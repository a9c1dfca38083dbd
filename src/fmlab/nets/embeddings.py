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

"""Time-conditioned MLP for low-dimensional data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fmlab.errors import UserError, choices_error

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


class MLP(nn.Module):
    """v(t, x) = MLP([x, t, sin(πkt), cos(πkt) for k = 1..K]): `depth` hidden layers of `width` units; time enters
    as one input feature plus K = `time_frequencies` Fourier pairs (0: t alone, as TorchCFM's MLP).

    Data of any shape is flattened in and reshaped out (an MLP on 8×8 digits sees 64-dimensional vectors).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        width: int = 64,
        depth: int = 3,
        activation: str = "selu",
        time_frequencies: int = 0,
    ) -> None:
        super().__init__()
        if time_frequencies < 0:
            raise UserError(f"net.time_frequencies={time_frequencies} must be >= 0")
        if activation not in ACTIVATIONS:
            raise choices_error("net.activation", activation, ACTIVATIONS)
        if width < 1 or depth < 1:
            raise UserError(f"net.width={width} and net.depth={depth} must both be >= 1")
        self.data_shape = tuple(int(d) for d in data_shape)
        dim = math.prod(self.data_shape)
        layers: list[nn.Module] = []
        self.register_buffer("frequencies", torch.pi * torch.arange(1, time_frequencies + 1, dtype=torch.float32))
        in_features = dim + 1 + 2 * time_frequencies
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1)
        features = [x.flatten(1), t]
        if len(self.frequencies):
            angles = t * self.frequencies.to(x.dtype)
            features += [torch.sin(angles), torch.cos(angles)]
        return self.layers(torch.cat(features, dim=1)).view_as(x)

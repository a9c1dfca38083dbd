"""Time-conditioned MLP for low-dimensional data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fmlab.utils.errors import UserError, choices_error

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


class MLP(nn.Module):
    """v(t, x) = MLP([x, t]): `depth` hidden layers of `width` units, time appended as one input feature.

    Data of any shape is flattened in and reshaped out (an MLP on 8×8 digits sees 64-dimensional vectors).
    """

    def __init__(self, data_shape: Sequence[int], width: int = 64, depth: int = 3, activation: str = "selu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise choices_error("net.activation", activation, ACTIVATIONS)
        if width < 1 or depth < 1:
            raise UserError(f"net.width={width} and net.depth={depth} must both be >= 1")
        self.data_shape = tuple(int(d) for d in data_shape)
        dim = math.prod(self.data_shape)
        layers: list[nn.Module] = []
        in_features = dim + 1
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1)
        return self.layers(torch.cat([x.flatten(1), t], dim=1)).view_as(x)

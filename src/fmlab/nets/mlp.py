"""Time-conditioned MLP for low-dimensional data."""

from __future__ import annotations

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
    """v(t, x) = MLP([x, t]): `depth` hidden layers of `width` units, time appended as one input feature."""

    def __init__(self, data_shape: Sequence[int], width: int = 64, depth: int = 3, activation: str = "selu") -> None:
        super().__init__()
        if len(data_shape) != 1:
            raise UserError(
                f"net=mlp takes vector data, got data shape {list(data_shape)}; use an image net (net=unet_small)"
            )
        if activation not in ACTIVATIONS:
            raise choices_error("net.activation", activation, ACTIVATIONS)
        if width < 1 or depth < 1:
            raise UserError(f"net.width={width} and net.depth={depth} must both be >= 1")
        dim = int(data_shape[0])
        layers: list[nn.Module] = []
        in_features = dim + 1
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1)
        return self.layers(torch.cat([x, t], dim=1))

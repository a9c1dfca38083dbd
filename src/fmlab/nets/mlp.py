"""Time-conditioned MLP for low-dimensional data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fmlab.conditioning import condition_input
from fmlab.errors import UserError, choices_error
from fmlab.nets.embeddings import check_time_inputs, duration_input

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

    With `num_classes` = K > 0 the net is class-conditional, v(t, x, y): a learned vector E[y] (K classes and the
    null class ∅) is added to the first layer's pre-activation W [x, τ(t)] + E[y], i.e. beside the time features'
    contribution; y = None is ∅. With `condition_dim` = k > 0 it takes a continuous condition c ∈ R^k the same
    way, as W_c c + b_c (`ConditionEmbedding`; NaN rows are ∅). With `time_inputs=2` it takes a second time, the
    `duration` h of an interval (MeanFlow's u(x, t, t + h)), as t is taken: h and its Fourier pairs beside x and t;
    no duration is h = 0.
    """

    condition_kinds = ("class", "continuous")  # what fmlab.conditioning.check_parts may ask of it

    def __init__(
        self,
        data_shape: Sequence[int],
        width: int = 64,
        depth: int = 3,
        activation: str = "selu",
        time_frequencies: int = 0,
        num_classes: int = 0,
        condition_dim: int = 0,
        time_inputs: int = 1,
    ) -> None:
        super().__init__()
        if time_frequencies < 0:
            raise UserError(f"net.time_frequencies={time_frequencies} must be >= 0")
        if activation not in ACTIVATIONS:
            raise choices_error("net.activation", activation, ACTIVATIONS)
        if num_classes < 0:
            raise UserError(f"net.num_classes={num_classes} must be >= 0 (0: unconditional)")
        if width < 1 or depth < 1:
            raise UserError(f"net.width={width} and net.depth={depth} must both be >= 1")
        self.data_shape = tuple(int(d) for d in data_shape)
        dim = math.prod(self.data_shape)
        layers: list[nn.Module] = []
        self.register_buffer("frequencies", torch.pi * torch.arange(1, time_frequencies + 1, dtype=torch.float32))
        self.time_inputs = check_time_inputs(time_inputs)
        in_features = dim + time_inputs * (1 + 2 * time_frequencies)
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, dim))
        self.layers = nn.Sequential(*layers)
        self.num_classes, self.condition_dim = num_classes, condition_dim
        self.class_embedding = condition_input(num_classes, condition_dim, width)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None, duration: Tensor | None = None) -> Tensor:
        h = duration_input(duration, t, x, self.time_inputs, "MLP")
        features = [x.flatten(1)]
        for time in [t] if h is None else [t, h]:
            time = time.to(x.dtype).expand(x.shape[0]).reshape(-1, 1)
            features.append(time)
            if len(self.frequencies):
                angles = time * self.frequencies.to(x.dtype)
                features += [torch.sin(angles), torch.cos(angles)]
        inputs = torch.cat(features, dim=1)
        if self.class_embedding is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional MLP (net.num_classes=0, net.condition_dim=0)")
            return self.layers(inputs).view_as(x)
        first, rest = self.layers[0], self.layers[1:]
        hidden = first(inputs) + self.class_embedding(labels, x.shape[0]).to(x.dtype)
        return rest(hidden).view_as(x)

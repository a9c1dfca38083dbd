"""The residual GELU MLP of Cheng & Schwing 2025's 2D experiments (hkchengrex/C2OT, c2ot/utils/playground_utils.py,
`SimpleNet` / `ConditionalNet`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from fmlab.conditioning import condition_input
from fmlab.errors import UserError
from fmlab.nets.embeddings import check_time_inputs, duration_input


class ResidualBlock(nn.Module):
    """h + W2 GELU(W1 h), with a hidden layer `expansion` × wider (4 in the C²OT code)."""

    def __init__(self, width: int, expansion: float = 4.0) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, int(expansion * width)), nn.GELU(),
                                   nn.Linear(int(expansion * width), width))  # fmt: skip

    def forward(self, h: Tensor) -> Tensor:
        return self.inner(h) + h


class ResidualMLP(nn.Module):
    """v(t, x [, c]) = out(blocks(in(x) + T t [+ E c])): x and the raw time t ∈ [0, 1] each projected to `width`
    by a linear map and added (no Fourier features), then `depth` residual GELU blocks, then a linear map back.
    A condition (class `num_classes`, or continuous `condition_dim`) is embedded and added beside them: C²OT's
    `ConditionalNet` projects its scalar condition with a linear map (`condition_dim=1`). `time_inputs=2` adds a
    second time, the duration h of an interval (MeanFlow's u(x, t, t + h)), projected and added the same way."""

    condition_kinds = ("class", "continuous")  # what fmlab.conditioning.check_parts may ask of it

    def __init__(self, data_shape: Sequence[int], width: int = 128, depth: int = 3, expansion: float = 4.0,
                 num_classes: int = 0, condition_dim: int = 0, time_inputs: int = 1) -> None:  # fmt: skip
        super().__init__()
        if width < 1 or depth < 1 or expansion <= 0:
            raise UserError(f"net.width={width}, net.depth={depth} must be >= 1 and net.expansion={expansion} > 0")
        self.data_shape = tuple(int(d) for d in data_shape)
        dim = math.prod(self.data_shape)
        self.input_proj, self.time_proj = nn.Linear(dim, width), nn.Linear(1, width)
        self.time_inputs = check_time_inputs(time_inputs)
        self.duration_proj = nn.Linear(1, width) if time_inputs == 2 else None
        self.blocks = nn.Sequential(*(ResidualBlock(width, expansion) for _ in range(depth)))
        self.output_proj = nn.Linear(width, dim)
        self.num_classes, self.condition_dim = num_classes, condition_dim
        self.condition = condition_input(num_classes, condition_dim, width)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None, duration: Tensor | None = None) -> Tensor:
        t = t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1)
        h = self.input_proj(x.flatten(1)) + self.time_proj(t)
        length = duration_input(duration, t, x, self.time_inputs, "ResidualMLP")
        if length is not None:
            h = h + self.duration_proj(length.reshape(-1, 1))
        if self.condition is not None:
            h = h + self.condition(labels, x.shape[0]).to(h.dtype)
        elif labels is not None:
            raise ValueError("labels given to an unconditional ResidualMLP (net.num_classes=0, net.condition_dim=0)")
        return self.output_proj(self.blocks(h)).view_as(x)

"""MeanFlow's sampler (Geng et al. 2025): jumps along the average velocity, no ODE solver."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fmlab.errors import UserError
from fmlab.paths.path import AffinePath
from fmlab.samplers.base import check_num_steps, describe_repr, run_grid, uniform_grid


class MeanFlowSampler:
    """K jumps on a uniform grid t_0 < ... < t_K: x_{k+1} = x_k + (t_{k+1} − t_k) ū(x_k, t_k, t_{k+1}), with ū the
    net's average velocity over each interval (`VelocityField.mean_velocity`; K = 1: one-step generation,
    x_1 = x_0 + ū(x_0, 0, 1)). NFE = K. A net that ignores the duration (ū = v) makes this the Euler sampler."""

    is_adaptive = False
    is_stochastic = False
    needs_durations = True  # the net must take a second time input (net.time_inputs=2, method=meanflow)

    def __init__(self, num_steps: int = 1) -> None:
        self.method, self.num_steps = "mean_flow", check_num_steps("mean_flow", num_steps)

    def check_path(self, path: AffinePath) -> None:
        """Any path: the jumps only read the net."""

    def expected_nfe(self, guided: bool = False) -> int:
        return self.num_steps * (2 if guided else 1)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "num_steps": self.num_steps}

    def integrate(self, field: Any, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        if getattr(field.net, "time_inputs", 1) != 2 or not hasattr(field, "mean_velocity"):
            raise UserError("solver=mean_flow needs a net with two time inputs (method=meanflow: net.time_inputs=2)")
        grid = uniform_grid(self.num_steps, t0, t1, x_start)

        def step(i: int, x: Tensor) -> Tensor:
            span = grid[i + 1] - grid[i]
            return x + span * field.mean_velocity(grid[i], x, span)

        return run_grid(step, x_start, self.num_steps, num_trajectory_times)

    def __repr__(self) -> str:
        return describe_repr(self)

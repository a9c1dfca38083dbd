"""The probability-flow ODE dx/dt = v_t(x) on torchdiffeq's solvers, and the path energy along its trajectories."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from fmlab.errors import SolverError, UserError, choices_error
from fmlab.objectives import VelocityField
from fmlab.paths.path import AffinePath
from fmlab.samplers.base import check_num_steps, describe_repr, uniform_grid

# fmlab's names of torchdiffeq's methods (heun is torchdiffeq's heun2)
FIXED_STEP_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "heun3": "heun3", "rk4": "rk4"}
# torchdiffeq's bosh3 is left out: at tight tolerances its end-point interpolation misses the tolerance ~1000x.
ADAPTIVE_METHODS = {"dopri5": "dopri5", "dopri8": "dopri8", "adaptive_heun": "adaptive_heun"}
# field calls per step of each fixed-step method
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4}


class _CappedField:
    """`field` that raises `SolverError` once it has been called more than `max_nfe` times in one integration."""

    def __init__(self, field: Any, max_nfe: int, solver: ODESolver) -> None:
        self.field, self.max_nfe, self.solver, self.calls = field, max_nfe, solver, 0

    def __call__(self, t: Tensor, x: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        self.calls += 1
        if self.calls > self.max_nfe:
            raise SolverError(
                f"solver.max_nfe={self.max_nfe} reached: {self.solver!r} needed more net calls than that for one "
                f"batch (stopped at t={float(t):.4g}); the model has likely diverged (check the training loss, lower "
                "optimizer.lr), or raise solver.max_nfe / loosen solver.atol and solver.rtol"
            )
        return self.field(t, x)


class ODESolver:
    """Integrates dx/dt = field(t, x) from t0 to t1 with a torchdiffeq method.

    Adaptive methods (dopri5, ...) use `atol`/`rtol` and stop with a `SolverError` after `max_nfe` field calls
    in one integration (an exploded model otherwise shrinks the step for ever); fixed-step methods (euler, midpoint,
    heun, rk4) take `num_steps` uniform steps. NFE is the number of field calls, counted by the field.
    """

    is_stochastic = False

    def __init__(
        self,
        method: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        num_steps: int = 100,
        max_nfe: int = 10_000,
    ) -> None:
        if method not in FIXED_STEP_METHODS and method not in ADAPTIVE_METHODS:
            raise choices_error("solver.method", method, [*ADAPTIVE_METHODS, *FIXED_STEP_METHODS])
        if method in FIXED_STEP_METHODS:
            check_num_steps(method, num_steps)
        if method in ADAPTIVE_METHODS and not (atol > 0 and rtol > 0):
            raise UserError(f"solver.atol={atol} and solver.rtol={rtol} must be > 0 for method {method}")
        if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1:
            raise UserError(f"solver.max_nfe={max_nfe!r} is invalid; it must be a positive integer")
        if method in FIXED_STEP_METHODS and STAGES[method] * num_steps > max_nfe:
            raise UserError(
                f"solver.num_steps={num_steps} takes {STAGES[method] * num_steps} field calls with {method}, over "
                f"solver.max_nfe={max_nfe}; raise solver.max_nfe to allow that many"
            )
        self.method, self.atol, self.rtol, self.num_steps = method, float(atol), float(rtol), int(num_steps)
        self.max_nfe = max_nfe

    @property
    def is_adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def check_path(self, path: AffinePath) -> None:
        """Every path's PF-ODE can be integrated."""

    def expected_nfe(self, guided: bool = False) -> int | None:
        return None if self.is_adaptive else STAGES[self.method] * self.num_steps * (2 if guided else 1)

    def describe(self) -> dict[str, Any]:
        if self.is_adaptive:
            return {"method": self.method, "atol": self.atol, "rtol": self.rtol, "max_nfe": self.max_nfe}
        return {"method": self.method, "num_steps": self.num_steps}

    def integrate(
        self,
        field: Any,
        x_start: Tensor | tuple[Tensor, ...],
        t0: float,
        t1: float,
        num_trajectory_times: int = 0,
    ) -> Tensor | tuple[Tensor, ...]:
        """x(t1), or the states at `num_trajectory_times` uniform times in [t0, t1] when that is ≥ 2.

        `x_start` may be a tuple of tensors (an augmented state such as (x, log-density)); t1 < t0 runs backwards.
        """
        like = x_start[0] if isinstance(x_start, tuple) else x_start
        times = torch.linspace(t0, t1, max(num_trajectory_times, 2), dtype=like.dtype, device=like.device)
        if self.is_adaptive:
            # step_t clips the last step onto t1: torchdiffeq otherwise steps past t1 and interpolates back, which
            # would evaluate the field where diffusion schedules are undefined (t > 1: σ_t² < 0 for VP).
            options = {"step_t": times[-1:]}
            try:
                states = odeint(
                    _CappedField(field, self.max_nfe, self),
                    x_start,
                    times,
                    method=ADAPTIVE_METHODS[self.method],
                    atol=self.atol,
                    rtol=self.rtol,
                    options=options,
                )
            except AssertionError as error:  # torchdiffeq's "underflow in dt": non-finite states
                raise SolverError(
                    f"{self!r} could not integrate ({error}): the field is not finite; the model has likely diverged "
                    "(check the training loss, lower optimizer.lr)"
                ) from None
        else:
            grid = uniform_grid(self.num_steps, t0, t1, like)
            options = {"grid_constructor": lambda *_: grid}
            states = odeint(field, x_start, times, method=FIXED_STEP_METHODS[self.method], options=options)
        if num_trajectory_times >= 2:
            return states
        return tuple(s[-1] for s in states) if isinstance(states, tuple) else states[-1]

    def __repr__(self) -> str:
        return describe_repr(self)


class _EnergyField(nn.Module):
    """(x, e) ↦ (v_t(x), ‖v_t(x)‖²): integrating it carries each point along the flow and its kinetic energy."""

    def __init__(self, field: VelocityField) -> None:
        super().__init__()
        self.field = field

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        velocity = self.field(t, state[0])
        return velocity, velocity.flatten(1).pow(2).sum(1)


@dataclass
class PathEnergyResult:
    samples: Tensor
    energy: Tensor  # per trajectory
    start: Tensor
    nfe: int


@torch.no_grad()
def path_energy(field: VelocityField, x0: Tensor, solver: ODESolver) -> PathEnergyResult:
    """Generate from x0 and measure each trajectory's kinetic energy

        E(x0) = ∫_{t_min}^{t_max} ‖v_t(x_t)‖² dt,   x_{t_min} = σ_{t_min} x0,

    integrated by `solver` beside the flow (a fixed-step solver takes the same steps as `sample`). Its mean over
    x0 ~ q0 is the path energy PE of Tong et al. 2024 (§5.1); by Benamou–Brenier PE ≥ W2²(q0, q1), with equality
    for the OT displacement interpolation (straight paths at constant speed)."""
    if not isinstance(solver, ODESolver):
        raise UserError(f"path energy needs an ODE solver, not {solver!r}")
    path = field.path
    field.nfe = 0
    start = path.prior_sample(x0)
    zero = torch.zeros(start.shape[0], dtype=start.dtype, device=start.device)
    samples, energy = solver.integrate(_EnergyField(field), (start, zero), path.t_min, path.t_max)
    return PathEnergyResult(samples=samples, energy=energy, start=start, nfe=field.nfe)

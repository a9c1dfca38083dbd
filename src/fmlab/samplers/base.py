"""The one contract every sampler keeps, and the one fixed-grid loop the grid samplers share.

A sampler integrates the generative process of a field (a `VelocityField`, or any callable v(t, x) with the `path`
it belongs to, such as the exact `MarginalOracle`) from the path's prior at t_min to the data at t_max. NFE is never
the sampler's own claim: it is the number of net calls the field counted (a guided call counts two); fixed-grid
samplers also state it in advance (`expected_nfe`), and the shared contract test checks the two agree. Stochastic
samplers draw from torch's global generator, which the evaluation engine seeds per (draw, chunk), so their samples
are the same under any number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fmlab.errors import UserError
from fmlab.objectives import VelocityField
from fmlab.paths.path import AffinePath


@runtime_checkable
class Sampler(Protocol):
    """What every sampler is: its registry name (`method`), whether its steps adapt to the field and whether it
    draws noise, a check that it fits a path, the integration itself, and every setting that changes its samples."""

    method: str
    is_adaptive: bool
    is_stochastic: bool

    def check_path(self, path: AffinePath) -> None:
        """Raise `UserError` when the sampler cannot integrate this path (e.g. DDPM's posterior on the OT path)."""
        ...

    def integrate(self, field: Any, x_start: Any, t0: float, t1: float, num_trajectory_times: int = 0) -> Any:
        """x(t1) from x(t0) = `x_start`, or the states at `num_trajectory_times` ≥ 2 evenly spaced grid points."""
        ...

    def expected_nfe(self, guided: bool = False) -> int | None:
        """Net calls of one integration (None when the steps adapt); twice as many when guided."""
        ...

    def describe(self) -> dict[str, Any]:
        """Every setting that changes the samples, by name (metrics.json and the result card record it)."""
        ...


def describe_repr(sampler: Sampler) -> str:
    """`Name(setting=value, ...)` from `describe()`: the repr and the record can never disagree."""
    settings = {k: v for k, v in sampler.describe().items() if k != "method"}
    return f"{type(sampler).__name__}({sampler.method}, " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


@dataclass
class SampleResult:
    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None  # (num_times, batch, ...) when requested
    times: Tensor | None = None


@torch.no_grad()
def sample(field: VelocityField, x0: Tensor, sampler: Sampler, num_trajectory_times: int = 0) -> SampleResult:
    """Generate from source samples x0: integrate from the path's prior sample σ_{t_min} x0 at t_min to t_max.
    NFE is the exact number of net calls, counted by the field."""
    path = field.path
    field.nfe = 0
    states = sampler.integrate(field, path.prior_sample(x0), path.t_min, path.t_max, num_trajectory_times)
    if num_trajectory_times >= 2:
        times = torch.linspace(path.t_min, path.t_max, num_trajectory_times)
        return SampleResult(samples=states[-1], nfe=field.nfe, trajectory=states, times=times)
    return SampleResult(samples=states, nfe=field.nfe)


def _times(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).expand(x.shape[0])


def marginal_score(field: Any, t: Tensor, x: Tensor, velocity: Tensor | None = None) -> Tensor:
    """∇ log p_t(x) from the PF-ODE velocity of `field` (one call unless `velocity` is given), through the path's
    affine conversions: ε̂ = (α v − α̇ x)/(α σ̇ − α̇ σ), ŝ = −ε̂/σ_t (Tweedie). Any method on a Gaussian path gives its
    score so, whatever its net predicts."""
    path: AffinePath = field.path
    v = field(t, x) if velocity is None else velocity
    times = _times(t, x)
    return path.score_from_epsilon(path.epsilon_from_velocity(v, x, times), x, times)


def denoised(field: Any, t: Tensor, x: Tensor) -> Tensor:
    """E[x1 | x_t = x] = (x − σ_t ε̂)/α_t from the velocity of `field`: the denoiser D of Karras et al. 2022."""
    path: AffinePath = field.path
    times = _times(t, x)
    return path.x1_from_epsilon(path.epsilon_from_velocity(field(t, x), x, times), x, times)


def kept_steps(num_steps: int, num_trajectory_times: int) -> set[int]:
    """The grid indices 0..N a trajectory of `num_trajectory_times` states keeps (both ends always)."""
    return set(torch.linspace(0, num_steps, max(num_trajectory_times, 2)).round().long().tolist())


def run_grid(step: Callable[[int, Tensor], Tensor], x: Tensor, num_steps: int, num_trajectory_times: int = 0) -> Tensor:
    """The fixed-grid loop: x_{i+1} = step(i, x_i) for i = 0..N−1. Returns x_N, or the kept states stacked
    (`kept_steps`) when `num_trajectory_times` ≥ 2."""
    keep = kept_steps(num_steps, num_trajectory_times)
    states = [x] if 0 in keep else []
    for i in range(num_steps):
        x = step(i, x)
        if i + 1 in keep:
            states.append(x)
    return torch.stack(states) if num_trajectory_times >= 2 else x


def uniform_grid(num_steps: int, t0: float, t1: float, like: Tensor) -> Tensor:
    """t0 = t_0 < ... < t_N = t1, evenly spaced, in `like`'s dtype and device."""
    return torch.linspace(t0, t1, num_steps + 1, dtype=like.dtype, device=like.device)


def check_num_steps(sampler: str, num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(
            f"solver.num_steps={num_steps!r} is invalid for solver={sampler}; it must be a whole number >= 1"
        )
    return num_steps


def check_gaussian_path(path: AffinePath, sampler: str, ends: Tensor, need_alpha: bool) -> None:
    """A sampler that converts the velocity to a score (or ε, or x1) needs x_t = α_t x1 + σ_t ε with no smoothing
    noise, and α_t > 0 where it steps when it divides by α_t."""
    alpha, sigma = path.schedule.alpha(ends), path.schedule.sigma(ends)
    bad_alpha = need_alpha and bool((alpha <= 0).any())
    if path.has_smoothing or bad_alpha or bool((sigma <= 0).any()):
        raise UserError(
            f"solver={sampler} does not fit {path!r}: it converts the velocity to a score, which needs a Gaussian path "
            f"without smoothing noise{' and α_t > 0' if need_alpha else ''} and σ_t > 0 where it steps (here "
            f"α={alpha.tolist()}, σ={sigma.tolist()} at t={ends.tolist()}); use an ODE solver (solver=dopri5), or a "
            "diffusion path (method=ddpm|fm_vp|score_ve)"
        )

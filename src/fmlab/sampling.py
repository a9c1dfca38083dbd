"""Sampling through the probability-flow ODE dx/dt = v_t(x) on torchdiffeq, with an exact count of net calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from fmlab.errors import UserError, choices_error
from fmlab.objectives import Objective
from fmlab.paths.path import AffinePath

FIXED_STEP_METHODS = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun": "heun2",
    "heun3": "heun3",
    "rk4": "rk4",
}
# torchdiffeq's bosh3 is left out: at tight tolerances its end-point interpolation misses the tolerance ~1000x.
ADAPTIVE_METHODS = {"dopri5": "dopri5", "dopri8": "dopri8", "adaptive_heun": "adaptive_heun"}


def guided_prediction(conditional: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): f̃ = (1 + w) f(x, t, y) − w f(x, t, ∅).

    w = 0 is the conditional model, w = −1 the unconditional one; SiT and diffusers write s = 1 + w. Applied to
    whatever the net predicts; every objective's `to_velocity` is affine in the prediction with coefficients that do
    not depend on it, so guiding the prediction or the velocity gives the same guided velocity.
    """
    return (1.0 + guidance_scale) * conditional - guidance_scale * unconditional


class VelocityField(nn.Module):
    """v_t(x) = objective.to_velocity(net(t, x), x, t): the PF-ODE drift of any method. Counts net evaluations in
    `nfe` (one per call; two per guided call, whose conditional and unconditional halves run as one batch).

    A class-conditional net (`net.num_classes` = K > 0) is asked for `labels` set with `conditioned_on(labels, w)`,
    guided with scale w; without labels it is the unconditional model (the null class ∅)."""

    def __init__(self, net: nn.Module, objective: Objective, path: AffinePath) -> None:
        super().__init__()
        self.net, self.objective, self.path = net, objective, path
        self.nfe = 0
        self.labels: Tensor | None = None
        self.guidance_scale = 0.0

    @property
    def num_classes(self) -> int:
        """K for a class-conditional net, 0 for an unconditional one."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    @contextmanager
    def conditioned_on(self, labels: Tensor | None, guidance_scale: float = 0.0) -> Iterator[VelocityField]:
        """Within the block the field generates class `labels[i]` for row i, guided with scale w."""
        if labels is not None and not self.num_classes:
            raise UserError("class labels were given to an unconditional run; train it with conditioning=class")
        if guidance_scale and labels is None:
            raise UserError(f"eval.guidance_scale={guidance_scale} needs class labels to guide towards")
        saved = self.labels, self.guidance_scale
        self.labels, self.guidance_scale = labels, float(guidance_scale)
        try:
            yield self
        finally:
            self.labels, self.guidance_scale = saved

    def prediction(self, t: Tensor, x: Tensor) -> Tensor:
        """What the net predicts at (t, x) for this field's labels, guided when a scale is set."""
        if self.labels is None:
            self.nfe += 1
            return self.net(t, x)
        if self.guidance_scale == 0.0:
            self.nfe += 1
            return self.net(t, x, labels=self.labels)
        self.nfe += 2
        null = torch.full_like(self.labels, self.num_classes)
        both = self.net(torch.cat([t, t]), torch.cat([x, x]), labels=torch.cat([self.labels, null]))
        conditional, unconditional = both.chunk(2)
        return guided_prediction(conditional, unconditional, self.guidance_scale)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t_batch = t.to(x.dtype).expand(x.shape[0])
        return self.objective.to_velocity(self.prediction(t_batch, x), x, t_batch, self.path)


class SolverError(UserError):
    """An integration that cannot finish: the NFE cap was reached or the step size underflowed (a diverged model)."""


class _CappedField:
    """`field` that raises `SolverError` once it has been called more than `max_nfe` times in one integration."""

    def __init__(self, field: nn.Module, max_nfe: int, solver: ODESolver) -> None:
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


@dataclass
class ODEResult:
    samples: Tensor
    nfe: int
    trajectory: Tensor | None = None  # (num_times, batch, ...) when requested
    times: Tensor | None = None


class ODESolver:
    """Integrates dx/dt = field(t, x) from t0 to t1 with a torchdiffeq method.

    Adaptive methods (dopri5, ...) use `atol`/`rtol` and stop with a `SolverError` after `max_nfe` field calls
    in one integration (an exploded model otherwise shrinks the step for ever); fixed-step methods (euler, midpoint,
    heun, rk4) take `num_steps` uniform steps. NFE is the number of field calls, counted by the caller's field.
    """

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
        if method in FIXED_STEP_METHODS and num_steps < 1:
            raise UserError(f"solver.num_steps={num_steps} must be >= 1 for method {method}")
        if method in ADAPTIVE_METHODS and (atol <= 0 or rtol <= 0):
            raise UserError(f"solver.atol={atol} and solver.rtol={rtol} must be > 0 for method {method}")
        if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1:
            raise UserError(f"solver.max_nfe={max_nfe!r} is invalid; it must be a positive integer")
        self.method, self.atol, self.rtol, self.num_steps = method, float(atol), float(rtol), int(num_steps)
        self.max_nfe = max_nfe

    def check_path(self, path: AffinePath) -> None:
        """Every path's PF-ODE can be integrated."""

    @property
    def is_adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def integrate(
        self,
        field: nn.Module,
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
            grid = torch.linspace(t0, t1, self.num_steps + 1, dtype=like.dtype, device=like.device)
            options = {"grid_constructor": lambda *_: grid}
            states = odeint(field, x_start, times, method=FIXED_STEP_METHODS[self.method], options=options)
        if num_trajectory_times >= 2:
            return states
        return tuple(s[-1] for s in states) if isinstance(states, tuple) else states[-1]

    def __repr__(self) -> str:
        if self.is_adaptive:
            return f"ODESolver({self.method}, atol={self.atol}, rtol={self.rtol}, max_nfe={self.max_nfe})"
        return f"ODESolver({self.method}, num_steps={self.num_steps})"


class AncestralSampler:
    """DDPM's ancestral sampler (Ho et al. 2020, Alg. 2) on a uniform grid t_min = t_0 < ... < t_N = t_max.

    Between grid times the forward process is x_i = a x_{i+1} + b z with a = α_i/α_{i+1}, b² = σ_i² − a² σ_{i+1}²
    (i + 1 is nearer the data), and each step draws from its Gaussian posterior given x̂1 = (x − σ_i ε̂)/α_i:

        mean = (a σ_{i+1}² / σ_i²) x_i + (α_{i+1} b² / σ_i²) x̂1,   variance = b² σ_{i+1}² / σ_i²,

    without noise on the last step. ε̂ comes from the PF-ODE velocity through the path, so any method on a Gaussian
    path can use it; with the VP path and N = 1000 this is DDPM's 1000-step sampler. NFE = N.
    """

    is_adaptive = False

    def __init__(self, num_steps: int = 1000) -> None:
        if num_steps < 1:
            raise UserError(f"solver.num_steps={num_steps} must be >= 1 for the ancestral sampler")
        self.method, self.num_steps = "ancestral", int(num_steps)

    def check_path(self, path: AffinePath) -> None:
        """The posterior step divides by α_t and σ_t on the whole grid and assumes x_t = α_t x1 + σ_t ε: refuse
        paths with smoothing noise or with α_t = 0 or σ_t = 0 at an end (the OT path has α_0 = 0)."""
        ends = torch.tensor([path.t_min, path.t_max], dtype=torch.float64)
        alpha, sigma = path.schedule.alpha(ends), path.schedule.sigma(ends)
        if path.has_smoothing or bool((alpha <= 0).any()) or bool((sigma <= 0).any()):
            raise UserError(
                f"solver=ancestral does not fit {path!r}: it needs a Gaussian path with α_t > 0 and σ_t > 0 from "
                f"t_min to t_max and no smoothing noise (here α={alpha.tolist()}, σ={sigma.tolist()} at "
                f"t={ends.tolist()}); use an ODE solver (solver=dopri5) or a diffusion path "
                "(method=ddpm|fm_vp|score_ve)"
            )

    def integrate(self, field: VelocityField, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        path = field.path
        self.check_path(path)
        grid = torch.linspace(t0, t1, self.num_steps + 1, dtype=x_start.dtype, device=x_start.device)
        alpha, sigma = path.schedule.alpha(grid), path.schedule.sigma(grid)
        x = x_start
        keep = set(torch.linspace(0, self.num_steps, max(num_trajectory_times, 2)).round().long().tolist())
        states = [x] if 0 in keep else []
        for i in range(self.num_steps):
            epsilon = path.epsilon_from_velocity(field(grid[i], x), x, grid[i].expand(x.shape[0]))
            x1_hat = (x - sigma[i] * epsilon) / alpha[i]
            a = alpha[i] / alpha[i + 1]
            b2 = (sigma[i] ** 2 - a**2 * sigma[i + 1] ** 2).clamp_min(0)
            x = (a * sigma[i + 1] ** 2 / sigma[i] ** 2) * x + (alpha[i + 1] * b2 / sigma[i] ** 2) * x1_hat
            if i + 1 < self.num_steps:
                x = x + torch.sqrt(b2 * sigma[i + 1] ** 2 / sigma[i] ** 2) * torch.randn_like(x)
            if i + 1 in keep:
                states.append(x)
        return torch.stack(states) if num_trajectory_times >= 2 else x

    def __repr__(self) -> str:
        return f"AncestralSampler(num_steps={self.num_steps})"


@torch.no_grad()
def sample(
    field: VelocityField, x0: Tensor, solver: ODESolver | AncestralSampler, num_trajectory_times: int = 0
) -> ODEResult:
    """Generate from source samples x0: integrate the PF-ODE from the path's t_min to t_max.

    The start point is the path's prior sample σ_{t_min} x0; NFE is the exact number of net calls. The ancestral
    sampler (DDPM) goes the same way with its stochastic steps.
    """
    path = field.path
    field.nfe = 0
    states = solver.integrate(field, path.prior_sample(x0), path.t_min, path.t_max, num_trajectory_times)
    if num_trajectory_times >= 2:
        times = torch.linspace(path.t_min, path.t_max, num_trajectory_times)
        return ODEResult(samples=states[-1], nfe=field.nfe, trajectory=states, times=times)
    return ODEResult(samples=states, nfe=field.nfe)


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

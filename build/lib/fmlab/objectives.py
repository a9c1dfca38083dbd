"""Objectives: what the network predicts, its regression loss, and its conversion to a PF-ODE velocity.

Every objective turns the network output into the velocity of the probability-flow ODE (`to_velocity`), so every
method samples and evaluates likelihoods through the same ODE code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from fmlab.errors import UserError
from fmlab.paths.path import AffinePath


class Objective(ABC):
    """loss = E_{t, x0, x1} w(t) ‖net(t, x_t) − target‖², averaged over batch and dimensions."""

    # ε, score and x1 are interchangeable only when x0 ~ N(0, I): such objectives refuse a data source.
    needs_gaussian_source: bool = False

    def sample_time(self, path: AffinePath, n: int, device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
        """Training times; uniform on the path's range unless the objective importance-samples them."""
        return path.sample_time(n, device=device, dtype=dtype)

    @abstractmethod
    def loss(self, net: nn.Module, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None) -> Tensor:
        """The regression loss of `net` on one (coupled) batch at times `t`."""

    @abstractmethod
    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        """The PF-ODE velocity v_t(x) implied by the network output at (t, x)."""


class VelocityObjective(Objective):
    """Conditional flow matching (seed 001, L_CFM of §3.2): E ‖v_θ(t, x_t) − u_t(x_t | x1)‖².

    The network predicts the velocity itself, so `to_velocity` is the identity.
    """

    def loss(self, net: nn.Module, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None) -> Tensor:
        x_t, u_t = path.sample_with_target(t, x0, x1, noise)
        return (net(t, x_t) - u_t).pow(2).mean()

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return output

    def __repr__(self) -> str:
        return "VelocityObjective()"


def _require_gaussian_path(path: AffinePath, name: str) -> None:
    if path.has_smoothing:
        raise UserError(f"objective={name} needs a Gaussian path without smoothing noise; got {path!r}")


class EpsilonObjective(Objective):
    """DDPM's noise prediction (Ho et al. 2020): E ‖ε_θ(t, x_t) − ε‖² with x_t = α_t x1 + σ_t ε.

    PF-ODE velocity: v = α̇ x̂1 + σ̇ ε̂ with x̂1 = (x − σ ε̂)/α (`AffinePath.velocity_from_epsilon`).
    """

    needs_gaussian_source = True

    def loss(self, net: nn.Module, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None) -> Tensor:
        _require_gaussian_path(path, "epsilon")
        x_t, _ = path.sample_with_target(t, x0, x1)
        return (net(t, x_t) - x0).pow(2).mean()

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return path.velocity_from_epsilon(output, x, t)

    def __repr__(self) -> str:
        return "EpsilonObjective()"


class ScoreObjective(Objective):
    """Denoising score matching with λ(t) = σ_t² (Song & Ermon 2019; Song et al. 2021, eq. 7):

    E σ_t² ‖s_θ(t, x_t) − ∇ log p_t(x_t | x1)‖², with ∇ log p_t(x_t | x1) = −ε/σ_t. The score network's output
    is divided by σ_t (`scale_by_sigma`, NCSN's parameterisation), s_θ = −net/σ_t, which keeps its scale O(1).
    """

    needs_gaussian_source = True

    def __init__(self, scale_by_sigma: bool = True) -> None:
        self.scale_by_sigma = scale_by_sigma

    def score(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return path.score_from_epsilon(output, x, t) if self.scale_by_sigma else output

    def weight(self, path: AffinePath, t: Tensor) -> Tensor:
        return path.schedule.sigma(t) ** 2

    def loss(self, net: nn.Module, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None) -> Tensor:
        _require_gaussian_path(path, type(self).__name__)
        x_t, _ = path.sample_with_target(t, x0, x1)
        target_score = path.score_from_epsilon(x0, x_t, t)
        squared_error = (self.score(net(t, x_t), x_t, t, path) - target_score).pow(2).flatten(1).mean(1)
        return (self.weight(path, t) * squared_error).mean()

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        epsilon = path.epsilon_from_score(self.score(output, x, t, path), x, t)
        return path.velocity_from_epsilon(epsilon, x, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale_by_sigma={self.scale_by_sigma})"


class ScoreLikelihoodObjective(ScoreObjective):
    """ScoreFlow's likelihood weighting λ(t) = g(t)² (Song et al. 2021b, Thm. 1), which bounds the NLL.

    g²/σ² = d/dt log SNR(t) with SNR = α²/σ², so drawing t uniformly in log-SNR is the importance sampling that
    makes the weight constant: loss = Z · E ‖σ_t s_θ + ε‖², Z = log SNR(t_max) − log SNR(t_min). Same expectation
    as E_{t~U} g² ‖s_θ − ∇ log p_t(x | x1)‖² up to the factor (t_max − t_min), far lower variance.
    """

    TABLE_SIZE = 4097

    def __init__(self, scale_by_sigma: bool = True, importance_sampling: bool = True) -> None:
        super().__init__(scale_by_sigma)
        self.importance_sampling = importance_sampling
        self._inverse_tables: dict[int, tuple[AffinePath, Tensor]] = {}

    @staticmethod
    def log_snr(path: AffinePath, t: Tensor) -> Tensor:
        return 2 * (torch.log(path.schedule.alpha(t)) - torch.log(path.schedule.sigma(t)))

    def _inverse_log_snr_table(self, path: AffinePath) -> Tensor:
        """t at 4,097 equally spaced log-SNR values on [t_min, t_max], found once per path by bisection."""
        cached = self._inverse_tables.get(id(path))
        if cached is not None and cached[0] is path:
            return cached[1]
        bounds = torch.tensor([path.t_min, path.t_max], dtype=torch.float64)
        low, high = self.log_snr(path, bounds).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"objective=score_likelihood needs a finite log-SNR on [t_min, t_max]; {path!r} has none")
        target = torch.linspace(low, high, self.TABLE_SIZE, dtype=torch.float64)
        lo, hi = torch.full_like(target, path.t_min), torch.full_like(target, path.t_max)
        for _ in range(60):  # log-SNR increases with t: bisection to float64 resolution
            mid = 0.5 * (lo + hi)
            below = self.log_snr(path, mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        table = 0.5 * (lo + hi)
        table[0], table[-1] = path.t_min, path.t_max
        self._inverse_tables[id(path)] = (path, table)
        return table

    def sample_time(self, path: AffinePath, n: int, device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
        """t with log SNR(t) ~ U[log SNR(t_min), log SNR(t_max)]: the inverse is tabulated once and interpolated."""
        if not self.importance_sampling:
            return path.sample_time(n, device=device, dtype=dtype)
        table = self._inverse_log_snr_table(path)
        position = torch.rand(n, dtype=torch.float64) * (self.TABLE_SIZE - 1)
        index = position.floor().long().clamp(max=self.TABLE_SIZE - 2)
        t = torch.lerp(table[index], table[index + 1], position - index)
        return t.to(device=device, dtype=dtype or torch.get_default_dtype())

    def weight(self, path: AffinePath, t: Tensor) -> Tensor:
        g2_over_sigma2 = path.diffusion_squared(t) / path.schedule.sigma(t) ** 2
        if not self.importance_sampling:
            return g2_over_sigma2 * path.schedule.sigma(t) ** 2
        # t ~ p(t) ∝ g²/σ²: the weight g² divided by that density, times σ² absorbed into ‖σ s + ε‖².
        bounds = torch.tensor([path.t_min, path.t_max], dtype=torch.float64)
        low, high = self.log_snr(path, bounds).tolist()
        return torch.full_like(t, high - low) * path.schedule.sigma(t) ** 2

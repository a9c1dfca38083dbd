"""EDM's Heun sampler (Karras et al. 2022, Alg. 2) in the noise-ratio view of any affine Gaussian path."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fmlab.errors import UserError
from fmlab.objectives import VelocityField
from fmlab.paths.path import AffinePath
from fmlab.samplers.base import check_gaussian_path, check_num_steps, denoised, describe_repr, run_grid


class EDMHeun:
    """Karras et al. 2022, Alg. 2: Heun's 2nd-order method on dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃ in the noise-ratio view
    x̃ = x/α_t, σ̃ = σ_t/α_t of this path (`AffinePath.noise_ratio`), over the grid

        σ̃_i = (σ_max^{1/ρ} + i/(N − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  i < N,  σ̃_N = 0,

    with σ_max, σ_min clipped to the path's range of σ̃; D is the denoiser E[x1 | x_t] at t(σ̃), the path's
    `time_of_noise_ratio`, found once for the whole grid before the first step. With S_churn > 0, each step with
    σ̃_i in [S_min, S_max] first raises σ̃ by γ = min(S_churn/N, √2 − 1) with fresh noise of scale S_noise. No
    second-order correction on the last step: NFE = 2N − 1 (35 for EDM's N = 18).
    """

    is_adaptive = False

    infinite_settings = ("s_max",)  # churn up to every noise level (Karras et al.'s default)

    def __init__(
        self,
        num_steps: int = 18,
        rho: float = 7.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        s_churn: float = 0.0,
        s_min: float = 0.0,
        s_max: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        check_num_steps("edm_heun", num_steps)
        if not (rho > 0 and 0 < sigma_min < sigma_max and s_churn >= 0 and s_noise >= 0):
            raise UserError(
                f"solver.rho={rho} must be > 0, 0 < solver.sigma_min={sigma_min} < solver.sigma_max={sigma_max}, "
                f"solver.s_churn={s_churn} >= 0 and solver.s_noise={s_noise} >= 0 for solver=edm_heun"
            )
        if s_churn > 0 and not 0 <= s_min <= s_max:
            # an empty churn window would run without churn while the record says s_churn > 0
            raise UserError(
                f"solver.s_min={s_min} and solver.s_max={s_max} leave no noise level to churn (solver.s_churn="
                f"{s_churn}); need 0 <= s_min <= s_max, or s_churn=0"
            )
        self.method, self.num_steps, self.rho = "edm_heun", int(num_steps), float(rho)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.s_churn, self.s_min, self.s_max, self.s_noise = float(s_churn), float(s_min), float(s_max), float(s_noise)

    @property
    def is_stochastic(self) -> bool:
        return self.s_churn > 0 and self.s_noise > 0

    @property
    def gamma(self) -> float:
        return min(self.s_churn / self.num_steps, math.sqrt(2) - 1)

    def check_path(self, path: AffinePath) -> None:
        check_gaussian_path(path, self.method, torch.tensor([path.t_max], dtype=torch.float64), need_alpha=True)

    def expected_nfe(self, guided: bool = False) -> int:
        return (2 * self.num_steps - 1) * (2 if guided else 1)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "num_steps": self.num_steps, "rho": self.rho, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "s_churn": self.s_churn, "s_min": self.s_min, "s_max": self.s_max,
                "s_noise": self.s_noise}  # fmt: skip

    def noise_levels(self, path: AffinePath) -> Tensor:
        """σ̃_0 > ... > σ̃_{N−1} > σ̃_N = 0, the ρ-spaced grid inside the path's range."""
        with torch.no_grad():
            largest, smallest = (float(r) for r in path.noise_ratio(torch.tensor([path.t_min, path.t_max]).double()))
        high = min(self.sigma_max, largest if math.isfinite(largest) else math.inf)
        low = max(self.sigma_min, smallest)
        steps = torch.arange(self.num_steps, dtype=torch.float64) / max(self.num_steps - 1, 1)
        levels = (high ** (1 / self.rho) + steps * (low ** (1 / self.rho) - high ** (1 / self.rho))) ** self.rho
        return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])

    def churned_levels(self, levels: Tensor) -> Tensor:
        """σ̂_i = σ̃_i (1 + γ) where σ̃_i lies in [S_min, S_max] (churn on), else σ̃_i."""
        window = (levels >= self.s_min) & (levels <= self.s_max) & (levels > 0)
        return torch.where(window, levels * (1 + self.gamma), levels) if self.gamma > 0 else levels

    def integrate(self, field: VelocityField, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        path = field.path
        self.check_path(path)
        levels = self.noise_levels(path)
        raised = self.churned_levels(levels)
        # t of every level the loop visits, once: σ̂_i (the start of step i) and σ̃_{i+1} (its end)
        visited = torch.cat([raised[:-1], levels[1:-1]])
        times = path.time_of_noise_ratio(visited).to(x_start)
        start_times, end_times = times[: self.num_steps], times[self.num_steps :]
        levels, raised = levels.to(x_start), raised.to(x_start)

        def slope(x_tilde: Tensor, level: Tensor, t: Tensor) -> Tensor:
            return (x_tilde - denoised(field, t, path.schedule.alpha(t) * x_tilde)) / level

        def step(i: int, x: Tensor) -> Tensor:
            level, following = raised[i], levels[i + 1]
            if level > levels[i]:  # churn: raise the noise level with fresh noise
                x = x + torch.sqrt(level**2 - levels[i] ** 2) * self.s_noise * torch.randn_like(x)
            d = slope(x, level, start_times[i])
            proposal = x + (following - level) * d
            if i + 1 == self.num_steps:
                return proposal
            return x + (following - level) * 0.5 * (d + slope(proposal, following, end_times[i]))

        # x_start = σ_{t_min} z (the path's prior sample): start from x̃ = σ̃_0 z
        x = levels[0] * (x_start / path.prior_std(x_start))
        return run_grid(step, x, self.num_steps, num_trajectory_times)

    def __repr__(self) -> str:
        return describe_repr(self)

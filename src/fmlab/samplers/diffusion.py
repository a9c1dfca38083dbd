"""The diffusion baselines' own samplers on the one path abstraction: DDPM's ancestral sampler, Euler–Maruyama on
the reverse-time SDE and score_sde's predictor–corrector, built from shared steps over the shared grid loop.

Each reads ε̂, x̂1 or the score from the PF-ODE velocity through the path's affine conversions
(`marginal_score`, `denoised`), so any method on a Gaussian path (x_t = α_t x1 + σ_t ε, no smoothing noise)
can use any of them, whatever its net predicts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fmlab.errors import UserError, choices_error
from fmlab.objectives import VelocityField
from fmlab.paths.path import AffinePath
from fmlab.samplers.base import (
    check_gaussian_path,
    check_num_steps,
    denoised,
    describe_repr,
    marginal_score,
    run_grid,
    uniform_grid,
)

PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def _ends(path: AffinePath) -> Tensor:
    return torch.tensor([path.t_min, path.t_max], dtype=torch.float64)


def euler_maruyama_step(field: VelocityField, t: Tensor, dt: Tensor, x: Tensor, g2: Tensor, noise: bool) -> Tensor:
    """One Euler–Maruyama step of the generative SDE with the path's marginals (seed notes: reverse-time SDE,
    Fokker–Planck), in flow time: x ← x + [v_t(x) + ½ ε_t² ∇ log p_t(x)] dt + ε_t √dt z, with ε_t² = `g2`.
    g2 = 0 is the Euler step of the PF-ODE (one net call either way)."""
    v = field(t, x)
    if float(g2) == 0:
        return x + v * dt
    x = x + (v + 0.5 * g2 * marginal_score(field, t, x, velocity=v)) * dt
    return x + torch.sqrt(g2 * dt) * torch.randn_like(x) if noise else x


def langevin_step(field: VelocityField, t: Tensor, x: Tensor, snr: float) -> Tensor:
    """One step of Langevin dynamics at fixed t, which leaves p_t invariant as the step shrinks:
    x ← x + η ∇ log p_t(x) + √(2η) z, with score_sde's step η = 2 (snr ‖z‖ / ‖∇ log p_t(x)‖)², the norms averaged
    over the batch. One η for the whole batch: a step that varied with x would not leave p_t invariant. The
    evaluation's batches are its fixed chunks, so η (and the samples) do not depend on the number of processes."""
    score = marginal_score(field, t, x)
    z = torch.randn_like(x)
    score_norm = score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    step = 2 * (snr * z.flatten(1).norm(dim=1).mean() / score_norm) ** 2
    return x + step * score + torch.sqrt(2 * step) * z


class AncestralSampler:
    """DDPM's ancestral sampler (Ho et al. 2020, Alg. 2) on a uniform grid t_min = t_0 < ... < t_N = t_max: each
    step draws x_{i+1} from the Gaussian posterior q(x_{i+1} | x_i, x̂1) of the path's forward transition
    (`AffinePath.posterior_step`) with x̂1 = E[x1 | x_i], without noise on the last step. With the VP path and
    N = 1000 this is DDPM's 1000-step sampler. NFE = N.
    """

    is_adaptive = False
    is_stochastic = True

    def __init__(self, num_steps: int = 1000) -> None:
        self.method, self.num_steps = "ancestral", check_num_steps("ancestral", num_steps)

    def check_path(self, path: AffinePath) -> None:
        """The posterior step divides by α_t and σ_t on the whole grid (the OT path has α_0 = 0)."""
        check_gaussian_path(path, self.method, _ends(path), need_alpha=True)

    def expected_nfe(self, guided: bool = False) -> int:
        return self.num_steps * (2 if guided else 1)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "num_steps": self.num_steps}

    def integrate(self, field: VelocityField, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        self.check_path(field.path)
        grid = uniform_grid(self.num_steps, t0, t1, x_start)

        def step(i: int, x: Tensor) -> Tensor:
            mean, std = field.path.posterior_step(x, denoised(field, grid[i], x), grid[i], grid[i + 1])
            return mean + std * torch.randn_like(x) if i + 1 < self.num_steps else mean

        return run_grid(step, x_start, self.num_steps, num_trajectory_times)

    def __repr__(self) -> str:
        return describe_repr(self)


class EulerMaruyama:
    """Euler–Maruyama on the generative SDE dx = [v_t(x) + ½ ε_t² ∇ log p_t(x)] dt + ε_t dW_t, which has the same
    marginals as the PF-ODE for every diffusion level ε_t (`euler_maruyama_step`). `diffusion="g2"` takes the path's
    own ε_t² = g_t² = 2σ_t²(α̇_t/α_t − σ̇_t/σ_t), the reverse process of the score SDE; a number c takes ε_t = c (c = 0
    is the Euler ODE sampler, sample for sample). The last step adds no noise (the papers' denoised output).
    NFE = `num_steps`.
    """

    is_adaptive = False

    def __init__(self, num_steps: int = 100, diffusion: str | float = "g2") -> None:
        if diffusion != "g2" and (isinstance(diffusion, bool) or not isinstance(diffusion, int | float)):
            raise UserError(f"solver.diffusion={diffusion!r} is invalid; choose g2 (the path's own) or a number >= 0")
        if diffusion != "g2" and not diffusion >= 0:
            raise UserError(f"solver.diffusion={diffusion} is invalid; a constant diffusion level must be >= 0")
        self.method, self.num_steps = "euler_maruyama", check_num_steps("euler_maruyama", num_steps)
        self.diffusion = diffusion

    @property
    def is_stochastic(self) -> bool:
        return self.diffusion != 0

    def check_path(self, path: AffinePath) -> None:
        # g² = 2σ²(α̇/α − σ̇/σ) is infinite where α = 0 (the OT path at t = 0); a constant level is not
        check_gaussian_path(path, f"euler_maruyama (solver.diffusion={self.diffusion})", _ends(path),
                            need_alpha=self.diffusion == "g2")  # fmt: skip

    def expected_nfe(self, guided: bool = False) -> int:
        return self.num_steps * (2 if guided else 1)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "num_steps": self.num_steps, "diffusion": self.diffusion}

    def diffusion_squared(self, path: AffinePath, t: Tensor) -> Tensor:
        return path.diffusion_squared(t) if self.diffusion == "g2" else torch.full_like(t, float(self.diffusion) ** 2)

    def integrate(self, field: VelocityField, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        self.check_path(field.path)
        grid = uniform_grid(self.num_steps, t0, t1, x_start)

        def step(i: int, x: Tensor) -> Tensor:
            g2 = self.diffusion_squared(field.path, grid[i])
            return euler_maruyama_step(field, grid[i], grid[i + 1] - grid[i], x, g2, noise=i + 1 < self.num_steps)

        return run_grid(step, x_start, self.num_steps, num_trajectory_times)

    def __repr__(self) -> str:
        return describe_repr(self)


class PredictorCorrector:
    """score_sde's predictor–corrector sampler (Song et al. 2021, Alg. 1–2) on the path's uniform grid.

    At each t_i: `n_corrector_steps` Langevin steps at fixed t (`langevin_step`), then one predictor step to
    t_{i+1}: `reverse_diffusion` inverts the forward transition x_i = a x_{i+1} + b z (`AffinePath.
    forward_transition`): x ← (2 − a) x + b² ŝ + b z; `euler_maruyama` is `euler_maruyama_step` with the path's g².
    The last predictor step adds no noise. NFE = `num_steps` × (1 + `n_corrector_steps`).
    """

    is_adaptive = False
    is_stochastic = True

    def __init__(
        self, num_steps: int = 1000, predictor: str = "reverse_diffusion", snr: float = 0.16, n_corrector_steps: int = 1
    ) -> None:
        if predictor not in PREDICTORS:
            raise choices_error("solver.predictor", predictor, PREDICTORS)
        if isinstance(n_corrector_steps, bool) or not isinstance(n_corrector_steps, int) or n_corrector_steps < 0:
            raise UserError(f"solver.n_corrector_steps={n_corrector_steps!r} must be a whole number >= 0 for solver=pc")
        if not snr > 0:
            raise UserError(f"solver.snr={snr} must be > 0 for solver=pc")
        self.method, self.num_steps, self.predictor = "pc", check_num_steps("pc", num_steps), predictor
        self.snr, self.n_corrector_steps = float(snr), int(n_corrector_steps)

    def check_path(self, path: AffinePath) -> None:
        check_gaussian_path(path, self.method, _ends(path), need_alpha=True)

    def expected_nfe(self, guided: bool = False) -> int:
        return self.num_steps * (1 + self.n_corrector_steps) * (2 if guided else 1)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "num_steps": self.num_steps, "predictor": self.predictor, "snr": self.snr,
                "n_corrector_steps": self.n_corrector_steps}  # fmt: skip

    def integrate(self, field: VelocityField, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        path = field.path
        self.check_path(path)
        grid = uniform_grid(self.num_steps, t0, t1, x_start)

        def step(i: int, x: Tensor) -> Tensor:
            t, noise = grid[i], i + 1 < self.num_steps
            for _ in range(self.n_corrector_steps):
                x = langevin_step(field, t, x, self.snr)
            if self.predictor == "euler_maruyama":
                return euler_maruyama_step(field, t, grid[i + 1] - t, x, path.diffusion_squared(t), noise)
            a, b2 = path.forward_transition(t, grid[i + 1])
            x = (2 - a) * x + b2 * marginal_score(field, t, x)
            return x + torch.sqrt(b2) * torch.randn_like(x) if noise else x

        return run_grid(step, x_start, self.num_steps, num_trajectory_times)

    def __repr__(self) -> str:
        return describe_repr(self)

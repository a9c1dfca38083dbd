"""The baselines' own samplers on the one path abstraction: the reverse-time SDE (Euler–Maruyama), score_sde's
predictor–corrector and EDM's Heun sampler.

Every sampler reads the marginal score, ε and x1 predictions from the PF-ODE velocity v_t(x) through the path's
affine conversions (`AffinePath.epsilon_from_velocity`, ...), so any method on a Gaussian path (x_t = α_t x1 + σ_t ε,
no smoothing noise) can use any of them, whatever its net predicts. NFE is the number of field calls, counted by the
field as for the ODE solvers. Their noise comes from torch's global generator, which the evaluation engine seeds per
(draw, chunk), so stochastic samples are the same under any number of processes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fmlab.errors import UserError, choices_error
from fmlab.paths.path import AffinePath
from fmlab.paths.time_samplers import bisect_time

PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def _times(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).expand(x.shape[0])


def marginal_score(field: nn.Module, t: Tensor, x: Tensor, velocity: Tensor | None = None) -> Tensor:
    """∇ log p_t(x) from the PF-ODE velocity: ε̂ = (α v − α̇ x)/(α σ̇ − α̇ σ), ŝ = −ε̂/σ_t (Tweedie)."""
    path: AffinePath = field.path
    v = field(t, x) if velocity is None else velocity
    times = _times(t, x)
    return path.score_from_epsilon(path.epsilon_from_velocity(v, x, times), x, times)


def denoised(field: nn.Module, t: Tensor, x: Tensor) -> Tensor:
    """E[x1 | x_t = x] = (x − σ_t ε̂)/α_t: the denoiser D of Karras et al. 2022."""
    path: AffinePath = field.path
    times = _times(t, x)
    return path.x1_from_epsilon(path.epsilon_from_velocity(field(t, x), x, times), x, times)


def _check_gaussian(path: AffinePath, solver: str, ends: Tensor, need_alpha: bool) -> None:
    alpha = path.schedule.alpha(ends)
    if path.has_smoothing or (need_alpha and bool((alpha <= 0).any())):
        raise UserError(
            f"solver={solver} does not fit {path!r}: it converts the velocity to a score, which needs a Gaussian path "
            f"without smoothing noise{' and α_t > 0 where it steps' if need_alpha else ''} (here α="
            f"{alpha.tolist()} at t={ends.tolist()}); use an ODE solver (solver=dopri5), or a diffusion path"
        )


class _GridSampler:
    """A uniform grid t_min = t_0 < ... < t_N = t_max, stepping from the left end of each interval."""

    is_adaptive = False
    num_steps: int

    def grid(self, x: Tensor, t0: float, t1: float) -> Tensor:
        return torch.linspace(t0, t1, self.num_steps + 1, dtype=x.dtype, device=x.device)

    def keep(self, num_trajectory_times: int) -> set[int]:
        return set(torch.linspace(0, self.num_steps, max(num_trajectory_times, 2)).round().long().tolist())


class EulerMaruyama(_GridSampler):
    """Euler–Maruyama on the generative SDE with the path's marginals p_t (seed notes: forward SDE, reverse-time SDE,
    Fokker–Planck), in flow time t from noise (t_min) to data (t_max):

        dx = [v_t(x) + ½ ε_t² ∇ log p_t(x)] dt + ε_t dW_t,

    which has the same marginals as the PF-ODE dx = v_t(x) dt for every diffusion level ε_t. `diffusion="g2"` takes
    the path's own ε_t² = g_t² = 2σ_t²(α̇_t/α_t − σ̇_t/σ_t), the reverse process of the score SDE; a number c takes
    ε_t = c (c = 0 is the Euler ODE sampler, sample for sample). The last step adds no noise (the papers' denoised
    output). NFE = `num_steps`.
    """

    def __init__(self, num_steps: int = 100, diffusion: str | float = "g2") -> None:
        if num_steps < 1:
            raise UserError(f"solver.num_steps={num_steps} must be >= 1 for solver=euler_maruyama")
        if diffusion != "g2" and (isinstance(diffusion, bool) or not isinstance(diffusion, int | float)):
            raise UserError(f"solver.diffusion={diffusion!r} is invalid; choose g2 (the path's own) or a number >= 0")
        if diffusion != "g2" and diffusion < 0:
            raise UserError(f"solver.diffusion={diffusion} is invalid; a constant diffusion level must be >= 0")
        self.method, self.num_steps, self.diffusion = "euler_maruyama", int(num_steps), diffusion

    def check_path(self, path: AffinePath) -> None:
        ends = torch.tensor([path.t_min, path.t_max], dtype=torch.float64)
        # g² = 2σ²(α̇/α − σ̇/σ) is infinite where α = 0 (the OT path at t = 0); a constant level is not
        _check_gaussian(path, f"euler_maruyama (solver.diffusion={self.diffusion})", ends, self.diffusion == "g2")

    def diffusion_squared(self, path: AffinePath, t: Tensor) -> Tensor:
        return path.diffusion_squared(t) if self.diffusion == "g2" else torch.full_like(t, float(self.diffusion) ** 2)

    def integrate(self, field: nn.Module, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        path: AffinePath = field.path
        self.check_path(path)
        grid, keep, x = self.grid(x_start, t0, t1), self.keep(num_trajectory_times), x_start
        states = [x] if 0 in keep else []
        for i in range(self.num_steps):
            t, dt = grid[i], grid[i + 1] - grid[i]
            v = field(t, x)
            g2 = self.diffusion_squared(path, t)
            drift = v if float(g2) == 0 else v + 0.5 * g2 * marginal_score(field, t, x, velocity=v)
            x = x + drift * dt
            if i + 1 < self.num_steps and float(g2) > 0:
                x = x + torch.sqrt(g2 * dt) * torch.randn_like(x)
            if i + 1 in keep:
                states.append(x)
        return torch.stack(states) if num_trajectory_times >= 2 else x

    def __repr__(self) -> str:
        return f"EulerMaruyama(num_steps={self.num_steps}, diffusion={self.diffusion})"


class PredictorCorrector(_GridSampler):
    """score_sde's predictor–corrector sampler (Song et al. 2021, Alg. 1–2) on the path's uniform grid.

    At each t_i: `n_corrector_steps` Langevin steps at fixed t, x ← x + η ŝ + √(2η) z with η = 2 (snr ‖z‖/‖ŝ‖)²
    (`langevin_step`: norms averaged over the batch, as score_sde does), then one predictor step
    to t_{i+1}: `reverse_diffusion` inverts the forward transition x_i = a x_{i+1} + b z (a = α_i/α_{i+1},
    b² = σ_i² − a² σ_{i+1}²): x ← (2 − a) x + b² ŝ + b z; `euler_maruyama` is `EulerMaruyama` with g². The last
    predictor step adds no noise. NFE = `num_steps` × (1 + `n_corrector_steps`).
    """

    def __init__(
        self, num_steps: int = 1000, predictor: str = "reverse_diffusion", snr: float = 0.16, n_corrector_steps: int = 1
    ) -> None:
        if predictor not in PREDICTORS:
            raise choices_error("solver.predictor", predictor, PREDICTORS)
        if num_steps < 1 or n_corrector_steps < 0 or snr <= 0:
            raise UserError(
                f"solver.num_steps={num_steps} must be >= 1, solver.n_corrector_steps={n_corrector_steps} >= 0 and "
                f"solver.snr={snr} > 0 for solver=pc"
            )
        self.method, self.num_steps, self.predictor = "pc", int(num_steps), predictor
        self.snr, self.n_corrector_steps = float(snr), int(n_corrector_steps)

    def check_path(self, path: AffinePath) -> None:
        _check_gaussian(path, "pc", torch.tensor([path.t_min, path.t_max], dtype=torch.float64), need_alpha=True)

    def integrate(self, field: nn.Module, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        path: AffinePath = field.path
        self.check_path(path)
        grid, keep, x = self.grid(x_start, t0, t1), self.keep(num_trajectory_times), x_start
        alpha, sigma = path.schedule.alpha(grid), path.schedule.sigma(grid)
        states = [x] if 0 in keep else []
        for i in range(self.num_steps):
            t = grid[i]
            for _ in range(self.n_corrector_steps):
                x = langevin_step(field, t, x, self.snr)
            last = i + 1 == self.num_steps
            if self.predictor == "euler_maruyama":
                v = field(t, x)
                g2, dt = path.diffusion_squared(t), grid[i + 1] - t
                x = x + (v + 0.5 * g2 * marginal_score(field, t, x, velocity=v)) * dt
                noise_std = torch.sqrt(g2 * dt)
            else:
                a = alpha[i] / alpha[i + 1]
                b2 = (sigma[i] ** 2 - a**2 * sigma[i + 1] ** 2).clamp_min(0)
                x = (2 - a) * x + b2 * marginal_score(field, t, x)
                noise_std = torch.sqrt(b2)
            if not last:
                x = x + noise_std * torch.randn_like(x)
            if i + 1 in keep:
                states.append(x)
        return torch.stack(states) if num_trajectory_times >= 2 else x

    def __repr__(self) -> str:
        return (
            f"PredictorCorrector(num_steps={self.num_steps}, predictor={self.predictor}, snr={self.snr}, "
            f"n_corrector_steps={self.n_corrector_steps})"
        )


def langevin_step(field: nn.Module, t: Tensor, x: Tensor, snr: float) -> Tensor:
    """One step of Langevin dynamics at fixed t, which leaves p_t invariant as the step shrinks:
    x ← x + η ∇ log p_t(x) + √(2η) z, with score_sde's step η = 2 (snr ‖z‖ / ‖∇ log p_t(x)‖)², the norms averaged
    over the batch. One η for the whole batch: a step that varied with x would not leave p_t invariant. The
    evaluation's batches are its fixed chunks, so η (and the samples) do not depend on the number of processes."""
    score = marginal_score(field, t, x)
    z = torch.randn_like(x)
    score_norm = score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
    step = 2 * (snr * z.flatten(1).norm(dim=1).mean() / score_norm) ** 2
    return x + step * score + torch.sqrt(2 * step) * z


def noise_ratio(path: AffinePath, t: Tensor) -> Tensor:
    """σ̃(t) = σ_t / α_t: x_t / α_t = x1 + σ̃(t) ε is EDM's variance-exploding view of any affine path."""
    return path.schedule.sigma(t) / path.schedule.alpha(t)


def time_of_noise_ratio(path: AffinePath, ratio: Tensor) -> Tensor:
    """The t in [t_min, t_max] with σ̃(t) = `ratio` (σ̃ decreases in t), by bisection in float64."""
    return bisect_time(path, lambda t: noise_ratio(path, t), ratio, increasing=False)


class EDMHeun:
    """Karras et al. 2022, Alg. 2: Heun's 2nd-order method on dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃ in the noise-ratio view
    x̃ = x/α_t, σ̃ = σ_t/α_t of this path, over the grid

        σ̃_i = (σ_max^{1/ρ} + i/(N − 1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  i < N,  σ̃_N = 0,

    with σ_max, σ_min clipped to the path's range of σ̃; D is the denoiser E[x1 | x_t], evaluated at t(σ̃) (bisection).
    With S_churn > 0, each step with σ̃_i in [S_min, S_max] first raises σ̃ by γ = min(S_churn/N, √2 − 1) with fresh
    noise of scale S_noise. No second-order correction on the last step: NFE = 2N − 1 (35 for EDM's N = 18).
    """

    is_adaptive = False

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
        if num_steps < 1 or rho <= 0 or not 0 < sigma_min < sigma_max or s_churn < 0:
            raise UserError(
                f"solver.num_steps={num_steps} must be >= 1, solver.rho={rho} > 0, 0 < solver.sigma_min={sigma_min} "
                f"< solver.sigma_max={sigma_max} and solver.s_churn={s_churn} >= 0 for solver=edm_heun"
            )
        self.method, self.num_steps, self.rho = "edm_heun", int(num_steps), float(rho)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.s_churn, self.s_min, self.s_max, self.s_noise = float(s_churn), float(s_min), float(s_max), float(s_noise)

    def check_path(self, path: AffinePath) -> None:
        _check_gaussian(path, "edm_heun", torch.tensor([path.t_max], dtype=torch.float64), need_alpha=True)

    def noise_levels(self, path: AffinePath) -> Tensor:
        """σ̃_0 > ... > σ̃_{N−1} > σ̃_N = 0, the ρ-spaced grid inside the path's range."""
        ends = torch.tensor([path.t_min, path.t_max], dtype=torch.float64)
        with torch.no_grad():
            largest, smallest = (float(r) for r in noise_ratio(path, ends))
        high = min(self.sigma_max, largest if math.isfinite(largest) else math.inf)
        low = max(self.sigma_min, smallest)
        steps = torch.arange(self.num_steps, dtype=torch.float64) / max(self.num_steps - 1, 1)
        levels = (high ** (1 / self.rho) + steps * (low ** (1 / self.rho) - high ** (1 / self.rho))) ** self.rho
        return torch.cat([levels, torch.zeros(1, dtype=torch.float64)])

    def _derivative(self, field: nn.Module, x_tilde: Tensor, level: Tensor) -> Tensor:
        path: AffinePath = field.path
        t = time_of_noise_ratio(path, level).to(x_tilde.dtype).to(x_tilde.device)
        alpha = path.schedule.alpha(t)
        return (x_tilde - denoised(field, t, alpha * x_tilde)) / level.to(x_tilde.dtype)

    def integrate(self, field: nn.Module, x_start: Tensor, t0: float, t1: float, num_trajectory_times: int = 0):
        path: AffinePath = field.path
        self.check_path(path)
        levels = self.noise_levels(path).to(x_start.device)
        # x_start = σ_{t_min} z (the path's prior sample): start from x̃ = σ̃_0 z
        z = x_start / path.schedule.sigma(torch.tensor(path.t_min, dtype=x_start.dtype, device=x_start.device))
        x = levels[0].to(x_start.dtype) * z
        keep = set(torch.linspace(0, self.num_steps, max(num_trajectory_times, 2)).round().long().tolist())
        states = [x] if 0 in keep else []
        gamma = min(self.s_churn / self.num_steps, math.sqrt(2) - 1)
        for i in range(self.num_steps):
            level, following = levels[i], levels[i + 1]
            if gamma > 0 and self.s_min <= float(level) <= self.s_max:
                raised = level * (1 + gamma)
                x = x + torch.sqrt(raised**2 - level**2).to(x.dtype) * self.s_noise * torch.randn_like(x)
                level = raised
            slope = self._derivative(field, x, level)
            step = (following - level).to(x.dtype)
            proposal = x + step * slope
            if float(following) > 0:
                x = x + step * 0.5 * (slope + self._derivative(field, proposal, following))
            else:
                x = proposal
            if i + 1 in keep:
                states.append(x)
        return torch.stack(states) if num_trajectory_times >= 2 else x

    def __repr__(self) -> str:
        churn = f", s_churn={self.s_churn}" if self.s_churn else ""
        return f"EDMHeun(num_steps={self.num_steps}, rho={self.rho}{churn})"

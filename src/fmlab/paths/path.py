"""The affine conditional probability path: one source of truth for training targets, sampling and likelihood."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fmlab.errors import UserError, choices_error
from fmlab.paths.schedules import Schedule

SMOOTHING_KINDS = ("none", "constant", "bridge")


def bisect_increasing(function: Callable[[Tensor], Tensor], targets: Tensor, low: float, high: float) -> Tensor:
    """x in [low, high] with function(x) = target for an increasing `function`, by bisection in float64 (60
    halvings: float64 resolution); targets outside the range give the nearer end."""
    targets = targets.double()
    below, above = torch.full_like(targets, low), torch.full_like(targets, high)
    for _ in range(60):
        middle = (below + above) / 2
        later = function(middle) < targets
        below, above = torch.where(later, middle, below), torch.where(later, above, middle)
    return (below + above) / 2


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times (B,) to (B, 1, ..., 1) so they broadcast against a batch shaped like `x`."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


# the shortest [t_min, t_max] a path accepts: float32 times near 1 are 6e-8 apart
MIN_TIME_INTERVAL = 1e-5


class AffinePath:
    """x_t = α_t x1 + σ_t x0 (+ s_t ε), the conditional Gaussian path N(α_t x1, σ_t² I) of seed 001 eq. (6).

    `smoothing` adds the independent noise s_t ε of I-CFM (`constant`: s_t = σ) or Schrödinger-bridge CFM
    (`bridge`: s_t = σ √(t(1 − t))), Tong et al. 2024 §3. Times are drawn from U[t_min, schedule.t_max].
    """

    def __init__(
        self,
        schedule: Schedule,
        smoothing: str = "none",
        smoothing_sigma: float = 0.0,
        t_min: float = 0.0,
        bridge_margin: float = 1e-3,
    ) -> None:
        if smoothing not in SMOOTHING_KINDS:
            raise choices_error("path.smoothing", smoothing, SMOOTHING_KINDS)
        if smoothing != "none" and smoothing_sigma <= 0:
            raise UserError(f"path.smoothing_sigma={smoothing_sigma} must be > 0 with smoothing={smoothing!r}")
        # the times are float32 tensors (6e-8 apart near 1): an interval of a few ulps leaves a solver no step
        if not (0.0 <= t_min < schedule.t_max <= 1.0 and schedule.t_max - t_min >= MIN_TIME_INTERVAL):
            raise UserError(
                f"path.t_min={t_min} with schedule t_max={schedule.t_max} is invalid; need 0 <= t_min < t_max <= 1 "
                f"and t_max - t_min >= {MIN_TIME_INTERVAL:g} (float32 times)"
            )
        if not 0.0 <= bridge_margin < 0.5:
            raise UserError(f"path.bridge_margin={bridge_margin} is invalid; it must satisfy 0 <= bridge_margin < 0.5")
        self.schedule = schedule
        self.smoothing = smoothing
        self.smoothing_sigma = float(smoothing_sigma)
        self.t_min = float(t_min)
        self.bridge_margin = float(bridge_margin) if smoothing == "bridge" else 0.0

    @property
    def t_max(self) -> float:
        return self.schedule.t_max

    @property
    def has_smoothing(self) -> bool:
        return self.smoothing != "none"

    @property
    def train_t_min(self) -> float:
        """The first training time: t_min, or `bridge_margin` for the bridge (see `train_t_max`)."""
        return max(self.t_min, self.bridge_margin)

    @property
    def train_t_max(self) -> float:
        """The last training time: t_max, or 1 − `bridge_margin` for the bridge, whose noise derivative
        ṡ_t = σ(1 − 2t)/(2√(t(1 − t))) is singular at both ends: E_t ṡ_t² diverges (logarithmically) on [0, 1], so
        the loss has no finite mean there and float32 times near 0 or 1 (down to 1e-8) give single batches losses of
        1e7 that wreck Adam's moment estimates for thousands of steps (`method=sbcfm` seed 0: W2 swinging 0.3 to 2).
        On [ε, 1 − ε] the largest ṡ_t² is σ²/(4ε). Sampling still integrates over [t_min, t_max]."""
        return min(self.t_max, 1.0 - self.bridge_margin)

    def sample_time(self, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """t ~ U[train_t_min, train_t_max]: the diffusion paths train on [0, 1 − 1e-5] where they are singular at
        t = 1; the bridge on [ε, 1 − ε]."""
        t = torch.rand(n, device=device, dtype=dtype)
        return self.train_t_min + (self.train_t_max - self.train_t_min) * t

    def smoothing_std(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(s_t, ṡ_t) of the smoothing noise; zeros without smoothing."""
        if self.smoothing == "constant":
            return torch.full_like(t, self.smoothing_sigma), torch.zeros_like(t)
        if self.smoothing == "bridge":
            variance = (t * (1.0 - t)).clamp_min(1e-12)
            std = self.smoothing_sigma * torch.sqrt(variance)
            return std, self.smoothing_sigma * (1.0 - 2.0 * t) / (2.0 * torch.sqrt(variance))
        return torch.zeros_like(t), torch.zeros_like(t)

    def sample_with_target(
        self, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x_t = α_t x1 + σ_t x0 (+ s_t ε) and its conditional velocity u_t = α̇_t x1 + σ̇_t x0 (+ ṡ_t ε).

        For a Gaussian source the velocity equals (σ̇_t/σ_t)(x_t − α_t x1) + α̇_t x1 (seed 001, Theorem 10).
        """
        tb = broadcast_time(t, x1)
        s = self.schedule
        x_t = s.alpha(tb) * x1 + s.sigma(tb) * x0
        u_t = s.d_alpha(tb) * x1 + s.d_sigma(tb) * x0
        if self.has_smoothing:
            if noise is None:
                raise ValueError("this path has smoothing noise; pass `noise`")
            std, d_std = self.smoothing_std(tb)
            x_t = x_t + std * noise
            u_t = u_t + d_std * noise
        return x_t, u_t

    def conditional_flow(self, t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """ψ_t(x0 | x1) = σ_t x0 + α_t x1 (seed 001, Theorem 10), the flow of the conditional velocity."""
        tb = broadcast_time(t, x1)
        return self.schedule.sigma(tb) * x0 + self.schedule.alpha(tb) * x1

    def conditional_velocity(self, t: Tensor, x: Tensor, x1: Tensor) -> Tensor:
        """u_t(x | x1) = (σ̇_t/σ_t)(x − α_t x1) + α̇_t x1 (seed 001, Theorem 10) at any point x."""
        tb = broadcast_time(t, x1)
        s = self.schedule
        return s.d_sigma(tb) / s.sigma(tb) * (x - s.alpha(tb) * x1) + s.d_alpha(tb) * x1

    def conditional_log_prob(self, t: Tensor, x: Tensor, x1: Tensor) -> Tensor:
        """log N(x; α_t x1, σ_t² I), summed over the non-batch dimensions (seed 001 eq. (6))."""
        tb = broadcast_time(t, x1)
        sigma = self.schedule.sigma(tb)
        z = (x - self.schedule.alpha(tb) * x1) / sigma
        d = x[0].numel()
        log_norm = -0.5 * d * math.log(2 * math.pi) - d * torch.log(sigma.reshape(-1))
        return -0.5 * z.pow(2).flatten(1).sum(1) + log_norm

    # Conversions between what a network may predict, for a Gaussian source (x_t = α_t x1 + σ_t ε, ε ~ N(0, I)).
    # The score of the conditional path is ∇ log p_t(x | x1) = −(x − α_t x1)/σ_t² = −ε/σ_t (seed 003), so
    # the marginal score, velocity, ε and x1 predictions are affine in one another at each (t, x).

    def _coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tb = broadcast_time(t, x)
        s = self.schedule
        return s.alpha(tb), s.sigma(tb), s.d_alpha(tb), s.d_sigma(tb)

    def velocity_from_epsilon(self, epsilon: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v = α̇ x̂1 + σ̇ ε̂ with x̂1 = (x − σ ε̂)/α, i.e. v = (α̇/α) x + (σ̇ − α̇ σ/α) ε̂."""
        alpha, sigma, d_alpha, d_sigma = self._coefficients(t, x)
        return d_alpha / alpha * x + (d_sigma - d_alpha * sigma / alpha) * epsilon

    def epsilon_from_velocity(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Inverse of `velocity_from_epsilon`: ε̂ = (α v − α̇ x)/(α σ̇ − α̇ σ)."""
        alpha, sigma, d_alpha, d_sigma = self._coefficients(t, x)
        return (alpha * velocity - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)

    def epsilon_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """ε̂ = −σ_t ŝ (Tweedie: E[ε | x_t] = −σ_t ∇ log p_t(x_t))."""
        return -self._coefficients(t, x)[1] * score

    def score_from_epsilon(self, epsilon: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """ŝ = −ε̂ / σ_t."""
        return -epsilon / self._coefficients(t, x)[1]

    def x1_from_epsilon(self, epsilon: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """x̂1 = (x − σ_t ε̂)/α_t."""
        alpha, sigma, _, _ = self._coefficients(t, x)
        return (x - sigma * epsilon) / alpha

    def epsilon_from_x1(self, x1: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """ε̂ = (x − α_t x̂1)/σ_t."""
        alpha, sigma, _, _ = self._coefficients(t, x)
        return (x - alpha * x1) / sigma

    def diffusion_squared(self, t: Tensor) -> Tensor:
        """g²(t) of the forward SDE with these marginals, in flow time: g² = 2σ_t² (α̇_t/α_t − σ̇_t/σ_t).

        (In the diffusion's clock s = 1 − t this is d σ²/ds − 2 (d log α/ds) σ²; for VP it equals β(1 − t).)
        """
        s = self.schedule
        alpha, sigma = s.alpha(t), s.sigma(t)
        return 2 * sigma**2 * (s.d_alpha(t) / alpha - s.d_sigma(t) / sigma)

    # The prior: where the PF-ODE starts (generation) and ends (likelihood).

    def prior_std(self, like: Tensor) -> Tensor:
        """σ_{t_min}, the standard deviation of the prior N(0, σ_{t_min}² I) (σ_max for VE, 1 for OT), as a 0-d
        tensor of `like`'s dtype and device."""
        return self.schedule.sigma(torch.tensor(self.t_min, dtype=like.dtype, device=like.device))

    def prior_sample(self, x0: Tensor) -> Tensor:
        """The ODE's starting point at t_min: σ_{t_min} x0 for x0 ~ N(0, I) (the source itself for OT)."""
        return self.prior_std(x0) * x0

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; 0, σ_{t_min}² I), summed over the non-batch dimensions: the density the likelihood's
        change of variables starts from (seed 004)."""
        d = x[0].numel()
        std = self.prior_std(x)
        return -0.5 * (x / std).pow(2).flatten(1).sum(1) - d * (torch.log(std) + 0.5 * math.log(2 * math.pi))

    # Noise levels: EDM's view x_t / α_t = x1 + σ̃(t) ε of the path, and its log-SNR.

    def noise_ratio(self, t: Tensor) -> Tensor:
        """σ̃(t) = σ_t / α_t, decreasing in t (EDM's σ of this path: x_t/α_t = x1 + σ̃ ε)."""
        return self.schedule.sigma(t) / self.schedule.alpha(t)

    def log_snr(self, t: Tensor) -> Tensor:
        """log SNR(t) = 2 (log α_t − log σ_t) = −2 log σ̃(t), increasing in t; d/dt log SNR = g²/σ²."""
        return 2 * (torch.log(self.schedule.alpha(t)) - torch.log(self.schedule.sigma(t)))

    def time_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """The t in [t_min, t_max] with log SNR(t) = `log_snr` (clipped to the ends), in float64: the one inverse of
        the path's noise level (by bisection: no schedule needs a closed form)."""
        return bisect_increasing(self.log_snr, log_snr, self.t_min, self.t_max)

    def time_of_noise_ratio(self, ratio: Tensor) -> Tensor:
        """The t with σ̃(t) = `ratio`: `time_of_log_snr(−2 log ratio)`."""
        return self.time_of_log_snr(-2 * torch.log(ratio.double()))

    # The discrete forward process between two times, and DDPM's posterior step (Ho et al. 2020, eq. 6-7).

    def forward_transition(self, t_noisy: Tensor, t_clean: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b²) of x_noisy = a x_clean + b z, z ~ N(0, I), the process that takes p_{t_clean} to p_{t_noisy}
        (t_noisy < t_clean): a = α_noisy / α_clean, b² = σ_noisy² − a² σ_clean² (≥ 0)."""
        s = self.schedule
        a = s.alpha(t_noisy) / s.alpha(t_clean)
        return a, (s.sigma(t_noisy) ** 2 - a**2 * s.sigma(t_clean) ** 2).clamp_min(0)

    def posterior_step(self, x: Tensor, x1_hat: Tensor, t_noisy: Tensor, t_clean: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of q(x_{t_clean} | x_{t_noisy} = x, x1 = x̂1), the Gaussian posterior of the forward
        transition (a, b²): mean = (a σ_c² / σ_n²) x + (α_c b² / σ_n²) x̂1, variance = b² σ_c² / σ_n²."""
        s = self.schedule
        a, b2 = self.forward_transition(t_noisy, t_clean)
        sigma_n2, sigma_c2 = s.sigma(t_noisy) ** 2, s.sigma(t_clean) ** 2
        mean = (a * sigma_c2 / sigma_n2) * x + (s.alpha(t_clean) * b2 / sigma_n2) * x1_hat
        return mean, torch.sqrt(b2 * sigma_c2 / sigma_n2)

    def __repr__(self) -> str:
        smoothing = "" if not self.has_smoothing else f", smoothing={self.smoothing}({self.smoothing_sigma})"
        if self.bridge_margin:
            smoothing += f", trained on [{self.train_t_min}, {self.train_t_max}]"
        return f"AffinePath({self.schedule!r}{smoothing}, t=[{self.t_min}, {self.t_max}])"

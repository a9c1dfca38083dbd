"""Schedules (α_t, σ_t) of affine Gaussian probability paths, with closed-form time derivatives.

Convention (Lipman et al. 2023; seed note 001, §2-3): t ∈ [0, 1], t = 0 is the source, t = 1 is the data, and the
conditional path is p_t(x | x1) = N(x; α_t x1, σ_t² I). Diffusion schedules are written in this flow time, i.e. time
reversed with respect to the diffusion's own clock s = 1 − t.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fmlab.errors import UserError


class Schedule(ABC):
    """α_t, σ_t and their derivatives. `t_max` < 1 where the schedule is singular at t = 1 (σ_1 = 0)."""

    t_max: float = 1.0

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor: ...

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class CondOT(Schedule):
    """Conditional OT path (seed 001 §3.2): α_t = t, σ_t = 1 − (1 − σ_min) t.

    Its conditional flow ψ_t(x0) = σ_t x0 + t x1 is the OT displacement map between N(0, I) and N(x1, σ_min² I).
    """

    def __init__(self, sigma_min: float = 1e-4) -> None:
        if not 0.0 < sigma_min < 1.0:
            raise UserError(f"schedule.sigma_min={sigma_min} is invalid; it must satisfy 0 < sigma_min < 1")
        self.sigma_min = float(sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.sigma_min) * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.sigma_min))


class Linear(Schedule):
    """The plain interpolant α_t = t, σ_t = 1 − t of I-CFM / rectified flow (Tong et al. 2024, §3.2).

    σ_1 = 0: the endpoint at t = 1 is the data point itself, so use it with a data source or with the path's
    smoothing noise (I-CFM, SB-CFM); the Gaussian-source FM path is `CondOT`.
    """

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class VPLinear(Schedule):
    """Variance-preserving diffusion path, time reversed (seed 001 §3.1; Lipman et al. 2023 eq. 19).

    α_t = exp(−½ T(1 − t)), σ_t = √(1 − α_t²), with T(s) = ∫₀ˢ β(r) dr = β_min s + ½ (β_max − β_min) s²
    for the linear β(s) = β_min + (β_max − β_min) s. Then α̇_t = ½ β(1 − t) α_t and σ̇_t = −α_t α̇_t / σ_t.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_max: float = 1.0 - 1e-5) -> None:
        if not 0.0 <= beta_min < beta_max:
            raise UserError(f"schedule beta_min={beta_min}, beta_max={beta_max} is invalid; need 0 <= min < max")
        self.beta_min, self.beta_max, self.t_max = float(beta_min), float(beta_max), float(t_max)

    def _beta(self, s: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def _integrated_beta(self, s: Tensor) -> Tensor:
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._integrated_beta(1.0 - t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._integrated_beta(1.0 - t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._beta(1.0 - t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)


class VPCosine(Schedule):
    """Variance-preserving cosine path: α_t = sin(πt/2), σ_t = cos(πt/2), so α_t² + σ_t² = 1.

    The cosine noise schedule of Nichol & Dhariwal 2021 (without its small offset) in flow time.
    """

    def __init__(self, t_max: float = 1.0 - 1e-5) -> None:
        self.t_max = float(t_max)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VEGeometric(Schedule):
    """Variance-exploding path (seed 001 §3.1; Song et al. 2021): α_t = 1, σ_t = σ_min (σ_max/σ_min)^(1 − t).

    The source is N(0, σ_max² I), i.e. σ_0 x0 with x0 ~ N(0, I); σ̇_t = −σ_t log(σ_max/σ_min).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise UserError(
                f"schedule sigma_min={sigma_min}, sigma_max={sigma_max} is invalid; need 0 < sigma_min < sigma_max"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (1.0 - t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

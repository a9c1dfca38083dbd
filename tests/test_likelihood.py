"""Likelihood through the PF-ODE: analytic Gaussian log-densities, Hutchinson's estimator, bits/dim."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fmlab.likelihood import bits_per_dim, log_likelihood
from fmlab.objectives import VelocityObjective
from fmlab.paths import AffinePath, CondOT
from fmlab.sampling import ODESolver, VelocityField

F64 = torch.float64
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[0.8, 0.3], [0.3, 0.5]], dtype=F64)


class GaussianMarginalVelocity(nn.Module):
    """Data N(μ, Σ), source N(0, I): x_t is Gaussian, and
    u_t(x) = E[α̇ x1 + σ̇ x0 | x_t = x] = α̇ μ + (α α̇ Σ + σ σ̇ I)(α² Σ + σ² I)⁻¹ (x − α μ)."""

    def __init__(self, path: AffinePath) -> None:
        super().__init__()
        self.path = path

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        s, t0 = self.path.schedule, t[:1]
        alpha, sigma, d_alpha, d_sigma = s.alpha(t0), s.sigma(t0), s.d_alpha(t0), s.d_sigma(t0)
        eye = torch.eye(2, dtype=F64)
        gain = (alpha * d_alpha * COV + sigma * d_sigma * eye) @ torch.linalg.inv(alpha**2 * COV + sigma**2 * eye)
        return d_alpha * MEAN + (x - alpha * MEAN) @ gain.T


def setup(sigma_min: float = 1e-3) -> tuple[VelocityField, Tensor, Tensor]:
    path = AffinePath(CondOT(sigma_min))
    field = VelocityField(GaussianMarginalVelocity(path), VelocityObjective(), path)
    x = torch.distributions.MultivariateNormal(MEAN, COV).sample((40,)).to(F64) + 0.3
    analytic = torch.distributions.MultivariateNormal(MEAN, COV + sigma_min**2 * torch.eye(2, dtype=F64)).log_prob(x)
    return field, x, analytic


def test_ode_log_likelihood_equals_analytic_gaussian_log_density() -> None:
    torch.manual_seed(0)
    field, x, analytic = setup()
    result = log_likelihood(field, x, ODESolver("dopri5", atol=1e-8, rtol=1e-8), divergence="exact")
    assert (result.log_prob - analytic).abs().max() < 1e-3
    assert result.nfe > 10


def test_hutchinson_estimate_agrees_with_exact_within_its_standard_error() -> None:
    torch.manual_seed(1)
    field, x, _ = setup()
    solver = ODESolver("dopri5", atol=1e-6, rtol=1e-6)
    exact = log_likelihood(field, x[:8], solver, divergence="exact").log_prob
    generator = torch.Generator().manual_seed(0)
    for probe in ("rademacher", "gaussian"):
        draws = torch.stack(
            [log_likelihood(field, x[:8], solver, "hutchinson", 1, probe, generator).log_prob for _ in range(40)]
        )
        standard_error = draws.std(0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - exact).abs() < 4 * standard_error + 1e-6).all(), probe
        assert (draws.std(0) > 0).any()  # it is an estimate, not the exact value in disguise


def test_bits_per_dim_of_the_uniform_density_on_minus_one_one_is_eight() -> None:
    """p_x = 2^-D on [-1, 1]^D spreads mass evenly over 256 levels per dimension: exactly 8 bits."""
    num_dims = 3 * 8 * 8
    log_prob = torch.tensor([-num_dims * math.log(2.0)], dtype=F64)
    torch.testing.assert_close(bits_per_dim(log_prob, num_dims), torch.tensor([8.0], dtype=F64))

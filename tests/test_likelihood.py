"""Likelihood through the PF-ODE: analytic Gaussian log-densities, Hutchinson's estimator, bits/dim."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fmlab.distributed import Ranks
from fmlab.likelihood import bits_per_dim, importance_weighted_log_prob, log_likelihood
from fmlab.objectives import VelocityField, VelocityObjective
from fmlab.paths import AffinePath, CondOT
from fmlab.samplers import ODESolver

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


def test_importance_weighted_bound_is_the_estimate_at_k1_and_above_the_mean_of_single_estimates() -> None:
    torch.manual_seed(0)
    log_probs = torch.randn(5, 40, dtype=torch.float64) * 3
    assert torch.equal(importance_weighted_log_prob(log_probs[:1]), log_probs[0])
    bound = importance_weighted_log_prob(log_probs)
    assert (bound >= log_probs.mean(0)).all() and (bound <= log_probs.max(0).values).all()
    same = importance_weighted_log_prob(log_probs[:1].expand(7, -1))
    assert torch.allclose(same, log_probs[0], atol=1e-12)  # K equal estimates: the estimate itself


class FixedDequantization:
    """Digits whose held-out images always take dequantisation draw `k` (a K = 1 evaluation of draw k)."""

    def __init__(self, data, k: int) -> None:
        self.data, self.k = data, k

    def held_out(self, n=None, index=0, dequantization=0):
        return self.data.held_out(n, index, dequantization=self.k)

    def __getattr__(self, name):
        return getattr(self.data, name)


def test_importance_weighted_bpd_over_k_dequantisations_beats_their_mean_and_equals_plain_bpd_at_k1(
    train_config,
) -> None:
    from fmlab.data.images import DigitsDataModule
    from fmlab.evaluation import Evaluator
    from fmlab.module import FlowModule
    from fmlab.samplers import ODESolver

    torch.manual_seed(0)
    field = FlowModule.from_config(train_config("data=digits")).velocity_field()
    data = DigitsDataModule()

    def bpd(datamodule, k: int) -> dict:
        evaluator = Evaluator(
            ODESolver("euler", num_steps=4), num_samples=2, num_draws=1, batch_size=60, nll_samples=60,
            likelihood_solver=ODESolver("rk4", num_steps=8), dequantization_samples=k,
        )  # fmt: skip
        return evaluator.negative_log_likelihood(field, datamodule, Ranks())

    single = [bpd(FixedDequantization(data, k), 1)["bpd"] for k in range(3)]
    weighted = bpd(data, 3)
    assert weighted["dequantization_samples"] == 3 and weighted["bpd_split"] == "test"
    assert bpd(data, 1)["bpd"] == single[0]  # K = 1 is the plain estimate, on the same dequantisation
    assert len(set(single)) == 3  # three different dequantisations
    assert weighted["bpd"] <= sum(single) / 3  # per image, the bound is >= the mean of the single estimates

"""Objectives: the diffusion coefficient, ScoreFlow's importance sampling, and loss values at known optima."""

from __future__ import annotations

import pytest
import torch

from fmlab.objectives import EpsilonObjective, ScoreLikelihoodObjective, ScoreObjective, VelocityObjective
from fmlab.paths import AffinePath, CondOT, MarginalOracle, VEGeometric, VPCosine, VPLinear
from fmlab.paths.time_samplers import LogSNRUniformTime, UniformTime

F64 = torch.float64


def test_vp_diffusion_coefficient_is_beta() -> None:
    """For VP, g²(t) = β(s) at diffusion time s = 1 − t (Song et al. 2021, eq. 11)."""
    path = AffinePath(VPLinear(beta_min=0.1, beta_max=20.0))
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    torch.testing.assert_close(path.diffusion_squared(t), 0.1 + 19.9 * (1 - t))


@pytest.mark.parametrize("path", [AffinePath(VPLinear()), AffinePath(VPCosine()), AffinePath(VEGeometric(0.01, 10))])
def test_g2_over_sigma2_is_the_time_derivative_of_log_snr(path: AffinePath) -> None:
    t = torch.linspace(0.05, 0.95, 31, dtype=F64)
    h = 1e-6
    numeric = (path.log_snr(t + h) - path.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(path.diffusion_squared(t) / path.schedule.sigma(t) ** 2, numeric, rtol=1e-6, atol=1e-8)


def test_scoreflow_times_are_uniform_in_log_snr_and_make_the_likelihood_weight_constant() -> None:
    path = AffinePath(VPLinear())
    sampler = LogSNRUniformTime(loss_weight="density_ratio")
    torch.manual_seed(0)
    t = sampler.sample(path, 20_000, dtype=F64)
    assert path.t_min <= t.min() and t.max() <= path.t_max
    bounds = path.log_snr(torch.tensor([path.t_min, path.t_max], dtype=F64))
    u = (path.log_snr(t) - bounds[0]) / (bounds[1] - bounds[0])
    quantiles = torch.quantile(u, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64))
    torch.testing.assert_close(quantiles, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64), atol=0.01, rtol=0)
    # g² × p_uniform/p = σ² Z/(t_max − t_min): ScoreFlow's importance-sampled weight, constant up to σ²
    weight = ScoreLikelihoodObjective().weight(path, t) * sampler.weights(path, t)
    z = float(bounds[1] - bounds[0])
    torch.testing.assert_close(weight, path.schedule.sigma(t) ** 2 * z / (path.t_max - path.t_min), rtol=1e-6, atol=0)


def test_scoreflow_refuses_a_path_without_finite_log_snr() -> None:
    from fmlab.errors import UserError

    with pytest.raises(UserError, match="finite log-SNR"):
        LogSNRUniformTime().sample(AffinePath(CondOT(1e-4)), 4)


@pytest.mark.parametrize(
    "objective", [VelocityObjective(), EpsilonObjective(), ScoreObjective(), ScoreLikelihoodObjective()]
)
def test_exact_single_point_field_has_zero_loss_for_every_objective(objective) -> None:
    """With one data point the conditional field is the marginal one: its loss is exactly 0 for every objective."""
    path = AffinePath(VPLinear())
    point = torch.tensor([[1.0, -0.5]], dtype=F64)
    oracle = MarginalOracle(path, point)

    class Exact(torch.nn.Module):
        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            if isinstance(objective, VelocityObjective):
                return oracle(t, x)
            return oracle.epsilon(t, x)  # ε for DDPM and for the σ-scaled score networks

    torch.manual_seed(0)
    x0, x1 = torch.randn(256, 2, dtype=F64), point.expand(256, 2)
    t = UniformTime().sample(path, 256, dtype=F64).clamp(max=0.999)
    exact = objective.loss(Exact(), path, t, x0, x1, None).item()
    zero = objective.loss(lambda t, x: torch.zeros_like(x), path, t, x0, x1, None).item()
    assert exact < 1e-12 * max(1.0, zero) and zero > 1e-3

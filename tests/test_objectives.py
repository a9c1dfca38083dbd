"""Objectives: the diffusion coefficient, ScoreFlow's importance sampling, and loss values at known optima."""

from __future__ import annotations

import pytest
import torch

from fmlab.objectives import EpsilonObjective, ScoreLikelihoodObjective, ScoreObjective, VelocityObjective
from fmlab.paths import AffinePath, CondOT, MarginalOracle, VEGeometric, VPCosine, VPLinear

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
    log_snr = ScoreLikelihoodObjective.log_snr
    numeric = (log_snr(path, t + h) - log_snr(path, t - h)) / (2 * h)
    torch.testing.assert_close(path.diffusion_squared(t) / path.schedule.sigma(t) ** 2, numeric, rtol=1e-6, atol=1e-8)


def test_scoreflow_times_are_uniform_in_log_snr() -> None:
    path = AffinePath(VPLinear())
    objective = ScoreLikelihoodObjective()
    torch.manual_seed(0)
    t = objective.sample_time(path, 20_000, None, F64)
    assert path.t_min <= t.min() and t.max() <= path.t_max
    bounds = objective.log_snr(path, torch.tensor([path.t_min, path.t_max], dtype=F64))
    u = (objective.log_snr(path, t) - bounds[0]) / (bounds[1] - bounds[0])
    quantiles = torch.quantile(u, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64))
    torch.testing.assert_close(quantiles, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64), atol=0.01, rtol=0)


def test_scoreflow_refuses_a_path_without_finite_log_snr() -> None:
    from fmlab.errors import UserError

    with pytest.raises(UserError, match="finite log-SNR"):
        ScoreLikelihoodObjective().sample_time(AffinePath(CondOT(1e-4)), 4, None, F64)


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
    t = objective.sample_time(path, 256, None, F64).clamp(max=0.999)
    exact = objective.loss(Exact(), path, t, x0, x1, None).item()
    zero = objective.loss(lambda t, x: torch.zeros_like(x), path, t, x0, x1, None).item()
    assert exact < 1e-12 * max(1.0, zero) and zero > 1e-3

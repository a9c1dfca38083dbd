"""The marginalization trick, the continuity equation and the parameterisation conversions, checked numerically."""

from __future__ import annotations

import pytest
import torch

from fmlab.objectives import EpsilonObjective, ScoreObjective, VelocityField, VelocityObjective
from fmlab.paths import AffinePath, CondOT, MarginalOracle, VEGeometric, VPCosine, VPLinear
from fmlab.samplers import ODESolver, sample

F64 = torch.float64
PATHS = {
    "ot": AffinePath(CondOT(1e-3)),
    "vp": AffinePath(VPLinear()),
    "vp_cosine": AffinePath(VPCosine()),
    "ve": AffinePath(VEGeometric(0.01, 10.0)),
}


def points() -> torch.Tensor:
    return torch.tensor([[2.0, 1.0], [-1.5, 0.5], [0.0, -2.0]], dtype=F64)


@pytest.mark.parametrize("name", PATHS)
def test_conversions_between_velocity_epsilon_score_and_x1_round_trip(name: str) -> None:
    path = PATHS[name]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(50, 2, generator=g, dtype=F64), torch.randn(50, 2, generator=g, dtype=F64)
    t = torch.rand(50, generator=g, dtype=F64) * 0.9 + 0.05
    v = path.velocity_from_epsilon(eps, x, t)
    torch.testing.assert_close(path.epsilon_from_velocity(v, x, t), eps)
    torch.testing.assert_close(path.epsilon_from_score(path.score_from_epsilon(eps, x, t), x, t), eps)
    torch.testing.assert_close(path.epsilon_from_x1(path.x1_from_epsilon(eps, x, t), x, t), eps)


@pytest.mark.parametrize("name", PATHS)
def test_oracle_epsilon_and_score_converted_to_velocity_equal_oracle_velocity(name: str) -> None:
    path = PATHS[name]
    oracle = MarginalOracle(path, points())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=g, dtype=F64) * 2
    for t_value in (0.1, 0.5, 0.9):
        t = torch.full((40,), t_value, dtype=F64)
        velocity = oracle(t, x)
        torch.testing.assert_close(EpsilonObjective().to_velocity(oracle.epsilon(t, x), x, t, path), velocity)
        score_output = ScoreObjective(scale_by_sigma=False).to_velocity(oracle.score(t, x), x, t, path)
        torch.testing.assert_close(score_output, velocity)
        scaled = ScoreObjective(scale_by_sigma=True).to_velocity(oracle.epsilon(t, x), x, t, path)
        torch.testing.assert_close(scaled, velocity)


@pytest.mark.parametrize("name", ["ot", "vp", "ve"])
def test_integrating_the_marginal_field_lands_on_the_data_points(name: str) -> None:
    """The marginal field generates p_t (Theorem 11): from the source, the ODE ends on the K points (up to σ_1).

    The exact VP field separates the points late, when σ is already small, so points near a boundary between two
    basins see steep gradients that stall dopri5; VP is integrated with 500 RK4 steps and stopped at 1 − 1e-3.
    """
    path = AffinePath(VPLinear(t_max=1 - 1e-3)) if name == "vp" else PATHS[name]
    data = points()
    oracle = MarginalOracle(path, data)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(300, 2, generator=g, dtype=F64)
    field = VelocityField(oracle, VelocityObjective(), path)
    solver = ODESolver("rk4", num_steps=500) if name == "vp" else ODESolver("dopri5", atol=1e-5, rtol=1e-5)
    samples = sample(field, x0, solver).samples
    nearest = torch.cdist(samples, data).min(1).values
    sigma_end = path.schedule.sigma(torch.tensor(path.t_max, dtype=F64)).item()
    assert nearest.max() < 10 * sigma_end + 1e-3
    # and the three points are hit in proportion to their (equal) weights
    counts = torch.bincount(torch.cdist(samples, data).argmin(1), minlength=3).double() / 300
    torch.testing.assert_close(counts, torch.full((3,), 1 / 3, dtype=F64), atol=0.06, rtol=0)


@pytest.mark.parametrize("name", PATHS)
def test_continuity_equation_holds_for_conditional_gaussian_path(name: str) -> None:
    """∂p_t/∂t + div(p_t u_t) = 0 for p_t(x | x1) = N(α_t x1, σ_t² I) and its Theorem 10 field (autograd)."""
    path = PATHS[name]
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(1, 2, generator=g, dtype=F64)
    for _ in range(5):
        t = (torch.rand(1, generator=g, dtype=F64) * 0.8 + 0.1).requires_grad_(True)
        x = (torch.randn(1, 2, generator=g, dtype=F64) * 1.5).requires_grad_(True)
        density = path.conditional_log_prob(t, x, x1).exp()
        (dp_dt,) = torch.autograd.grad(density.sum(), t, create_graph=True)
        flux = density[:, None] * path.conditional_velocity(t, x, x1)
        divergence = sum(torch.autograd.grad(flux[0, i], x, create_graph=True)[0][0, i] for i in range(2))
        residual = (dp_dt + divergence).abs().item()
        assert residual < 1e-10 * max(1.0, dp_dt.abs().item())

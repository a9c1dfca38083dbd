"""ODE sampling: solver accuracy on closed-form ODEs and an exact count of function evaluations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fmlab.errors import UserError
from fmlab.objectives import VelocityField, VelocityObjective
from fmlab.paths import AffinePath, CondOT
from fmlab.samplers import ADAPTIVE_METHODS, FIXED_STEP_METHODS, ODESolver, sample

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "heun3": 3, "rk4": 4}


class CountingField(nn.Module):
    """dx/dt = 3t², so x(1) = x(0) + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.full_like(x, 3.0) * t**2


@pytest.mark.parametrize("method", [*FIXED_STEP_METHODS, *ADAPTIVE_METHODS])
def test_solvers_integrate_3t_squared_to_x_plus_one(method: str) -> None:
    x = torch.linspace(-2, 2, 5, dtype=torch.float64).reshape(5, 1)
    field = CountingField()
    solver = ODESolver(method, atol=1e-8, rtol=1e-8, num_steps=200)
    result = solver.integrate(field, x, 0.0, 1.0)
    # Global error bounds at N = 200 for this ODE: Euler 3/(2N); midpoint h²/4 and Heun h²/2 (second order);
    # third order and up, and the adaptive solvers, to the requested tolerance.
    tolerance = {"euler": 1e-2, "midpoint": 1e-4, "heun": 1e-4}.get(method, 1e-6)
    torch.testing.assert_close(result, x + 1, atol=tolerance, rtol=0)
    if method in STAGES:
        assert field.calls == STAGES[method] * 200


class ConstantNet(nn.Module):
    def __init__(self, velocity: Tensor) -> None:
        super().__init__()
        self.velocity = velocity
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.velocity.expand_as(x)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "euler"])
def test_reported_nfe_equals_net_calls(method: str) -> None:
    net = ConstantNet(torch.tensor([1.0, -2.0]))
    field = VelocityField(net, VelocityObjective(), AffinePath(CondOT(1e-4)))
    x0 = torch.randn(7, 2)
    result = sample(field, x0, ODESolver(method, num_steps=10), num_trajectory_times=5)
    assert result.nfe == net.calls > 0
    torch.testing.assert_close(result.samples, x0 + torch.tensor([1.0, -2.0]), atol=1e-5, rtol=0)
    assert result.trajectory.shape == (5, 7, 2)
    torch.testing.assert_close(result.trajectory[0], x0)


def test_unknown_solver_names_the_choices() -> None:
    with pytest.raises(UserError, match="solver.method='rk45'.*dopri5.*euler"):
        ODESolver("rk45")


class GaussianDataVelocity(nn.Module):
    """Exact PF-ODE velocity for data N(m, s² I) on a Gaussian path: E[ε | x_t] = σ (x − α m)/(α² s² + σ²)."""

    def __init__(self, path, mean: Tensor, std: float) -> None:
        super().__init__()
        self.path, self.mean, self.std = path, mean, std

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.expand(x.shape[0]).reshape(-1, 1)
        alpha, sigma = self.path.schedule.alpha(t), self.path.schedule.sigma(t)
        epsilon = sigma * (x - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)
        return self.path.velocity_from_epsilon(epsilon, x, t.reshape(-1))


def test_ancestral_sampler_with_exact_noise_prediction_recovers_gaussian_data() -> None:
    from fmlab.paths import VPLinear
    from fmlab.samplers import AncestralSampler

    path = AffinePath(VPLinear())
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    net = GaussianDataVelocity(path, mean, 0.5)
    field = VelocityField(net, VelocityObjective(), path)
    torch.manual_seed(0)
    x0 = torch.randn(4000, 2, dtype=torch.float64)
    result = sample(field, x0, AncestralSampler(num_steps=1000))
    assert result.nfe == 1000
    torch.testing.assert_close(result.samples.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(result.samples.std(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.03, rtol=0)
    # the probability-flow ODE of the same field lands on the same distribution, deterministically
    ode = sample(field, x0, ODESolver("dopri5", atol=1e-5, rtol=1e-5)).samples
    torch.testing.assert_close(ode.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(ode.std(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.03, rtol=0)

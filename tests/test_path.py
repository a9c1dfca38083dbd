"""The affine path: targets, the conditional flow (Theorem 10) and smoothing noise."""

from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

from fmlab.errors import UserError
from fmlab.paths import AffinePath, CondOT, Linear, VEGeometric, VPLinear

PATHS = {
    "ot": AffinePath(CondOT(1e-4)),
    "vp": AffinePath(VPLinear()),
    "ve": AffinePath(VEGeometric(0.01, 10.0)),
}


@pytest.mark.parametrize("name", PATHS)
def test_target_velocity_equals_theorem_10_field_for_gaussian_source(name: str) -> None:
    """α̇ x1 + σ̇ x0 = (σ̇/σ)(x_t − α x1) + α̇ x1 at x_t = α x1 + σ x0 (seed 001, Theorem 10)."""
    path = PATHS[name]
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t, u_t = path.sample_with_target(t, x0, x1)
    torch.testing.assert_close(x_t, path.conditional_flow(t, x0, x1))
    torch.testing.assert_close(u_t, path.conditional_velocity(t, x_t, x1))


@pytest.mark.parametrize("name", PATHS)
def test_conditional_velocity_generates_conditional_flow(name: str) -> None:
    """Integrating dx/dt = u_t(x | x1) from x(0) = ψ_0(x0) reproduces ψ_t(x0) = σ_t x0 + α_t x1 (Theorem 10)."""
    path = PATHS[name]
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    times = torch.linspace(0.0, 0.95, 6, dtype=torch.float64)

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return path.conditional_velocity(t.expand(x.shape[0]), x, x1)

    states = odeint(field, path.conditional_flow(times[:1].expand(16), x0, x1), times, rtol=1e-10, atol=1e-10)
    for t, state in zip(times, states, strict=True):
        torch.testing.assert_close(state, path.conditional_flow(t.expand(16), x0, x1), rtol=1e-7, atol=1e-7)


def test_smoothing_noise_velocity_is_time_derivative_of_sample() -> None:
    """For I-CFM and SB-CFM paths, u_t = d/dt x_t with (x0, x1, ε) held fixed."""
    g = torch.Generator().manual_seed(2)
    x0, x1, eps = (torch.randn(32, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.9 + 0.05
    for smoothing in ("constant", "bridge"):
        path = AffinePath(Linear(), smoothing=smoothing, smoothing_sigma=0.3)
        h = 1e-6
        numeric = (path.sample_with_target(t + h, x0, x1, eps)[0] - path.sample_with_target(t - h, x0, x1, eps)[0]) / (
            2 * h
        )
        torch.testing.assert_close(path.sample_with_target(t, x0, x1, eps)[1], numeric, rtol=1e-6, atol=1e-6)


def test_sample_time_stays_inside_the_schedule_range() -> None:
    path = AffinePath(VPLinear(t_max=0.99))
    t = path.sample_time(10_000)
    assert t.min() >= 0.0 and t.max() <= 0.99 and t.max() > 0.98


def test_bad_smoothing_names_the_choices() -> None:
    with pytest.raises(UserError, match="path.smoothing='gauss'.*bridge, constant, none"):
        AffinePath(Linear(), smoothing="gauss")

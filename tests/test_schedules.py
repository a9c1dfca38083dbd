"""Schedules: closed-form boundary values and derivatives that match finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from fmlab.errors import UserError
from fmlab.paths import CondOT, Linear, VEGeometric, VPCosine, VPLinear

SCHEDULES = {
    "condot": CondOT(sigma_min=1e-2),
    "linear": Linear(),
    "vp_linear": VPLinear(),
    "vp_cosine": VPCosine(),
    "ve_geometric": VEGeometric(sigma_min=0.01, sigma_max=10.0),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_derivatives_match_central_finite_differences(name: str) -> None:
    schedule = SCHEDULES[name]
    t = torch.linspace(0.02, min(schedule.t_max, 0.98), 41, dtype=torch.float64)
    h = 1e-6
    for value, derivative in ((schedule.alpha, schedule.d_alpha), (schedule.sigma, schedule.d_sigma)):
        numeric = (value(t + h) - value(t - h)) / (2 * h)
        torch.testing.assert_close(derivative(t), numeric, rtol=1e-6, atol=1e-7)


def test_condot_boundary_values_are_those_of_the_seed_notes() -> None:
    """α_0 = 0, σ_0 = 1 (source N(0, I)); α_1 = 1, σ_1 = σ_min (data blurred by σ_min), seed 001 Theorem 10."""
    schedule = CondOT(sigma_min=1e-4)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert schedule.alpha(t).tolist() == [0.0, 1.0]
    assert schedule.sigma(t).tolist() == pytest.approx([1.0, 1e-4], abs=1e-15)
    assert schedule.d_alpha(t).tolist() == [1.0, 1.0]
    assert schedule.d_sigma(t).tolist() == pytest.approx([-(1 - 1e-4)] * 2)


def test_diffusion_boundary_values() -> None:
    """VP: α_0 = exp(−½ ∫₀¹ β) ≈ 0 and σ → 0 at t = 1; VE: σ_0 = σ_max, σ_1 = σ_min, α ≡ 1."""
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    vp = VPLinear(beta_min=0.1, beta_max=20.0)
    assert vp.alpha(t)[0].item() == pytest.approx(math.exp(-0.5 * (0.1 + 0.5 * 19.9)))
    assert vp.alpha(t)[1].item() == 1.0 and vp.sigma(t)[1].item() == 0.0
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(2, dtype=torch.float64))
    cosine = VPCosine()
    assert cosine.alpha(t).tolist() == pytest.approx([0.0, 1.0]) and cosine.sigma(t).tolist() == pytest.approx([1, 0])
    ve = VEGeometric(sigma_min=0.01, sigma_max=10.0)
    assert ve.sigma(t).tolist() == pytest.approx([10.0, 0.01]) and ve.alpha(t).tolist() == [1.0, 1.0]
    assert vp.t_max == cosine.t_max == pytest.approx(1 - 1e-5)


@pytest.mark.parametrize("sigma_min", [0.0, -0.1, 1.0, 2.0])
def test_condot_rejects_sigma_min_outside_open_unit_interval(sigma_min: float) -> None:
    with pytest.raises(UserError, match=f"sigma_min={sigma_min}"):
        CondOT(sigma_min=sigma_min)

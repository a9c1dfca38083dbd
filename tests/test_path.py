"""The affine path: targets, the conditional flow (Theorem 10) and smoothing noise."""

from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

from fmlab.errors import UserError
from fmlab.paths import AffinePath, CondOT, Linear, VEGeometric, VPCosine, VPLinear

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


# Path quantities the samplers, time samplers and likelihood read, against closed forms (the only implementations:
# tests/test_layers.py checks the loops and formulas have no second home).
F64 = torch.float64


@pytest.mark.parametrize("name", PATHS)
def test_prior_log_density_is_the_gaussian_of_the_prior_std(name: str) -> None:
    path = PATHS[name]
    x = torch.randn(50, 3, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    std = {"ot": 1.0, "vp": float(VPLinear().sigma(torch.tensor(0.0, dtype=F64))), "ve": 10.0}[name]
    expected = torch.distributions.Normal(0.0, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(path.prior_log_prob(x), expected)
    torch.testing.assert_close(path.prior_sample(x), std * x)


def test_noise_ratio_log_snr_and_the_time_of_a_noise_level_match_closed_forms() -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    ot, ve, cosine = PATHS["ot"], PATHS["ve"], AffinePath(VPCosine())
    # σ̃ = σ/α: CondOT (1 − (1 − σ_min) t)/t, VE σ_t, cosine cot(πt/2); log SNR = −2 log σ̃
    torch.testing.assert_close(ot.noise_ratio(t), (1 - (1 - 1e-4) * t) / t)
    torch.testing.assert_close(ve.noise_ratio(t), 0.01 * 1000.0 ** (1 - t))
    torch.testing.assert_close(cosine.noise_ratio(t), 1 / torch.tan(torch.pi * t / 2))
    torch.testing.assert_close(ot.log_snr(t), -2 * torch.log(ot.noise_ratio(t)))
    # t(σ̃): CondOT 1/(σ̃ + 1 − σ_min), VE 1 − log(σ̃/σ_min)/log(σ_max/σ_min), cosine (2/π) atan(1/σ̃)
    levels = torch.logspace(-1.5, 1.5, 13, dtype=F64)
    torch.testing.assert_close(ot.time_of_noise_ratio(levels), 1 / (levels + 1 - 1e-4), atol=1e-12, rtol=0)
    expected_ve = (1 - torch.log(levels / 0.01) / torch.log(torch.tensor(1000.0, dtype=F64))).clamp(0, 1)
    torch.testing.assert_close(ve.time_of_noise_ratio(levels), expected_ve, atol=1e-12, rtol=0)
    expected_cosine = (2 / torch.pi * torch.atan(1 / levels)).clamp(max=cosine.t_max)
    torch.testing.assert_close(cosine.time_of_noise_ratio(levels), expected_cosine, atol=1e-12, rtol=0)
    # outside the path's range: the nearer end
    assert float(ve.time_of_noise_ratio(torch.tensor([1e6], dtype=F64))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_the_ddpm_posterior_step_is_gaussian_conditioning_of_the_forward_transition(name: str) -> None:
    """x_n = a x_c + b z keeps the marginals (α_n = a α_c, σ_n² = a² σ_c² + b²), and the posterior of x_c given x_n
    and x1 is the Gaussian conditioning α_c x1 + (a σ_c²/σ_n²)(x_n − α_n x1), variance σ_c² b²/σ_n²."""
    path, s = PATHS[name], PATHS[name].schedule
    t_noisy, t_clean = torch.tensor(0.3, dtype=F64), torch.tensor(0.45, dtype=F64)
    a, b2 = path.forward_transition(t_noisy, t_clean)
    torch.testing.assert_close(a * s.alpha(t_clean), s.alpha(t_noisy))
    torch.testing.assert_close(a**2 * s.sigma(t_clean) ** 2 + b2, s.sigma(t_noisy) ** 2)
    g = torch.Generator().manual_seed(2)
    x, x1 = torch.randn(30, 2, generator=g, dtype=F64), torch.randn(30, 2, generator=g, dtype=F64)
    mean, std = path.posterior_step(x, x1, t_noisy, t_clean)
    sigma_c2, sigma_n2 = s.sigma(t_clean) ** 2, s.sigma(t_noisy) ** 2
    torch.testing.assert_close(mean, s.alpha(t_clean) * x1 + a * sigma_c2 / sigma_n2 * (x - s.alpha(t_noisy) * x1))
    torch.testing.assert_close(std**2, sigma_c2 * b2 / sigma_n2)

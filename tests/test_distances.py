"""Sample distances: MMD against its closed form for Gaussians, W2 against a hand-solvable case."""

from __future__ import annotations

import math

import pytest
import torch

from fmlab.metrics.distances import mmd_rbf, wasserstein2


def gaussian_rbf_expectation(mean_gap: float, var_sum: float, h: float, dim: int) -> float:
    """E exp(−‖a − b‖²/(2h²)) for independent a ~ N(μa, sa² I), b ~ N(μb, sb² I): a − b ~ N(μa − μb, (sa² + sb²) I),
    so the expectation is (h²/(h² + sa² + sb²))^{d/2} exp(−‖μa − μb‖²/(2(h² + sa² + sb²)))."""
    s = h * h + var_sum
    return (h * h / s) ** (dim / 2) * math.exp(-(mean_gap**2) / (2 * s))


def population_mmd2(shift: float, scale: float, bandwidths: tuple[float, ...], dim: int) -> float:
    """MMD² between N(0, I) and N(shift·e1, scale² I) for the summed RBF kernel."""
    return sum(
        gaussian_rbf_expectation(0.0, 2.0, h, dim)
        + gaussian_rbf_expectation(0.0, 2 * scale**2, h, dim)
        - 2 * gaussian_rbf_expectation(shift, 1 + scale**2, h, dim)
        for h in bandwidths
    )


@pytest.mark.parametrize(("shift", "scale"), [(0.0, 1.0), (0.5, 1.0), (0.0, 1.5), (1.0, 0.7)])
def test_unbiased_mmd_matches_the_gaussian_closed_form(shift: float, scale: float) -> None:
    bandwidths, dim, n = (0.5, 1.0, 2.0), 2, 1500
    g = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(4):
        x = torch.randn(n, dim, generator=g)
        y = torch.randn(n, dim, generator=g) * scale
        y[:, 0] += shift
        estimates.append(mmd_rbf(x, y, bandwidths))
    mean = sum(estimates) / len(estimates)
    # the unbiased estimator's std at n = 1500 is below 2e-3 for these pairs; 4 repeats shrink it by 2
    assert mean == pytest.approx(population_mmd2(shift, scale, bandwidths, dim), abs=3e-3)


def test_mmd_grows_with_the_shift_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    values = [mmd_rbf(x, noise + torch.tensor([s, 0.0])) for s in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[0] < 0.01 < values[1]
    assert mmd_rbf(x, noise + 1) == pytest.approx(mmd_rbf(noise + 1, x), rel=1e-12)


def test_mmd_rejects_non_positive_bandwidths() -> None:
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        mmd_rbf(torch.zeros(4, 2), torch.ones(4, 2), (1.0, 0.0))


def test_w2_of_a_translated_set_is_the_translation_length() -> None:
    # for y = x + c the identity pairing is optimal (cyclical monotonicity), so W2 = ‖c‖ exactly
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(3))
    assert wasserstein2(x, x + torch.tensor([0.3, -0.4])) == pytest.approx(0.5, abs=1e-6)
    assert wasserstein2(x, x[torch.randperm(300)]) == pytest.approx(0.0, abs=1e-6)

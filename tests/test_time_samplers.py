"""Training-time distributions: each sampler's draws follow its stated density, inside the path's range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fmlab.paths import AffinePath, CondOT, VEGeometric, VPLinear
from fmlab.paths.time_samplers import (
    LogitNormalTime,
    LogNormalSigmaTime,
    LogSNRUniformTime,
    ModeTime,
    UniformTime,
    UShapedTime,
)

SAMPLERS = {
    "uniform": UniformTime(),
    "logit_normal": LogitNormalTime(m=0.3, s=0.8),
    "mode": ModeTime(scale=1.29),
    "mode_negative": ModeTime(scale=-0.5),
    "u_shaped": UShapedTime(a=4.0),
    "lognormal_sigma": LogNormalSigmaTime(p_mean=-1.2, p_std=1.2),
    "log_snr_uniform": LogSNRUniformTime(),
}


def cdf_from_density(sampler, path: AffinePath, points: torch.Tensor) -> torch.Tensor:
    """∫_{t_min}^{t} p by the trapezoid rule on a grid crowded at both ends (densities such as log-SNR-uniform spike
    there): the CDF that `log_density` states."""
    k = torch.arange(1, 400_000, dtype=torch.float64)
    grid = path.t_min + (path.t_max - path.t_min) * 0.5 * (1 - torch.cos(math.pi * k / 400_000))
    density = torch.exp(sampler.log_density(path, grid))
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(density, grid)])
    return torch.from_numpy(np.interp(points.numpy(), grid.numpy(), cumulative.numpy()))


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("path_name", ["vp", "ve"])
def test_each_time_sampler_draws_from_its_density_inside_the_range(name: str, path_name: str) -> None:
    path = {"vp": AffinePath(VPLinear()), "ve": AffinePath(VEGeometric())}[path_name]
    sampler = SAMPLERS[name]
    torch.manual_seed(0)
    t = sampler.sample(path, 5000, dtype=torch.float64)
    assert path.t_min <= float(t.min()) and float(t.max()) <= path.t_max
    # the density integrates to 1 over the range (up to EDM's clipped tails), and the draws follow it (KS)
    total = float(cdf_from_density(sampler, path, torch.tensor([path.t_max], dtype=torch.float64))[0])
    assert total == pytest.approx(1.0, abs=0.01)
    result = stats.kstest(t.numpy(), lambda x: cdf_from_density(sampler, path, torch.from_numpy(x)).numpy())
    assert result.pvalue > 1e-3, (name, result)


def test_a_wrong_density_is_rejected_by_the_same_test() -> None:
    path = AffinePath(VPLinear())
    torch.manual_seed(0)
    t = LogitNormalTime(m=0.0, s=1.0).sample(path, 5000, dtype=torch.float64)
    other = LogitNormalTime(m=0.2, s=1.0)
    result = stats.kstest(t.numpy(), lambda x: cdf_from_density(other, path, torch.from_numpy(x)).numpy())
    assert result.pvalue < 1e-6


def test_density_ratio_weights_make_any_sampler_estimate_the_uniform_time_mean() -> None:
    path = AffinePath(CondOT())
    f = lambda t: torch.sin(3 * t) + t**2  # noqa: E731  any function of t
    exact = (1 - math.cos(3)) / 3 + 1 / 3  # ∫_0^1 f
    # samplers whose density is bounded below (a logit-normal's ratio has infinite variance at the ends)
    for sampler in (ModeTime(scale=1.29, loss_weight="density_ratio"), UShapedTime(loss_weight="density_ratio")):
        torch.manual_seed(1)
        t = sampler.sample(path, 200_000, dtype=torch.float64)
        estimate = float((sampler.weights(path, t) * f(t)).mean())
        assert estimate == pytest.approx(exact, abs=0.01)
        assert float(f(t).mean()) != pytest.approx(exact, abs=0.01)  # unweighted, the sampler's own mean


def test_uniform_time_draws_exactly_what_fmlab_always_drew() -> None:
    path = AffinePath(VPLinear())
    torch.manual_seed(3)
    new = UniformTime().sample(path, 100)
    torch.manual_seed(3)
    assert torch.equal(new, path.sample_time(100)) and UniformTime().weights(path, new) is None

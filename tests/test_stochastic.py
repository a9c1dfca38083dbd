"""The baselines' native samplers: Euler–Maruyama, predictor–corrector, EDM-Heun, checked against exact fields."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fmlab.errors import UserError
from fmlab.paths import AffinePath, CondOT, Linear, MarginalOracle, VEGeometric, VPLinear
from fmlab.samplers import EDMHeun, EulerMaruyama, ODESolver, PredictorCorrector, langevin_step, sample

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
PATHS = {
    "vp": lambda: AffinePath(VPLinear()),
    "ve": lambda: AffinePath(VEGeometric()),
    "ot": lambda: AffinePath(CondOT()),
}


class GaussianField(nn.Module):
    """The exact PF-ODE velocity for data N(μ, Σ) on an affine path: p_t = N(α μ, C_t), C_t = α² Σ + σ² I, and
    v = α̇ E[x1 | x] + σ̇ E[ε | x] with E[ε | x] = σ C_t⁻¹ (x − α μ), E[x1 | x] = μ + α Σ C_t⁻¹ (x − α μ)."""

    def __init__(self, path: AffinePath) -> None:
        super().__init__()
        self.path, self.nfe = path, 0
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.path.schedule
        alpha, sigma = s.alpha(t), s.sigma(t)
        return alpha * MU, alpha**2 * COV + sigma**2 * torch.eye(2, dtype=torch.float64)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        t = t.to(torch.float64).reshape(())
        s = self.path.schedule
        mean, cov = self.marginal(t)
        whitened = torch.linalg.solve(cov, (x - mean).T).T
        epsilon = s.sigma(t) * whitened
        x1 = MU + s.alpha(t) * whitened @ COV
        return s.d_alpha(t) * x1 + s.d_sigma(t) * epsilon


def exact_draw(field: GaussianField, t: float, n: int, seed: int = 0) -> Tensor:
    mean, cov = field.marginal(torch.tensor(t, dtype=torch.float64))
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


def assert_moments(samples: Tensor, mean: Tensor, cov: Tensor, sigmas: float = 5.0) -> None:
    n = len(samples)
    assert torch.all((samples.mean(0) - mean).abs() < sigmas * torch.sqrt(torch.diag(cov) / n))
    # the sample covariance's entries have std ≈ sqrt((Σ_ii Σ_jj + Σ_ij²)/n)
    spread = torch.sqrt((torch.outer(torch.diag(cov), torch.diag(cov)) + cov**2) / n)
    assert torch.all((torch.cov(samples.T) - cov).abs() < sigmas * spread)


@pytest.mark.parametrize("name", ["vp", "ve", "ot"])
def test_euler_maruyama_with_the_exact_score_reproduces_gaussian_data(name: str) -> None:
    field = GaussianField(PATHS[name]())
    path = field.path
    # g² is infinite at t = 0 on the OT path (α_0 = 0): a constant diffusion level there
    solver = EulerMaruyama(num_steps=400, diffusion=1.0 if name == "ot" else "g2")
    torch.manual_seed(0)
    start = exact_draw(field, path.t_min, 10_000)
    with torch.no_grad():
        samples = solver.integrate(field, start, path.t_min, path.t_max)
    assert field.nfe == 400
    assert_moments(samples, MU, COV)


def test_euler_maruyama_without_diffusion_is_the_euler_ode_sampler_sample_for_sample() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.path, self.nfe = net, AffinePath(VPLinear()), 0

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            self.nfe += 1
            return self.net(torch.cat([x, t.expand(x.shape[0], 1)], 1))

    x0 = torch.randn(64, 2)
    ode = sample(Field(), x0, ODESolver("euler", num_steps=40))
    sde = sample(Field(), x0, EulerMaruyama(num_steps=40, diffusion=0.0))
    assert torch.equal(ode.samples, sde.samples) and ode.nfe == sde.nfe == 40


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_langevin_corrector_with_the_exact_score_leaves_p_t_invariant(name: str) -> None:
    field = GaussianField(PATHS[name]())
    t = torch.tensor(0.6, dtype=torch.float64)
    mean, cov = field.marginal(t)
    x = exact_draw(field, 0.6, 20_000, seed=1)
    torch.manual_seed(2)
    with torch.no_grad():
        for _ in range(200):  # ≈ 200 × η ≈ 1.5 times the stationary variance of travel: well mixed
            x = langevin_step(field, t, x, snr=0.03)
    assert_moments(x, mean, cov)
    # and from a wrong start (all at the mean) it moves towards p_t: the dynamics are not the identity
    y = mean.expand(2000, 2).clone()
    with torch.no_grad():
        for _ in range(50):
            y = langevin_step(field, t, y, snr=0.03)
    assert torch.cov(y.T).trace() > 0.2 * cov.trace()


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_predictor_corrector_with_the_exact_score_reproduces_gaussian_data(name: str) -> None:
    field = GaussianField(PATHS[name]())
    path = field.path
    torch.manual_seed(0)
    start = exact_draw(field, path.t_min, 10_000)
    solver = PredictorCorrector(num_steps=250, snr=0.05, n_corrector_steps=1)
    with torch.no_grad():
        samples = solver.integrate(field, start, path.t_min, path.t_max)
    assert field.nfe == 250 * 2
    assert_moments(samples, MU, COV)


class CountingOracle(MarginalOracle):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.nfe = self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        self.calls += 1
        return super().forward(t, x)


@pytest.mark.parametrize("name", ["vp", "ve", "ot"])
def test_edm_heun_lands_on_the_k_points_with_35_nfe(name: str) -> None:
    points = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    oracle = CountingOracle(PATHS[name](), points)
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = sample(oracle, x0, EDMHeun(num_steps=18, rho=7.0))
    assert result.nfe == oracle.calls == 35
    nearest = torch.cdist(result.samples, points).min(1).values
    assert nearest.max() < 0.02  # every sample on one of the points (W2 to the K-point measure → 0)
    assert len(set(torch.cdist(result.samples, points).argmin(1).tolist())) == 3
    churned = sample(CountingOracle(PATHS[name](), points), x0, EDMHeun(num_steps=18, s_churn=10.0))
    assert churned.nfe == 35 and torch.cdist(churned.samples, points).min(1).values.max() < 0.05


@pytest.mark.parametrize(
    "solver, expected",
    [
        (EulerMaruyama(num_steps=30), 30),
        (PredictorCorrector(num_steps=20, n_corrector_steps=2), 60),
        (PredictorCorrector(num_steps=20, predictor="euler_maruyama", n_corrector_steps=0), 20),
        (EDMHeun(num_steps=10), 19),
    ],
)
def test_reported_nfe_is_the_number_of_net_calls(solver, expected: int) -> None:
    oracle = CountingOracle(AffinePath(VPLinear()), torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    result = sample(oracle, torch.randn(50, 2), solver)
    assert result.nfe == oracle.calls == expected and torch.isfinite(result.samples).all()


def test_samplers_refuse_paths_they_cannot_convert_in_one_line() -> None:
    refusal = r"solver=euler_maruyama \(solver.diffusion=g2\) does not fit AffinePath\(CondOT"
    with pytest.raises(UserError, match=refusal):
        EulerMaruyama().check_path(AffinePath(CondOT()))
    EulerMaruyama(diffusion=0.5).check_path(AffinePath(CondOT()))  # a constant level is fine
    smoothed = AffinePath(Linear(), smoothing="constant", smoothing_sigma=0.1)
    for solver in (EulerMaruyama(diffusion=0.5), PredictorCorrector(), EDMHeun()):
        with pytest.raises(UserError, match="without smoothing noise"):
            solver.check_path(smoothed)
    with pytest.raises(UserError, match="solver.predictor='leapfrog'"):
        PredictorCorrector(predictor="leapfrog")
    with pytest.raises(UserError, match="solver.diffusion=-1"):
        EulerMaruyama(diffusion=-1)
    assert math.isfinite(EDMHeun().noise_levels(AffinePath(CondOT()))[0])  # σ̃(0) = ∞ clipped to σ_max

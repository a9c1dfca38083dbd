"""MeanFlow (Geng et al. 2025) against closed forms: the average velocity of a Gaussian flow, the identity its
training target is built on, the JVP against finite differences, the sampler's NFE and its limits."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import ot
import pytest
import torch
from torch import Tensor

from fmlab.nets import MLP
from fmlab.objectives import (
    MeanFlowObjective,
    VelocityField,
    VelocityObjective,
    adaptively_weighted,
    mean_velocity_and_total_derivative,
    meanflow_target,
)
from fmlab.paths import AffinePath, Linear, MarginalOracle
from fmlab.paths.time_samplers import MeanFlowTimes, meanflow_to_flow_times
from fmlab.samplers import MeanFlowSampler, ODESolver, sample
from tests.conftest import REPO_ROOT, run_cli
from tests.test_resume import OT_RUN

F64 = torch.float64
MEAN, SCALE = torch.tensor([2.0, -1.0], dtype=F64), 0.5  # data N(MEAN, SCALE² I), source N(0, I)


def moments(t: Tensor) -> tuple[Tensor, Tensor]:
    """The marginal of x_t = t x1 + (1 − t) x0: mean m_t = t μ and standard deviation σ_t = √(t² s² + (1 − t)²)."""
    return t[:, None] * MEAN, torch.sqrt(t**2 * SCALE**2 + (1 - t) ** 2)[:, None]


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    """The marginal field v_t(x) = μ + (σ̇_t / σ_t)(x − m_t), σ̇_t = (t s² − (1 − t)) / σ_t."""
    mean, std = moments(t)
    std_dot = (t * SCALE**2 - (1 - t))[:, None] / std
    return MEAN + std_dot / std * (x - mean)


def gaussian_mean_velocity(x: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """ū(x, s, e) = (X_e − x) / (e − s) with the flow's map X_e = m_e + (σ_e / σ_s)(x − m_s) (Gaussian to Gaussian)."""
    (mean_s, std_s), (mean_e, std_e) = moments(start), moments(end)
    return (mean_e - mean_s + (std_e / std_s - 1) * (x - mean_s)) / (end - start)[:, None]


def points(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=F64)
    start = torch.rand(n, generator=generator, dtype=F64) * 0.9
    return x, start, start + (1 - start) * torch.rand(n, generator=generator, dtype=F64).clamp_min(0.05)


def test_the_meanflow_target_of_the_exact_field_is_the_closed_form_average_velocity() -> None:
    x, start, end = points(500, 0)
    u, du_ds = mean_velocity_and_total_derivative(gaussian_mean_velocity, x, start, end, gaussian_velocity(x, start))
    target = meanflow_target(gaussian_velocity(x, start), du_ds, start, end)
    assert torch.allclose(target, u, atol=1e-10, rtol=0)
    # the closed form is the flow's own average: its limit at e -> s is v, and one jump over [0, 1] is the OT map
    assert torch.allclose(gaussian_mean_velocity(x, start, start + 1e-7), gaussian_velocity(x, start), atol=1e-5)
    zero, one = torch.zeros(500, dtype=F64), torch.ones(500, dtype=F64)
    assert torch.allclose(x + gaussian_mean_velocity(x, zero, one), MEAN + SCALE * x, atol=1e-12)
    # the identity fails for a field that is not the flow's: the target then differs from the average
    wrong = meanflow_target(gaussian_velocity(x, start) + 0.1, du_ds, start, end)
    assert (wrong - u).abs().max() > 0.05


def test_the_jvp_is_the_total_derivative_along_the_trajectory_by_finite_differences() -> None:
    torch.manual_seed(0)
    net = MLP([2], width=32, depth=2, time_frequencies=2, time_inputs=2).to(F64)
    x, start, end = points(64, 1)
    v = torch.randn_like(x)

    def mean_velocity(y: Tensor, s: Tensor, e: Tensor) -> Tensor:
        return net(s, y, duration=e - s)

    _, du_ds = mean_velocity_and_total_derivative(mean_velocity, x, start, end, v)
    delta = 1e-6
    difference = mean_velocity(x + delta * v, start + delta, end) - mean_velocity(x - delta * v, start - delta, end)
    assert torch.allclose(du_ds, difference / (2 * delta), atol=1e-7, rtol=1e-6)
    # the duration moves with s: holding it fixed instead gives another derivative
    held = (
        net(start + delta, x + delta * v, duration=end - start)
        - net(start - delta, x - delta * v, duration=end - start)
    ) / (2 * delta)
    assert (held - du_ds).abs().max() > 1e-3


def test_meanflow_times_are_intervals_in_the_paper_proportions_in_fmlab_clock() -> None:
    assert meanflow_to_flow_times(torch.tensor(1.0), torch.tensor(0.0)) == (0.0, 1.0)  # noise -> data: [0, 1]
    path = AffinePath(Linear(), smoothing="none", t_min=0.0)
    torch.manual_seed(0)
    times = MeanFlowTimes(ratio=0.25).sample(path, 20000, dtype=F64)
    start, end = times[:, 0], times[:, 1]
    assert ((start >= 0) & (start <= end) & (end <= 1)).all()
    assert (start < end).double().mean().item() == pytest.approx(0.25, abs=0.015)
    # MeanFlow's t, r ~ logit-normal(-0.4, 1) in its clock (1 = noise), sorted: the noisier end is the larger of
    # two draws, P(logit t <= q) = Φ(q + 0.4)²; where r != t, r is the smaller one, 1 − (1 − Φ(q + 0.4))²
    noisy, clean = torch.logit(1 - start), torch.logit(1 - end[start < end])
    for q in (-1.5, -0.4, 0.5, 1.5):
        phi = torch.special.ndtr(torch.tensor(q + 0.4, dtype=F64)).item()
        assert (noisy <= q).double().mean().item() == pytest.approx(phi**2, abs=0.015)
        assert (clean <= q).double().mean().item() == pytest.approx(1 - (1 - phi) ** 2, abs=0.03)


def test_a_net_trained_with_the_meanflow_loss_on_gaussian_data_lands_on_it_in_one_step() -> None:
    """Trained on conditional velocities only (the marginal field is never shown), one jump x0 + ū(x0, 0, 1) is the OT
    map x ↦ μ + s x. Times cover the whole interval (logit-normal(0, 2): the one-step jump [0, 1] is in the tails
    of the paper's (-0.4, 1)); adaptive weight p = 0.5 (p = 1 gets there too, about twice as slowly)."""
    torch.manual_seed(0)
    path = AffinePath(Linear(), smoothing="none", t_min=0.0)
    net = MLP([2], width=128, depth=3, time_frequencies=0, time_inputs=2)
    objective, times = MeanFlowObjective(p=0.5), MeanFlowTimes(p_mean=0.0, p_std=2.0, ratio=0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1500)
    for _ in range(1500):
        x1 = MEAN.float() + SCALE * torch.randn(256, 2)
        loss = objective.loss(net, path, times.sample(path, 256), torch.randn(256, 2), x1, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    field = VelocityField(net, objective, path)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_step = sample(field, x0, MeanFlowSampler(num_steps=1))
    assert one_step.nfe == 1
    data = MEAN.float() + SCALE * torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    fresh = MEAN.float() + SCALE * torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    w2 = math.sqrt(ot.emd2([], [], ot.dist(one_step.samples, data).double()))
    floor = math.sqrt(ot.emd2([], [], ot.dist(fresh, data).double()))
    assert w2 < 1.6 * floor, (w2, floor)  # measured 1.1-1.25x over seeds 0-2
    # the jump is the OT map point by point (untrained, x0 itself is 1.8 away on average)
    assert (one_step.samples - (MEAN.float() + SCALE * x0)).norm(dim=1).mean() < 0.1
    assert (x0 - (MEAN.float() + SCALE * x0)).norm(dim=1).mean() > 1.5


class DurationBlindOracle(MarginalOracle):
    """The exact field of three points that takes a duration and ignores it (ū = v), counting its calls."""

    time_inputs = 2

    def __init__(self, path: AffinePath) -> None:
        super().__init__(path, torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]], dtype=F64))
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None, duration: Tensor | None = None) -> Tensor:
        self.calls += 1
        return super().forward(t.expand(x.shape[0]), x, labels)


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_mean_flow_jumps_are_k_net_calls_and_euler_when_the_net_ignores_the_duration(steps: int) -> None:
    path = AffinePath(Linear(), smoothing="none", t_min=0.0)
    net = DurationBlindOracle(path)
    field = VelocityField(net, VelocityObjective(), path)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(steps), dtype=F64)
    jumps = sample(field, x0, MeanFlowSampler(num_steps=steps))
    assert jumps.nfe == net.calls == steps == MeanFlowSampler(num_steps=steps).expected_nfe()
    euler = sample(field, x0, ODESolver("euler", num_steps=steps))
    assert torch.equal(jumps.samples, euler.samples)


def test_many_mean_flow_jumps_approach_the_ode_of_the_instantaneous_velocity() -> None:
    """K jumps of ū(x, t, t + 1/K) are Euler steps of a field that tends to v = ū(x, t, t): the error is O(1/K)."""
    torch.manual_seed(0)
    path = AffinePath(Linear(), smoothing="none", t_min=0.0)
    net = MLP([2], width=32, depth=2, time_frequencies=2, time_inputs=2).to(F64)
    field = VelocityField(net, VelocityObjective(), path)
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        ode = sample(field, x0, ODESolver("dopri5", atol=1e-10, rtol=1e-10)).samples
        errors = [(sample(field, x0, MeanFlowSampler(num_steps=k)).samples - ode).norm(dim=1).max() for k in (32, 256)]
    assert errors[1] < 1e-2 and errors[0] / errors[1] > 4  # first order: 8x the steps, ~8x smaller


# OT_RUN's budget and evaluation with MeanFlow's loss and two-jump sampling
MEANFLOW_RUN = ["method=meanflow", "solver=mean_flow", "solver.num_steps=2"]
MEANFLOW_RUN += [a for a in OT_RUN if not a.startswith(("method=", "coupling."))]


def test_a_meanflow_run_killed_and_resumed_ends_like_an_unbroken_one(tmp_path: Path) -> None:
    """SIGKILL at step 60 leaves the step-50 checkpoint; the resumed JVP training ends where the unbroken one does."""
    unbroken = tmp_path / "unbroken"
    result = run_cli("fmlab.train", *MEANFLOW_RUN, f"hydra.run.dir={unbroken}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # the JVP's first call makes torch warn that its own torch.jit.script use is deprecated: not the user's to act on
    assert "Warning" not in result.stdout + result.stderr
    run_dir = tmp_path / "run"
    killed = run_cli(
        "fmlab.train", *MEANFLOW_RUN, f"hydra.run.dir={run_dir}",
        "+callbacks.signal={_target_: tests.signals.SignalAt, step: 60, signal_name: SIGKILL}",
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli("fmlab.train", f"ckpt_path={run_dir}", "callbacks.signal=null", cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, reference = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, unbroken))
    assert ours["steps"] == reference["steps"] == 150 and ours["nfe"] == reference["nfe"] == 2
    for key in ("w2", "mmd", "train_loss"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize(("p", "estimate"), [(0.0, "mean"), (0.5, "geometric median"), (1.0, "mode")])
def test_the_adaptive_weight_sets_what_the_regression_estimates(p: float, estimate: str) -> None:
    """One constant u fitted by gradient descent on the weighted loss to targets (0, 0) 45%, (6, 0) 30%, (8, 0) 25%:
    mean (3.8, 0), geometric median (6, 0), mode (0, 0)."""
    targets = torch.zeros(100, 2, dtype=F64)
    targets[45:75, 0], targets[75:, 0] = 6.0, 8.0
    u = torch.tensor([[2.0, 0.5]], dtype=F64, requires_grad=True)
    optimizer = torch.optim.SGD([u], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4000)  # p = 1 pulls like 1/‖Δ‖ near the mode
    for _ in range(4000):
        loss = adaptively_weighted((u - targets).pow(2).sum(1), p, 1e-3).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    expected = {"mean": [3.8, 0.0], "geometric median": [6.0, 0.0], "mode": [0.0, 0.0]}[estimate]
    assert torch.allclose(u.detach(), torch.tensor([expected], dtype=F64), atol=0.05), u


def test_guided_jumps_mix_the_conditional_and_null_average_velocities() -> None:
    """eval.guidance_scale on a MeanFlow net: each jump takes ū_w = (1 + w) ū(·, y) − w ū(·, ∅), one doubled call."""
    torch.manual_seed(0)
    path = AffinePath(Linear(), smoothing="none", t_min=0.0)
    net = MLP([2], width=16, depth=2, num_classes=2, time_inputs=2).to(F64)
    field = VelocityField(net, MeanFlowObjective(), path)
    x = torch.randn(8, 2, dtype=F64)
    labels, t, h = torch.tensor([0, 1] * 4), torch.full((8,), 0.25, dtype=F64), torch.full((8,), 0.5, dtype=F64)
    with field.conditioned_on(labels, guidance_scale=2.0):
        guided = field.mean_velocity(t, x, h)
        assert field.nfe == 2
    conditional = net(t, x, labels=labels, duration=h)
    null = net(t, x, labels=torch.full_like(labels, 2), duration=h)
    assert torch.allclose(guided, 3.0 * conditional - 2.0 * null, atol=1e-12)

"""Tong et al. 2024's 2D protocol: their datasets, the runner's evaluation, best-val checkpoints, path energy."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchdiffeq import odeint

from fmlab.cli import compose_train_config
from fmlab.couplings import MinibatchOTCoupling
from fmlab.data.tong2d import (
    SPLIT,
    TongDataModule,
    split_dataset,
    tong_8gaussians,
    tong_moons,
    tong_pair_8gaussians,
    tong_pair_moons,
    tong_scurve,
)
from fmlab.metrics.distances import normalized_path_energy, wasserstein2
from fmlab.objectives import VelocityField
from fmlab.paths import AffinePath, Linear
from fmlab.samplers import ODESolver, path_energy
from tests.conftest import REPO_ROOT, run_cli

N = sum(SPLIT)


def nearest_centre_stats(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per centre: how many points are nearest to it, their mean and their per-coordinate std."""
    nearest = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    groups = [points[nearest == k] for k in range(len(centres))]
    return (
        np.array([len(g) for g in groups]),
        np.stack([g.mean(0) for g in groups]),
        np.stack([g.std(0) for g in groups]),
    )


def test_8gaussians_has_n_over_8_points_per_mode_at_radius_5_with_std_1() -> None:
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 5 * np.stack([np.cos(angles), np.sin(angles)], 1)
    counts, means, stds = nearest_centre_stats(tong_8gaussians(N, 42), centres)
    # modes 5·2 sin(π/8) ≈ 3.8 apart at std 1: a few points cross to a neighbour's side
    assert np.all(np.abs(counts - N // 8) < 40)
    assert np.abs(means - centres).max() < 0.1
    assert np.abs(stds - 1).max() < 0.1


def test_pair_8gaussians_sits_at_radius_12_with_std_1_5() -> None:
    d = 1 / np.sqrt(2)
    centres = 12 * np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [d, d], [d, -d], [-d, d], [-d, -d]])
    counts, means, stds = nearest_centre_stats(tong_pair_8gaussians(N, 42), centres)
    assert np.all(np.abs(counts - N / 8) < 4 * math.sqrt(N / 8))  # uniform over the 8 modes
    assert np.abs(means - centres).max() < 0.15
    assert np.abs(stds - 1.5).max() < 0.1


def test_moons_lie_on_two_radius_2_half_circles_with_noise_0_1() -> None:
    points = tong_moons(N, 42)
    # make_moons: unit half circles about (0, 0) (upper) and (1, 0.5) (lower), then × 2 and x − 1
    centres = np.array([[-1.0, 0.0], [1.0, 1.0]])
    radial = np.abs(np.linalg.norm(points[:, None] - centres[None], axis=-1) - 2).min(1)
    assert math.sqrt(np.mean(radial**2)) == pytest.approx(0.1, rel=0.15)  # noise 0.05 × 2, mostly radial


def test_scurve_moments_match_the_closed_form() -> None:
    """(x, z) = 1.5 (sin t, sign(t)(cos t − 1)) + noise, t ~ U(−3π/2, 3π/2): E = 0, Var x = 1.5²/2,
    Var z = 1.5² (3/2 + 4/(3π))."""
    points = tong_scurve(N, 42)
    noise = (1.5 * 0.05) ** 2
    assert np.abs(points.mean(0)).max() < 4 * 2.1 / math.sqrt(N)
    assert points[:, 0].var() == pytest.approx(1.5**2 / 2 + noise, rel=0.03)
    assert points[:, 1].var() == pytest.approx(1.5**2 * (1.5 + 4 / (3 * math.pi)) + noise, rel=0.03)


def test_pair_moons_are_standardised_over_all_coordinates_then_scaled_by_7() -> None:
    points = tong_pair_moons(N, 42)
    assert points.mean() == pytest.approx(0, abs=1e-9)
    assert points.std() == pytest.approx(7, rel=1e-9)


def test_splits_are_disjoint_fixed_sizes_and_the_same_for_every_training_seed() -> None:
    indices = split_dataset(np.arange(N, dtype=np.float64)[:, None])
    assert [len(part) for part in indices] == list(SPLIT)
    assert len(set(torch.cat(indices).flatten().long().tolist())) == N  # disjoint, covering
    a, b = TongDataModule("tong_moons", seed=42), TongDataModule("tong_moons", seed=7)
    assert torch.equal(a.test_split, b.test_split) and torch.equal(a.train_split, b.train_split)
    assert torch.equal(a.held_out(), a.test_split) and a.batches_per_epoch == 10_000 // 512
    # the floor compares with the test split of an independent draw of the dataset
    assert not torch.equal(a.held_out(index=1), a.held_out())


def test_epochs_shuffle_the_train_split_and_batches_resume_exactly() -> None:
    data = TongDataModule("tong_pair_8gaussians", "tong_pair_moons", seed=3)
    stream = data._stream
    epoch = torch.cat([stream.batch(i)[1] for i in range(stream.batches_per_epoch)])
    rows = {tuple(r) for r in data.train_split.tolist()}
    assert len({tuple(r) for r in epoch.tolist()}) == len(epoch) and {tuple(r) for r in epoch.tolist()} <= rows
    assert not torch.equal(stream.batch(0)[1], stream.batch(stream.batches_per_epoch)[1])  # a new permutation
    unbroken = [b for _, b in zip(range(30), iter(stream), strict=False)]
    resumed = TongDataModule("tong_pair_8gaussians", "tong_pair_moons", seed=3)
    resumed.load_state_dict({"next_index": 10})
    again = [b for _, b in zip(range(9), iter(resumed._stream), strict=False)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(unbroken[10:19], again, strict=True))


def test_draw_from_plan_draws_only_optimal_pairs_with_replacement() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3
    coupling = MinibatchOTCoupling("exact", draw_from_plan=True)
    partner = coupling.plan(x0, x1).argmax(1)
    torch.manual_seed(1)
    a, b = coupling(x0, x1)
    source = [int(torch.nonzero((x0 == row).all(1))[0]) for row in a]
    target = [int(torch.nonzero((x1 == row).all(1))[0]) for row in b]
    assert all(partner[i] == j for i, j in zip(source, target, strict=True))
    assert len(set(source)) < 64  # with replacement: some pairs twice


def test_sinkhorn_falls_back_to_the_log_domain_only_when_the_plain_solver_fails() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = 10 * torch.randn(32, 2, generator=g), 10 * torch.randn(32, 2, generator=g)
    for reg in (2.0, 0.05):  # exp(−C/reg) fine; underflowing
        plan = MinibatchOTCoupling("sinkhorn", reg=reg).plan(x0, x1)
        assert np.isfinite(plan).all() and np.abs(plan.sum(1) - 1 / 32).sum() < 1e-3


class SmallNet(nn.Module):
    """A small untrained MLP v(t, x) (the shape of a trained net's field)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(3, 32), nn.SELU(), nn.Linear(32, 2))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.layers(torch.cat([x, t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1)], 1))


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_tong_evaluation_equals_a_direct_torchdiffeq_integration(tmp_path: Path, method: str) -> None:
    cfg = compose_train_config(["experiment=tong2d_icfm", "data=tong_moons", f"eval.solver.method={method}"], tmp_path)
    evaluator, data = instantiate(cfg.eval), instantiate(cfg.data)
    plain = SmallNet()
    field = VelocityField(plain, instantiate(cfg.objective), instantiate(cfg.path))
    results = evaluator.evaluate(field, data)
    x0 = data.eval_source(1000, draw=0, chunk=0)
    with torch.no_grad():
        direct = odeint(lambda t, x: plain(t, x), x0, torch.linspace(0, 1, 101), method=method)[-1]
    emd2 = ot.emd2(ot.unif(1000), ot.unif(1000), ot.dist(direct.double().numpy(), data.test_split.double().numpy()))
    assert results["nfe"] == (100 if method == "euler" else 400)
    assert results["w2"] == pytest.approx(math.sqrt(emd2), rel=1e-6)
    if method == "euler":  # the energy on the same Euler steps: Σ_k Δt ‖v(t_k, x_k)‖²
        x, energy = x0.clone(), torch.zeros(1000)
        with torch.no_grad():
            for t in torch.linspace(0, 1, 101)[:-1]:
                v = plain(t, x)
                energy, x = energy + 0.01 * v.pow(2).sum(1), x + 0.01 * v
        assert results["path_energy"] == pytest.approx(float(energy.mean()), rel=1e-5)
        cost = wasserstein2(x0, data.test_split) ** 2
        mean = float(energy.mean())
        assert results["normalized_path_energy"] == pytest.approx(abs(mean - cost) / cost, rel=1e-4)


class GaussianMapField(nn.Module):
    """The displacement interpolation between N(0, I) and N(μ, s² I): x_t = (1 − t + t s) x0 + t μ, so
    v_t(x) = (s − 1) x0 + μ with x0 = (x − t μ) / (1 − t + t s); `twist` adds a rotation, a non-optimal flow."""

    def __init__(self, mu: Tensor, s: float, twist: float = 0.0) -> None:
        super().__init__()
        self.mu, self.s, self.twist = mu, s, twist
        self.path = AffinePath(Linear())
        self.nfe = 0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        x0 = (x - t * self.mu) / (1 - t + t * self.s)
        rotation = self.twist * torch.sin(math.pi * t) * torch.stack([-x[:, 1], x[:, 0]], 1)
        return (self.s - 1) * x0 + self.mu + rotation


def test_normalized_path_energy_of_the_exact_ot_map_between_gaussians_is_zero() -> None:
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, s = torch.tensor([3.0, -1.0], dtype=torch.float64), 0.5
    solver = ODESolver("rk4", num_steps=50)
    straight = path_energy(GaussianMapField(mu, s), x0, solver)
    assert torch.allclose(straight.samples, mu + s * x0, atol=1e-10)  # the OT map x ↦ μ + s x
    # the pairing x0 ↔ μ + s x0 is optimal, so the sample W2² is the mean squared displacement
    cost = wasserstein2(x0, straight.samples) ** 2
    assert float(straight.energy.mean()) == pytest.approx(cost, rel=1e-9)
    assert normalized_path_energy(float(straight.energy.mean()), cost) < 1e-9
    twisted = path_energy(GaussianMapField(mu, s, twist=2.0), x0, solver)
    assert normalized_path_energy(float(twisted.energy.mean()), wasserstein2(x0, twisted.samples) ** 2) > 0.05


def test_best_val_checkpoint_is_the_minimum_of_the_logged_val_losses(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli(
        "fmlab.train",
        "experiment=tong2d_icfm",
        "data=tong_scurve",
        "trainer.max_steps=304",  # 16 epochs of 19 batches
        "trainer.check_val_every_n_epoch=2",
        "logger=csv",
        "extras.print_config=false",
        f"hydra.run.dir={run}",
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with (run / "csv" / "metrics.csv").open() as handle:
        logged = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(handle) if r.get("val/loss")]
    assert [step for step, _ in logged] == [38 * k - 1 for k in range(1, 9)]  # every second epoch's last step
    best_step, best_loss = min(logged, key=lambda row: row[1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_checkpoint"] == "best" and metrics["eval_checkpoint_step"] == best_step + 1
    assert metrics["eval_checkpoint_score"] == pytest.approx(best_loss, rel=1e-6)
    assert metrics["nfe"] == 100 and metrics["num_eval_samples"] == 1000 and math.isfinite(metrics["w2_floor"])


def test_the_floor_script_measures_independent_draws_against_the_test_split() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("w2_floors", REPO_ROOT / "scripts" / "w2_floors.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    values = script.floors("data=tong_moons", draws=3, num_samples=200)
    data = TongDataModule("tong_moons", num_eval_samples=200)
    assert values[0] == pytest.approx(wasserstein2(data.held_out(index=1), data.held_out()), rel=1e-12)
    assert len(set(values)) == 3 and all(v > 0 for v in values)

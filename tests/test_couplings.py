"""Minibatch couplings: the exact OT pairing is the optimal assignment."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from fmlab.couplings import IndependentCoupling, MinibatchOTCoupling, squared_distance_matrix


def test_exact_ot_coupling_is_the_optimal_assignment() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(128, 2, generator=g), torch.randn(128, 2, generator=g) * 2 + 1
    paired_x0, paired_x1 = MinibatchOTCoupling("exact")(x0, x1)
    cost = squared_distance_matrix(x0, x1).double().numpy()
    rows, cols = linear_sum_assignment(cost)
    optimal = cost[rows, cols].sum()
    ours = (paired_x0.double() - paired_x1.double()).pow(2).sum(1).sum().item()
    assert torch.equal(paired_x0, x0)
    assert sorted(map(tuple, paired_x1.tolist())) == sorted(map(tuple, x1.tolist()))  # a permutation of the batch
    assert abs(ours - optimal) < 1e-6 * optimal
    independent = (x0.double() - x1.double()).pow(2).sum().item()
    assert ours < 0.5 * independent


def test_sinkhorn_plan_has_uniform_marginals_and_tends_to_the_exact_cost() -> None:
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3
    cost = squared_distance_matrix(x0, x1).double().numpy()
    exact = (MinibatchOTCoupling("exact").plan(x0, x1) * cost).sum()
    costs = {}
    for reg in (0.02, 0.5, 5.0):
        plan = MinibatchOTCoupling("sinkhorn", reg=reg).plan(x0, x1)
        # marginals hold up to the solver's stopping point (1000 iterations): within 2% of 1/n
        assert abs(plan.sum(0) * 64 - 1).max() < 0.02 and abs(plan.sum(1) * 64 - 1).max() < 0.02
        costs[reg] = (plan * cost).sum()
    assert abs(costs[0.02] - exact) < 0.01 * exact
    assert costs[0.02] < costs[0.5] < costs[5.0]


def test_sinkhorn_coupling_pairs_come_from_the_batches() -> None:
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3
    torch.manual_seed(0)
    p0, p1 = MinibatchOTCoupling("sinkhorn", reg=0.05)(x0, x1)
    rows0, rows1 = {tuple(r) for r in x0.tolist()}, {tuple(r) for r in x1.tolist()}
    assert p0.shape == x0.shape and all(tuple(r) in rows0 for r in p0.tolist())
    assert p1.shape == x1.shape and all(tuple(r) in rows1 for r in p1.tolist())
    assert (p0 - p1).pow(2).sum() < 0.8 * (x0 - x1).pow(2).sum()


def test_independent_coupling_returns_the_batch_unchanged() -> None:
    x0, x1 = torch.randn(4, 2), torch.randn(4, 2)
    a, b = IndependentCoupling()(x0, x1)
    assert a is x0 and b is x1

"""Couplings of a (source, data) minibatch: independent, or re-paired by minibatch optimal transport. Pure functions
of the batch (and a seeded generator): they read no model, so the datamodule applies them where it makes each batch,
in its loader workers."""

from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np
import ot
import torch
from torch import Tensor

from fmlab.errors import UserError, choices_error

OT_METHODS = ("exact", "sinkhorn")
# the L1 error of a Sinkhorn plan's row marginals beyond which the plain solver's result is not trusted
SINKHORN_MARGINAL_TOLERANCE = 1e-3


Pairs = tuple[Tensor, ...]  # (x0, x1), or (x0, x1, labels of x1) for class-conditional batches


class Coupling(Protocol):
    """What the datamodule calls on each batch (x0, x1[, labels]): the same batch re-paired."""

    @property
    def solves_per_batch(self) -> bool: ...

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Pairs: ...  # fmt: skip


class IndependentCoupling:
    """q(x0, x1) = p0(x0) q1(x1): the batch as sampled.

    Couplings read only the batch, never the model, so the datamodule applies them as it makes each batch (in its
    loader workers, ahead of the training step); `generator` seeds any random draw, so a coupled batch is a pure
    function of the batch and the generator's seed.
    """

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Pairs:  # fmt: skip
        return (x0, x1) if labels is None else (x0, x1, labels)

    @property
    def solves_per_batch(self) -> bool:
        """Whether coupling a batch solves a problem (then a loader worker is worth its start-up)."""
        return False

    def __repr__(self) -> str:
        return "IndependentCoupling()"


def squared_distance_matrix(x0: Tensor, x1: Tensor) -> Tensor:
    """C_ij = ‖x0_i − x1_j‖², the OT cost between the flattened samples of two batches."""
    return torch.cdist(x0.flatten(1), x1.flatten(1)).pow(2)


class MinibatchOTCoupling:
    """Minibatch OT coupling of OT-CFM (Tong et al. 2024, Alg. 3; Pooladian et al. 2023).

    `exact`: POT's network-simplex EMD on C; with two equal uniform batches the optimal plan is a permutation,
    so x1 is re-ordered to its partner. `sinkhorn`: the entropic plan with regularisation `reg` on C (SB-CFM
    takes reg = 2σ²), and pairs (i, j) drawn from it with replacement. `draw_from_plan=True` draws the exact plan's
    pairs with replacement too, as TorchCFM's `OTPlanSampler.sample_plan` does (some pairs twice, some not at all).

    Labelled batches (conditioning=class): each x1 keeps its label. `per_class=True` solves one OT problem per
    class, between that class's data rows and as many source rows (those at the same batch positions), so a pair
    never crosses classes and the conditional path of class y transports N(0, I) to p(x | y).
    """

    def __init__(self, method: str = "exact", reg: float = 0.05, draw_from_plan: bool = False,
                 per_class: bool = False) -> None:  # fmt: skip
        if method not in OT_METHODS:
            raise choices_error("coupling.method", method, OT_METHODS)
        if method == "sinkhorn" and reg <= 0:
            raise UserError(f"coupling.reg={reg} must be > 0 for sinkhorn")
        self.method, self.reg, self.draw_from_plan = method, float(reg), bool(draw_from_plan)
        self.per_class = bool(per_class)

    @property
    def solves_per_batch(self) -> bool:
        return True

    def plan(self, x0: Tensor, x1: Tensor) -> np.ndarray:
        """The OT plan π between the two batches' empirical measures (uniform weights)."""
        cost = squared_distance_matrix(x0.detach(), x1.detach()).double().cpu().numpy()
        a = np.full(cost.shape[0], 1.0 / cost.shape[0])
        b = np.full(cost.shape[1], 1.0 / cost.shape[1])
        if self.method == "exact":
            return ot.emd(a, b, cost, numItermax=10_000_000)
        # Plain Sinkhorn in float64 (POT's default, as TorchCFM calls it) is 40-100x faster than the log-domain
        # solver; it is kept unless exp(−C/reg) under- or overflowed its scalings (a non-finite plan, or marginals
        # off by more than SINKHORN_MARGINAL_TOLERANCE), when the log-domain solver redoes it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns on every batch that 1,000 iterations did not reach 1e-9
            plan = ot.sinkhorn(a, b, cost, self.reg, method="sinkhorn", numItermax=1000)
            if np.isfinite(plan).all() and np.abs(plan.sum(1) - a).sum() < SINKHORN_MARGINAL_TOLERANCE:
                return plan
            return ot.sinkhorn(a, b, cost, self.reg, method="sinkhorn_log", numItermax=1000)

    def pair_indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Row indices (i, j): the coupled batch is (x0[i], x1[j]); pairs drawn from a plan use `generator`."""
        pi = self.plan(x0, x1)
        if self.method == "exact" and x0.shape[0] == x1.shape[0] and not self.draw_from_plan:
            return torch.arange(x0.shape[0]), torch.from_numpy(pi.argmax(axis=1))
        probs = torch.from_numpy(pi.ravel()).clamp_min(0)
        pairs = torch.multinomial(probs / probs.sum(), x0.shape[0], replacement=True, generator=generator)
        return pairs // pi.shape[1], pairs % pi.shape[1]

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Pairs:  # fmt: skip
        if labels is not None and self.per_class:
            i, j = self._per_class_indices(x0, x1, labels, generator)
        else:
            i, j = self.pair_indices(x0, x1, generator)
        i, j = i.to(x0.device), j.to(x1.device)
        return (x0[i], x1[j]) if labels is None else (x0[i], x1[j], labels[j])

    def _per_class_indices(self, x0: Tensor, x1: Tensor, labels: Tensor,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """One OT problem per class among the rows of that class (x0 rows at the same positions)."""
        if x0.shape[0] != x1.shape[0]:
            raise UserError(f"coupling.per_class=true needs equal batches; got {x0.shape[0]} and {x1.shape[0]}")
        i_all, j_all = [], []
        for label in torch.unique(labels):
            rows = torch.nonzero(labels == label).flatten().cpu()
            i, j = self.pair_indices(x0[rows.to(x0.device)], x1[rows.to(x1.device)], generator)
            i_all.append(rows[i])
            j_all.append(rows[j])
        return torch.cat(i_all), torch.cat(j_all)

    def __repr__(self) -> str:
        drawn = ", draw_from_plan=True" if self.draw_from_plan else ""
        per_class = ", per_class=True" if self.per_class else ""
        return f"MinibatchOTCoupling(method={self.method}, reg={self.reg}{drawn}{per_class})"

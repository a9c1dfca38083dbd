"""Couplings of a (source, data) minibatch: independent, or re-paired by minibatch optimal transport. Pure functions
of the batch (and a seeded generator): they read no model, so the datamodule applies them where it makes each batch,
in its loader workers."""

from __future__ import annotations

import math
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
        # the condition kinds a pairing by condition uses (fmlab.conditioning.check_parts): classes for per_class
        self.condition_kinds: tuple[str, ...] = ("class",) if self.per_class else ()

    @property
    def solves_per_batch(self) -> bool:
        return True

    def plan(self, x0: Tensor, x1: Tensor, cost: Tensor | None = None) -> np.ndarray:
        """The OT plan π between the two batches' empirical measures (uniform weights), for the cost C_ij (default
        the squared distance)."""
        cost = squared_distance_matrix(x0.detach(), x1.detach()) if cost is None else cost
        cost = cost.double().cpu().numpy()
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

    def pair_indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                     cost: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Row indices (i, j): the coupled batch is (x0[i], x1[j]); pairs drawn from a plan use `generator`."""
        pi = self.plan(x0, x1, cost)
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


CONDITION_COSTS = ("cosine", "l2_squared")


def condition_cost_matrix(y0: Tensor, y1: Tensor, kind: str) -> Tensor:
    """C_ij between conditions (c2ot/ot.py `get_condition_cost_matrix`): `cosine` 1 − ⟨y0_i, y1_j⟩/(‖y0_i‖‖y1_j‖)
    (class labels as one-hot vectors: 0 within a class, 1 across), `l2_squared` ‖y0_i − y1_j‖²."""
    y0, y1 = y0.reshape(len(y0), -1).double(), y1.reshape(len(y1), -1).double()
    if kind == "cosine":
        y0, y1 = y0 / y0.norm(dim=1, keepdim=True), y1 / y1.norm(dim=1, keepdim=True)
        return 1 - y0 @ y1.T
    return torch.cdist(y0, y1).pow(2)


def below_diagonal_ratio(distance: Tensor, condition: Tensor, weight: float) -> float:
    """C²OT's r(w) = mean_ij 1[M_ij + w C_ij ≤ M_jj]: the share of pairs no costlier than data row j's pairing with
    the source row at its own position; r(0) is the most, and r decreases with w."""
    return float(((distance + weight * condition) <= torch.diag(distance)).double().mean())


def search_condition_weight(
    distance: Tensor,
    condition: Tensor,
    target: float,
    initial: float = 100.0,
    max_iterations: int = 10,
    tolerance: float = 1e-3,
    largest: float = 1e8,
) -> float:
    """The w of Cheng & Schwing 2025 (c2ot/ot.py `search_for_w`): the weight whose r(w) is `target` within
    `tolerance`, by an exponential search for an upper bracket from `initial` (at most `largest`), then bisection,
    each of at most `max_iterations` steps. w = 0 when even r(0) is below the target."""
    if below_diagonal_ratio(distance, condition, 0.0) < target:
        return 0.0
    low, high = 0.0, initial
    for _ in range(max_iterations):
        if below_diagonal_ratio(distance, condition, high) <= target:
            break
        low, high = high, high * 2
        if high > largest:
            return largest
    middle = high
    for _ in range(max_iterations):
        middle = (low + high) / 2
        ratio = below_diagonal_ratio(distance, condition, middle)
        if ratio < target:
            high = middle
        else:
            low = middle
        if abs(ratio - target) < tolerance:
            break
    return middle


def check_search_settings(initial_weight: float, max_iterations: int, ratio_tolerance: float) -> None:
    """The weight search's own settings (`search_condition_weight`): a finite positive first guess for w to double
    from, a whole number of steps of each search, and a tolerance on the ratio r inside (0, 1)."""
    number = isinstance(initial_weight, int | float) and not isinstance(initial_weight, bool)
    if not number or not 0 < initial_weight < math.inf:
        raise UserError(f"coupling.initial_weight={initial_weight!r} must be a finite number > 0 (w doubles from it)")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise UserError(f"coupling.max_iterations={max_iterations!r} must be a whole number >= 1")
    if isinstance(ratio_tolerance, bool) or not isinstance(ratio_tolerance, int | float) or not 0 < ratio_tolerance < 1:
        raise UserError(f"coupling.ratio_tolerance={ratio_tolerance!r} must lie in (0, 1)")


class ConditionAwareOTCoupling(MinibatchOTCoupling):
    """C²OT (Cheng & Schwing 2025, "Condition-aware OT", c2ot/ot.py): exact minibatch OT on the cost

        M_ij + w · C(y_i, y_j),   M_ij = ‖x0_i − x1_j‖²,

    where the source row i takes the condition y_i of the data row at its own batch position (their y0 = y1), so
    a source point is paired with data of (nearly) its own condition and the conditional model learns the
    conditional map, not a map that crosses conditions. `condition_cost`: `cosine` for class labels, `l2_squared`
    for continuous conditions. `weight` fixes w (w = 0 is plain minibatch OT); `target_ratio` r instead finds w per
    batch (`search_condition_weight`, starting from `initial_weight`: each batch's own search, so a coupled batch
    is a pure function of the batch; their sampler starts each batch from the w the last one found, which moves only
    where r lands inside its tolerance). Class labels with an infinite weight (`weight=inf`) never pair across
    classes: that is OT within each class, solved so (`per_class`), whatever the batch's class counts.
    """

    infinite_settings = ("weight",)  # w = inf: pair within classes only (the cosine cost of class conditions)

    def __init__(self, weight: float | None = None, target_ratio: float | None = None,
                 condition_cost: str = "cosine", initial_weight: float = 100.0, max_iterations: int = 10,
                 ratio_tolerance: float = 1e-3) -> None:  # fmt: skip
        if condition_cost not in CONDITION_COSTS:
            raise choices_error("coupling.condition_cost", condition_cost, CONDITION_COSTS)
        if (weight is None) == (target_ratio is None):
            raise UserError(
                f"coupling.weight={weight} and coupling.target_ratio={target_ratio}: give exactly one (a fixed w, or "
                "the ratio r that sets w per batch)"
            )
        numbers = {"coupling.weight": weight, "coupling.target_ratio": target_ratio}
        for key, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise UserError(f"{key}={value!r} is not a number (infinity is written inf)")
        if weight is not None and not weight >= 0:
            raise UserError(f"coupling.weight={weight} must be >= 0 (inf: never across classes)")
        if target_ratio is not None and not 0 < target_ratio < 1:
            raise UserError(f"coupling.target_ratio={target_ratio} must lie in (0, 1)")
        check_search_settings(initial_weight, max_iterations, ratio_tolerance)
        super().__init__("exact", per_class=weight is not None and math.isinf(weight))
        self.condition_kinds = ("class",) if self.per_class else ("class", "continuous")
        self.weight, self.target_ratio, self.condition_cost = weight, target_ratio, condition_cost
        self.initial_weight, self.max_iterations, self.ratio_tolerance = initial_weight, max_iterations, ratio_tolerance

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Pairs:  # fmt: skip
        if labels is None:
            raise UserError("coupling=c2ot needs conditions: train it with conditioning=class or a continuous one")
        if self.per_class:
            if labels.is_floating_point():
                raise UserError("coupling.weight=.inf pairs within classes: it needs class labels (conditioning=class)")
            return super().__call__(x0, x1, labels, generator)
        y = torch.nn.functional.one_hot(labels).double() if not labels.is_floating_point() else labels
        distance = squared_distance_matrix(x0.detach(), x1.detach()).double()
        condition = condition_cost_matrix(y, y, self.condition_cost)
        weight = self.weight
        if weight is None:
            weight = search_condition_weight(distance, condition, self.target_ratio, self.initial_weight,
                                             self.max_iterations, self.ratio_tolerance)  # fmt: skip
        i, j = self.pair_indices(x0, x1, generator, cost=distance + weight * condition)
        i, j = i.to(x0.device), j.to(x1.device)
        return x0[i], x1[j], labels[j]

    def __repr__(self) -> str:
        setting = f"weight={self.weight}" if self.weight is not None else f"target_ratio={self.target_ratio}"
        return f"ConditionAwareOTCoupling({setting}, condition_cost={self.condition_cost})"

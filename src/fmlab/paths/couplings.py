"""Couplings of a (source, data) minibatch: independent, or re-paired by minibatch optimal transport."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

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


class ReflowCoupling(IndependentCoupling):
    """Reflow (Liu et al. 2023, "flow matching on the flow-matched pairs"): q(x0, x1) is the teacher's own coupling
    (x0, ODE_teacher(x0)), x0 from the source. Training on it gives the (k+1)-rectified flow of a k-rectified teacher,
    whose paths are straighter, so few Euler steps suffice; a student of a student chains rounds.

    The pairs are generated once by `fmlab.evaluation.reflow_pairs` (with `solver`, `num_pairs` of them in chunks of
    `batch_size`), stored in `pairs_dir` (default: `<teacher run dir>/reflow_pairs/<solver>_<num_pairs>`), and the
    datamodule (`fmlab.data.reflow.ReflowDataModule`) streams them already coupled, so the coupling itself passes the
    batch through. `init_from_teacher` starts the student from the teacher's weights, as the authors' reflow runs do
    (gnobitab/RectifiedFlow, configs/rectified_flow/cifar10_rf_gaussian_reflow_train.py, `last_flow_ckpt`: "the
    rectified flow model to fine-tune"); `use_ema` takes the teacher's EMA weights.
    """

    def __init__(
        self,
        teacher: str | None = None,
        num_pairs: int = 10_000,
        solver: Any = None,
        batch_size: int = 500,
        pairs_dir: str | None = None,
        init_from_teacher: bool = True,
        use_ema: bool = True,
    ) -> None:
        if not teacher:
            raise UserError("coupling=reflow needs coupling.teacher=<the teacher's run dir or checkpoint>")
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 2:
            raise UserError(f"coupling.num_pairs={num_pairs!r} is invalid; it must be a whole number >= 2")
        self.teacher, self.num_pairs, self.batch_size = str(teacher), num_pairs, int(batch_size)
        self.solver = solver
        self.init_from_teacher, self.use_ema = bool(init_from_teacher), bool(use_ema)
        self.pairs_dir = Path(pairs_dir) if pairs_dir else self.default_pairs_dir()

    def teacher_run_dir(self) -> Path:
        path = Path(self.teacher)
        return path.parent.parent if path.suffix == ".ckpt" else path

    def default_pairs_dir(self) -> Path:
        method = getattr(self.solver, "method", "solver")
        setting = f"tol{self.solver.atol:g}" if getattr(self.solver, "is_adaptive", False) else (
            f"{getattr(self.solver, 'num_steps', '')}steps")  # fmt: skip
        return self.teacher_run_dir() / "reflow_pairs" / f"{method}_{setting}_{self.num_pairs}"

    def __repr__(self) -> str:
        return f"ReflowCoupling(teacher={self.teacher}, num_pairs={self.num_pairs}, solver={self.solver!r})"

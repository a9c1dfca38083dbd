"""The reflow coupling: the teacher's own pairs (x0, ODE_teacher(x0)), as `coupling=reflow` configures them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmlab.couplings import IndependentCoupling
from fmlab.errors import UserError


class ReflowCoupling(IndependentCoupling):
    """Reflow (Liu et al. 2023, "flow matching on the flow-matched pairs"): q(x0, x1) is the teacher's own coupling
    (x0, ODE_teacher(x0)), x0 from the source. Training on it gives the (k+1)-rectified flow of a k-rectified teacher,
    whose paths are straighter, so few Euler steps suffice; a student of a student chains rounds.

    The pairs are generated once by `fmlab.reflow.pairs` (with `solver`, `num_pairs` of them in chunks of
    `batch_size`), stored in `pairs_dir` (default: `<teacher run dir>/reflow_pairs/<solver>_<num_pairs>`), and the
    datamodule (`fmlab.reflow.datamodule.ReflowDataModule`) streams them already coupled, so the coupling itself
    passes the batch through. `init_from_teacher` starts the student from the teacher's weights, as the authors'
    reflow runs do (gnobitab/RectifiedFlow, configs/rectified_flow/cifar10_rf_gaussian_reflow_train.py,
    `last_flow_ckpt`: "the rectified flow model to fine-tune"); `use_ema` takes the teacher's EMA weights.
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"coupling.batch_size={batch_size!r} is invalid; it must be a whole number >= 1")
        if solver is None or not hasattr(solver, "integrate"):
            raise UserError(f"coupling.solver={solver!r} is not a sampler; give one of conf/solver (e.g. dopri5)")
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

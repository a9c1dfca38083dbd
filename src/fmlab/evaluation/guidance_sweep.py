"""Sample quality and class fidelity against the classifier-free guidance scale w, at one or more solvers (NFE
budgets), for one class-conditional checkpoint. Numbers only."""

from __future__ import annotations

from typing import Any

from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.evaluation.engine import Evaluator
from fmlab.evaluation.nfe_sweep import sweep_evaluator, sweep_row
from fmlab.objectives import VelocityField


def guidance_sweep(
    evaluator: Evaluator,
    field: VelocityField,
    datamodule: EvaluationData,
    solvers: list[Any],
    guidance_scales: list[float],
    ranks: Ranks,
) -> list[dict[str, Any]]:
    """One row per (solver, w): NFE (net calls, two per guided step), FID or W2, and on digits the class accuracy.
    The caller's evaluator is left as it was."""
    if not field.is_conditional:
        raise UserError("sweep=guidance needs a class-conditional run (trained with conditioning=class)")
    if not guidance_scales:
        raise UserError("sweep.guidance_scales is empty; give at least one scale, e.g. [0, 1, 2]")
    evaluator = sweep_evaluator(evaluator)
    rows = []
    for solver in solvers:
        solver.check_path(field.path)
        for scale in guidance_scales:
            evaluator.solver, evaluator.guidance_scale = solver, float(scale)
            results = evaluator.evaluate(field, datamodule, ranks)
            row = sweep_row(solver, results, guidance_scale=float(scale))
            rows.append(
                {**row, "class_accuracy": results.get("class_accuracy", ""), "seconds": results["eval_seconds"]}
            )
    return rows

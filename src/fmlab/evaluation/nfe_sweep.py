"""Sample quality against NFE for one checkpoint (Lipman et al. 2023, Fig. 7): one evaluator, many samplers. Numbers
only: the entry point writes the rows (`fmlab.io`) and draws them (`fmlab.plotting`)."""

from __future__ import annotations

import copy
from typing import Any

from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.evaluation.engine import Evaluator
from fmlab.objectives import VelocityField
from fmlab.samplers import Sampler


def sweep_evaluator(evaluator: Evaluator) -> Evaluator:
    """A copy of `evaluator` for a sweep (the caller's is left as it was): a sweep measures quality against cost, so
    no extra path-energy integration per point unless asked for."""
    evaluator = copy.copy(evaluator)
    if evaluator.path_energy is None:
        evaluator.path_energy = False
    return evaluator


def sweep_row(solver: Sampler, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One sweep point: the solver's settings, NFE and the quality metric (FID for images, W2 for points), with
    `extra` columns before the metric."""
    metric = "fid" if "fid" in results else "w2"
    return {
        "method": solver.method,
        "num_steps": solver.num_steps if not solver.is_adaptive else "",
        "tolerance": solver.atol if solver.is_adaptive else "",
        **extra,
        "nfe": results["nfe"],
        "metric": metric,
        "value": results[metric],
    }


def nfe_sweep(
    evaluator: Evaluator, field: VelocityField, datamodule: EvaluationData, solvers: list[Sampler], ranks: Ranks
) -> list[dict[str, Any]]:
    """One row per solver: its NFE and the quality metric (FID for images, W2 for points). The evaluator is reused,
    so the FID extractor and reference statistics are built once; the caller's evaluator is left as it was."""
    evaluator = sweep_evaluator(evaluator)
    rows = []
    for solver in solvers:
        try:
            solver.check_path(field.path)
        except UserError as refusal:  # e.g. the path's own g² on the OT path: that sampler has no point here
            print(f"fmlab.evaluate: sweep skips {solver!r}: {refusal}", flush=True)
            continue
        evaluator.solver = solver
        results = evaluator.evaluate(field, datamodule, ranks)
        rows.append({**sweep_row(solver, results), "seconds": results["eval_seconds"]})
    return rows

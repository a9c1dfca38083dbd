"""Sample quality against NFE for one checkpoint (Lipman et al. 2023, Fig. 7): one evaluator, many solvers."""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks
from fmlab.errors import UserError, choices_error
from fmlab.evaluation.engine import Evaluator
from fmlab.runs import write_atomically
from fmlab.sampling import ODESolver, VelocityField
from fmlab.stochastic import EDMHeun, EulerMaruyama, PredictorCorrector

# the baselines' own samplers a sweep can add (fmlab.stochastic), with their conf/solver defaults otherwise
STOCHASTIC_SOLVERS = {"euler_maruyama": EulerMaruyama, "pc": PredictorCorrector, "edm_heun": EDMHeun}


def sweep_solvers(
    fixed_step_methods: Iterable[str],
    num_steps: Iterable[int],
    adaptive_methods: Iterable[str],
    tolerances: Iterable[float],
    stochastic_methods: Iterable[str] = (),
    stochastic_num_steps: Iterable[int] = (),
) -> list[Any]:
    """Every fixed-step method at every step count, every adaptive method at every tolerance, then every native
    sampler (euler_maruyama, pc, edm_heun) at every one of its step counts."""
    solvers: list[Any] = [ODESolver(m, num_steps=n) for m in fixed_step_methods for n in num_steps]
    solvers += [ODESolver(m, atol=tol, rtol=tol) for m in adaptive_methods for tol in tolerances]
    for method in stochastic_methods:
        if method not in STOCHASTIC_SOLVERS:
            raise choices_error("sweep.stochastic_methods", method, STOCHASTIC_SOLVERS)
        solvers += [STOCHASTIC_SOLVERS[method](num_steps=n) for n in stochastic_num_steps]
    return solvers


def sweep_evaluator(evaluator: Evaluator) -> Evaluator:
    """A copy of `evaluator` for a sweep (the caller's is left as it was): a sweep measures quality against cost, so
    no extra path-energy integration per point unless asked for."""
    evaluator = copy.copy(evaluator)
    if evaluator.path_energy is None:
        evaluator.path_energy = False
    return evaluator


def sweep_row(solver: Any, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
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
    evaluator: Evaluator, field: VelocityField, datamodule: EvaluationData, solvers: list[Any], ranks: Ranks
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


def write_rows(target: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as a CSV file, written whole."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(target, text.getvalue().encode())


def plot_nfe_sweep(rows: list[dict[str, Any]], target: Path, subject: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["nfe"], r["value"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=method)
    metric = rows[0]["metric"].upper()
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=metric, title=f"{metric} against NFE {subject}".strip())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, target)


def save_figure(fig: Any, target: Path) -> None:
    """A matplotlib figure as a PNG file written whole, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_atomically(target, image.getvalue())

"""Sample quality and class fidelity against the classifier-free guidance scale w, at one or more solvers (NFE
budgets), for one class-conditional checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.evaluation.engine import Evaluator
from fmlab.evaluation.nfe_sweep import save_figure, sweep_evaluator, sweep_row
from fmlab.sampling import VelocityField


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
    if not field.num_classes:
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


def solver_label(row: dict[str, Any]) -> str:
    if row["num_steps"] != "":
        return f"{row['method']} {row['num_steps']} steps"
    return f"{row['method']} {row['tolerance']:g}"


def plot_guidance_sweep(rows: list[dict[str, Any]], target: Path, subject: str = "") -> None:
    """The metric against w (left) and, where measured, the class accuracy against w (right), one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_accuracy = any(r["class_accuracy"] != "" for r in rows)
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(10 if with_accuracy else 5.5, 4), dpi=120)
    axes = list(axes) if with_accuracy else [axes]
    metric = rows[0]["metric"].upper()
    for label in dict.fromkeys(solver_label(r) for r in rows):
        mine = sorted((r for r in rows if solver_label(r) == label), key=lambda r: r["guidance_scale"])
        scales = [r["guidance_scale"] for r in mine]
        axes[0].plot(scales, [r["value"] for r in mine], marker="o", ms=3, label=label)
        if with_accuracy:
            axes[1].plot(scales, [r["class_accuracy"] for r in mine], marker="o", ms=3, label=label)
    axes[0].set(xlabel="guidance scale w", ylabel=metric, title=f"{metric} against guidance {subject}".strip())
    if with_accuracy:
        axes[1].set(xlabel="guidance scale w", ylabel="class accuracy", title="digits classifier agrees with the class")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, target)

"""Numbers rendered from metrics.json files: paper tables (Markdown and CSV rows, mean ± std over seeds, the
published number and the W2 floor beside), a multirun's summary.csv, and the reflow stage table. Nothing here runs
a job (that is `fmlab.launch`) or writes a file other than through `fmlab.io`."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fmlab.io import write_csv
from fmlab.runs import METRICS_FILE, job_overrides, read_metrics

NOT_RUN = "not run"
SUMMARY_FILE = "summary.csv"


def collect_metrics(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every run's metrics.json below `sweep_dir`."""
    return [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).rglob(METRICS_FILE))]


def column_value(record: dict[str, Any], column_key: str | list[str]) -> str:
    """A run's column: one metrics.json field, or several joined by "→" (e.g. source → data)."""
    keys = [column_key] if isinstance(column_key, str) else list(column_key)
    return "→".join(str(record.get(k)) for k in keys)


def aggregate(
    records: Iterable[dict[str, Any]], row_key: str, column_key: str | list[str]
) -> dict[tuple[str, str], list[dict]]:
    """Group runs into table cells by (row value, column value)."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        cells[(str(record.get(row_key)), column_value(record, column_key))].append(record)
    return cells


def mean_std(values: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(v) for v in values):  # a diverged run: NaN, never a mean of the others
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def decimals(metric: str) -> int:
    return 0 if metric.startswith("nfe") or metric.endswith("seconds") else 3


def format_cell(runs: list[dict], metric: str) -> str:
    values = [float(r[metric]) for r in runs if isinstance(r.get(metric), int | float)]
    if not values:
        return NOT_RUN
    diverged = sum(1 for v in values if not math.isfinite(v))
    if diverged:  # a mean over the other runs would hide the diverged ones
        return f"NaN ({diverged} of {len(values)} runs diverged)"
    mean, std = mean_std(values)
    digits = decimals(metric)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if len(values) >= 3 else f"{text} (n={len(values)})"


def floor_of(metric: str) -> str | None:
    """The floor a metric is read against: W2's (`w2_floor`), W2²'s (`w2_floor_squared`, for `w2_squared` and its
    extra solvers' `w2_squared_<name>`), or None."""
    if metric.startswith("w2_squared"):
        return "w2_floor_squared"
    return "w2_floor" if metric == "w2" or (metric.startswith("w2_") and "floor" not in metric) else None


def format_floor(runs: list[dict], key: str = "w2_floor") -> str:
    """A column's floor (`key`): mean ± std over its runs, or one value marked "(fixed sets)" when every run
    measured it on the same held-out sets (a fixed split): a "± 0.000" there would read as a floor with no spread."""
    values = [float(r[key]) for r in runs if isinstance(r.get(key), int | float)]
    if len(values) > 1 and all(math.isfinite(v) for v in values) and len(set(values)) == 1:
        return f"{values[0]:.3f} (fixed sets)"
    return format_cell(runs, key)


def column_metrics(table: DictConfig, column: str) -> list[str]:
    """The metrics a column shows: `column_metrics[column]` where given (FID for images, W2 for points)."""
    return list((table.get("column_metrics") or {}).get(column, table.metrics))


def reference_value(table: DictConfig, row: str, column: str, metric: str) -> str | None:
    """The published number for a cell, as the paper printed it ("–" where it has none); None: no reference."""
    reference = table.get("reference") or {}
    if row not in reference or column not in reference[row] or metric not in reference[row][column]:
        return None
    value = reference[row][column][metric]
    return "–" if value is None else str(value)


def render_markdown(table: DictConfig, cells: dict[tuple[str, str], list[dict]]) -> str:
    columns = list(table.column_order)
    column_labels, row_labels = dict(table.get("column_labels") or {}), dict(table.get("row_labels") or {})
    cell_keys = [(c, m) for c in columns for m in column_metrics(table, c)]
    header = [table.rows] + [f"{column_labels.get(c, c)}: {m}" for c, m in cell_keys]
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.row_order:
        entries = []
        for column, metric in cell_keys:
            entry = format_cell(cells.get((row, column), []), metric)
            reference = reference_value(table, row, column, metric)
            entries.append(entry if reference is None else f"{entry} (paper {reference})")
        lines.append("| " + " | ".join([row_labels.get(row, row), *entries]) + " |")
    floors: list[str] = []
    if any(floor_of(m) for _, m in cell_keys):
        for column, metric in cell_keys:
            runs = [r for (_, col), rs in cells.items() if col == column for r in rs]
            floors.append(format_floor(runs, floor_of(metric)) if floor_of(metric) else "")
        lines.append("| floor (held-out vs held-out) | " + " | ".join(floors) + " |")
    runs = [r for rs in cells.values() for r in rs]
    seconds = sum(float(r.get("train_seconds", 0.0)) for r in runs)
    wall = sum(float(r.get("wall_seconds", 0.0)) for r in runs)
    lines += [
        "",
        f"{len(runs)} runs, {seconds / 60:.1f} minutes of training ({wall / 60:.1f} minutes wall time) in all.",
    ]
    if table.get("reference"):
        lines.append(f"Published numbers in parentheses: {table.reference_source}.")
    cards = [(column, sorted({card_line(r["card"]) for (_, col), rs in cells.items() if col == column for r in rs
                              if isinstance(r.get("card"), dict)})) for column in columns]  # fmt: skip
    if any(found for _, found in cards):
        lines.append("Result cards (what each column's numbers were measured with):")
        lines += [f"- {column_labels.get(c, c)}: {line}" for c, found in cards for line in found]
    if any(f.endswith("(fixed sets)") for f in floors):
        lines.append(
            "A floor marked (fixed sets) is measured on the same held-out sets in every run: it does not vary over"
            " runs (scripts/w2_floors.py measures its spread over draws)."
        )
    return "\n".join(lines) + "\n"


def table_rows(table: DictConfig, cells: dict[tuple[str, str], list[dict]]) -> list[dict[str, Any]]:
    """The table as CSV rows: mean and std of every metric per cell, the paper's number beside."""
    metrics = list(dict.fromkeys([m for c in table.column_order for m in column_metrics(table, c)]))
    metrics += [m for m in table.get("extra_metrics", []) if m not in metrics]
    papers = metrics if table.get("reference") else []
    column_header = table.columns if isinstance(table.columns, str) else "→".join(table.columns)
    rows = []
    for row in table.row_order:
        for column in table.column_order:
            runs = cells.get((row, column), [])
            entry: dict[str, Any] = {table.rows: row, column_header: column, "runs": len(runs)}
            for metric in metrics:
                numbers = [float(r[metric]) for r in runs if isinstance(r.get(metric), int | float)]
                mean, std = mean_std(numbers) if numbers else ("", "")
                entry.update({f"{metric}_mean": mean, f"{metric}_std": std})
            entry.update({f"{m}_paper": reference_value(table, row, column, m) or "" for m in papers})
            rows.append(entry)
    return rows


def sweep_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job dir holding a metrics.json: the job dir, its overrides and every scalar metric."""
    rows = []
    for metrics_file in sorted(Path(sweep_dir).glob(f"*/{METRICS_FILE}")):
        job_dir = metrics_file.parent
        overrides = job_overrides(job_dir)
        metrics = read_metrics(job_dir)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, str | int | float | bool) or v is None}
        rows.append({"job": job_dir.name, "overrides": " ".join(overrides), **scalars})
    return rows


def write_sweep_summary(sweep_dir: str | Path) -> Path | None:
    """Write `<sweep_dir>/summary.csv` (columns: job, overrides, then the union of metric names, sorted)."""
    rows = sweep_rows(sweep_dir)
    if not rows:
        return None
    metric_names = sorted({key for row in rows for key in row} - {"job", "overrides"})
    return write_csv(Path(sweep_dir) / SUMMARY_FILE, rows, ["job", "overrides", *metric_names])


class SweepSummary(Callback):
    """Registered in conf/hydra/default.yaml; writes `<sweep dir>/summary.csv` once when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        target = write_sweep_summary(config.hydra.sweep.dir)
        if target is not None:
            print(f"fmlab: sweep summary: {target}")


# the groups whose settings change a run's numbers: each is in the card as it ran
CARD_SETTINGS = ("method", "path", "schedule", "objective", "time_sampler", "coupling", "conditioning", "optimizer",
                 "scheduler")  # fmt: skip


def _as_ran(value: Any) -> Any:
    """A settings node as plain values, its `_target_` as the class name (`kind`), Hydra's `_partial_` left out."""
    if isinstance(value, dict):
        named = {"kind": str(value["_target_"]).rsplit(".", 1)[-1]} if "_target_" in value else {}
        return named | {k: _as_ran(v) for k, v in value.items() if k not in ("_target_", "_partial_")}
    if isinstance(value, list):
        return [_as_ran(v) for v in value]
    return value


def part_settings(cfg: Any) -> dict[str, Any]:
    """Every setting that changes the numbers of a run (`CARD_SETTINGS`), resolved: path and schedule,
    objective, time sampler, the coupling with all its solver settings, conditioning, optimiser and schedule."""
    from omegaconf import OmegaConf

    config = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    settings = {}
    for group in CARD_SETTINGS:
        node = config.get(group)
        try:
            value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except Exception:  # an interpolation only the run could resolve: the settings as written
            value = OmegaConf.to_container(node, resolve=False)
        settings[group] = _as_ran(value)
    return settings


def training_card(cfg: Any, steps: int, world_size: int | str, ema_decay: float | None) -> dict[str, Any]:
    """The training half of a result card, from a run's config: precision, EMA, devices × per-device batch =
    global batch, steps and samples seen, seeds, versions, and every number-changing setting (`part_settings`)."""
    import lightning
    import torch

    from fmlab import __version__

    trainer = cfg.trainer
    per_device = int(cfg.data.batch_size)
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    global_batch = per_device * world_size * accumulate if isinstance(world_size, int) else None
    performance = cfg.get("performance") or {}
    return {
        "precision": str(trainer.get("precision", "32-true")),
        "matmul_precision": performance.get("matmul_precision", "highest"),
        "compiled": bool(performance.get("compile", False)),
        "ema": {"decay": ema_decay} if ema_decay is not None else "none",
        "nodes": int(trainer.get("num_nodes", 1) or 1),
        "devices": world_size,
        "per_device_batch_size": per_device,
        "accumulate_grad_batches": accumulate,
        "global_batch_size": global_batch,
        "training_steps": steps,
        "samples_seen": steps * global_batch if global_batch is not None else None,
        "seed": cfg.seed,
        "versions": {"fmlab": __version__, "torch": torch.__version__, "lightning": lightning.__version__},
        "settings": part_settings(cfg),
    }


def run_metrics(run: Any, evaluation: dict[str, Any], started: float) -> dict[str, Any]:
    """What a training run's metrics.json records: what was run, the cost of training (train_seconds: the wall
    time of `fit`, over every resumed segment; the threads and loader workers it had), the evaluation and its
    result card. `run` is a `fmlab.build.TrainingRun`; `started` the `time.perf_counter()` the run began at."""
    import time

    import torch

    from fmlab import __version__
    from fmlab.callbacks import EMA
    from fmlab.callbacks.resume import TrainingClock
    from fmlab.module import net_parameters
    from fmlab.runs import config_digest

    cfg, module, datamodule, trainer = run.cfg, run.module, run.datamodule, run.trainer
    metrics: dict[str, Any] = {
        "method": cfg.method.name,
        "data": cfg.data.get("target", cfg.data.get("name")),
        "source": cfg.data.get("source", "gaussian"),
        "seed": cfg.seed,
        "tags": list(cfg.get("tags") or []),
        "steps": trainer.global_step,
        "config_digest": config_digest(cfg),
        "path": repr(module.path),
        "objective": repr(module.objective),
        "coupling": repr(datamodule.coupling),
        "conditioning": (cfg.get("conditioning") or {}).get("name", "none"),
        "net_parameters": net_parameters(module.net),
        "fmlab_version": __version__,
        "torch_version": torch.__version__,
        # train_seconds depends on them: the training process's threads and the loader workers beside it
        "torch_threads": datamodule.training_threads or torch.get_num_threads(),
        "loader_workers": datamodule.loader_workers,
    }
    loss = module.train_loss()
    if loss is not None:
        metrics["train_loss"] = loss
    clock = next((c for c in run.callbacks if isinstance(c, TrainingClock)), None)
    if clock is not None:
        metrics["train_seconds"] = clock.seconds
    metrics.update(evaluation)
    metrics.update(datamodule.generation)  # reflow: the pairs' cost
    metrics["wall_seconds"] = time.perf_counter() - started
    ema = next((c for c in run.callbacks if isinstance(c, EMA)), None)
    card = training_card(cfg, trainer.global_step, trainer.world_size, ema.decay if ema is not None else None)
    card["checkpoint"] = {"scored": evaluation.get("eval_checkpoint", "last"),
                          "step": evaluation.get("eval_checkpoint_step", trainer.global_step)}  # fmt: skip
    card["evaluated_weights"] = "EMA" if ema is not None else "trained"
    metrics["card"] = {**card, **evaluation.get("card", {})}
    return metrics


def card_line(card: dict[str, Any]) -> str:
    """A result card in one line, for tables and the end of a run."""
    solver = card.get("solver", {})
    settings = ", ".join(f"{k} {v}" for k, v in solver.items() if k != "method")
    parts = [f"{solver.get('method', '?')} ({settings})" if solver else None]
    if "global_batch_size" in card:
        nodes, devices = card.get("nodes", 1), card["devices"]
        layout = f"{nodes} nodes × {devices // nodes}" if nodes > 1 and isinstance(devices, int) else f"{devices}"
        parts.append(f"{layout}×{card['per_device_batch_size']} = {card['global_batch_size']} batch, "
                     f"{card['training_steps']} steps")  # fmt: skip
    if "ema" in card:
        ema = card["ema"]
        parts.append(f"EMA {ema['decay']}" if isinstance(ema, dict) else "no EMA")
    if "checkpoint" in card:
        parts.append(f"{card['checkpoint']['scored']} checkpoint (step {card['checkpoint']['step']})")
    if "precision" in card:
        parts.append(f"{card['precision']}, matmul {card['matmul_precision']}")
    reference = card.get("reference", {})
    if reference:
        extractor = f", {reference['feature_extractor']} {reference.get('extractor_sha256', '')}" if (
            "feature_extractor" in reference) else ""  # fmt: skip
        parts.append(f"{reference['metric'].split(' ')[0]} vs {reference.get('size')} reference{extractor}")
    return "; ".join(p for p in parts if p)


def summary_lines(metrics: dict[str, Any], run_dir: Path, kind: str = "train") -> list[str]:
    """The end of a run in a glance: the headline metrics (W2 ± std and its floor, or FID/BPD), NFE, NLL, the
    time, the diverged flag, and where the run and its picture are."""

    def number(key: str, digits: int = 3) -> str | None:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, int | float) else None

    headline = []
    for key, label in (("w2", "W2"), ("fid", "FID")):
        if number(key) is not None:
            spread = f" ± {number(key + '_std')}" if number(key + "_std") is not None else ""
            floor = f" (floor {number('w2_floor')})" if key == "w2" and number("w2_floor") is not None else ""
            headline.append(f"{label} {number(key)}{spread}{floor}")
    for key, label, digits in (("bpd", "BPD", 3), ("nll", "NLL", 3), ("nfe", "NFE", 1), ("mmd", "MMD²", 4),
                               ("class_accuracy", "class accuracy", 3)):  # fmt: skip
        if number(key, digits) is not None:
            headline.append(f"{label} {number(key, digits)}")
    timing = [f"{label} {number(key, 1)} s" for key, label in (("train_seconds", "training"),
              ("eval_seconds", "evaluation"), ("wall_seconds", "wall")) if number(key, 1) is not None]  # fmt: skip
    lines = [f"fmlab: {kind} result: " + (", ".join(headline) or "no evaluation")]
    steps = f"{metrics['steps']} steps, " if "steps" in metrics else ""
    lines.append(f"fmlab: {steps}{', '.join(timing)}; diverged: {'yes' if metrics.get('diverged') else 'no'}")
    if metrics.get("card"):
        lines.append(f"fmlab: card: {card_line(metrics['card'])}")
    lines.append(f"fmlab: run dir: {run_dir}")
    picture = next((p for p in (run_dir / "samples.png", run_dir / "nfe_sweep.png", run_dir / "guidance_sweep.png")
                    if p.is_file()), None)  # fmt: skip
    if picture is not None:
        lines.append(f"fmlab: samples: {picture}")
    return lines


# the one-step table (scripts/one_step_table.py): its stages in order with the sampler of their few-step columns
# (reflow's stages take Euler steps, MeanFlow jumps along its average velocity), and the step counts it reports
ONE_STEP_STAGES = {
    "teacher": "euler",
    "2-rectified": "euler",
    "2-rectified + distilled (k = 1)": "euler",
    "MeanFlow": "mean_flow",
    "MeanFlow, p = 1": "mean_flow",
}
FEW_STEPS = (1, 2, 4)
# the stages a stage's training starts from: their steps and seconds are part of what it cost
STAGE_CHAIN = {"2-rectified": ("teacher",), "2-rectified + distilled (k = 1)": ("teacher", "2-rectified")}
ONE_STEP_FIDELITY = ("kid", "precision", "recall")  # at one step, where the task measures them (digits)


def one_step_row(task: str, stage: str, seed: int, metric: str, metrics: dict[str, Any],
                 few_step: dict[int, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """One stage of one seed: `metric` after 1, 2 and 4 steps of the stage's sampler (`few_step`: the metrics.json of
    `fmlab.evaluate` runs), under the run's own dopri5 evaluation (`metrics`), straightness, and the stage's own
    training steps and seconds (its pair generation included); KID and precision/recall at one step where measured."""
    row: dict[str, Any] = {"task": task, "stage": stage, "seed": seed, "sampler": ONE_STEP_STAGES[stage]}
    row.update({f"{metric}_steps{k}": few_step[k][metric] for k in FEW_STEPS})
    row.update({f"{name}_steps1": few_step[1][name] for name in ONE_STEP_FIDELITY if name in few_step[1]})
    row[f"{metric}_dopri5"] = metrics[metric]
    row["nfe_dopri5"] = metrics["nfe"]
    row["straightness"] = metrics.get("straightness", math.nan)
    row["train_steps"] = metrics["steps"]
    row["train_seconds"] = metrics["train_seconds"] + metrics.get("pair_generation_seconds", 0.0)
    return row


def with_chain_costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with `chain_steps` and `chain_seconds`: its own training plus that of the stages it starts from
    (`STAGE_CHAIN`, same task and seed): what one-step generation cost from scratch."""
    own = {(r["task"], r["stage"], str(r["seed"])): r for r in rows}
    out = []
    for row in rows:
        chain = [own.get((row["task"], stage, str(row["seed"]))) for stage in STAGE_CHAIN.get(row["stage"], ())]
        total = [row, *chain]
        missing = any(r is None for r in chain)
        steps = math.nan if missing else sum(float(r["train_steps"]) for r in total)
        seconds = math.nan if missing else sum(float(r["train_seconds"]) for r in total)
        out.append({**row, "chain_steps": steps, "chain_seconds": seconds})
    return out


def one_step_markdown(task: str, metric: str, rows: list[dict[str, Any]]) -> str:
    """The one-step table of one task: mean ± std over seeds of every stage's columns, stages without rows left out."""
    name = metric.upper()
    rows = with_chain_costs(rows)
    fidelity = [n for n in ONE_STEP_FIDELITY if any(r.get(f"{n}_steps1") not in (None, "") for r in rows)]
    columns = [f"{metric}_steps{k}" for k in FEW_STEPS] + [f"{metric}_dopri5", "nfe_dopri5", "straightness"]
    columns += [f"{n}_steps1" for n in fidelity] + ["chain_steps", "chain_seconds"]
    header = [f"{name}, {k} step{'s' if k > 1 else ''}" for k in FEW_STEPS]
    header += [f"{name}, dopri5", "NFE dopri5", "straightness"] + [f"{n}, 1 step" for n in fidelity]
    header += ["training steps (chain)", "training s (chain, pairs incl.)"]
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [f"**{task}** (seeds {', '.join(map(str, seeds))}; mean ± std)", "",
             "| stage | steps taken by | " + " | ".join(header) + " |", "|---" * (len(header) + 2) + "|"]  # fmt: skip
    for stage, sampler in ONE_STEP_STAGES.items():
        mine = [r for r in rows if r["stage"] == stage]
        if not mine:
            continue
        cells = []
        for column in columns:
            values = [float(r[column]) for r in mine if r.get(column) not in (None, "")]
            if not values:
                cells.append("not run")
                continue
            mean, std = mean_std(values)
            digits = 0 if column in ("chain_seconds", "chain_steps", "nfe_dopri5") else 3
            if column == "chain_steps" and std == 0:
                cells.append(f"{mean:,.0f}")
                continue
            partial = f" (n={len(values)})" if len(values) < len(mine) else ""
            cells.append(f"{mean:,.{digits}f} ± {std:,.{digits}f}{partial}")
        taken = "Euler" if sampler == "euler" else "jumps ū"
        seeds_run = f"{len(mine)} seed{'s' if len(mine) > 1 else ''}"
        lines.append(f"| {stage} ({seeds_run}) | {taken} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

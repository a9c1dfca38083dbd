"""Tables entry point: `python -m fmlab.table table=NAME [sweep_dir=DIR] [run=false]`.

Runs the Hydra multiruns a table names (skipping those already in `sweep_dir`), reads every metrics.json below
`sweep_dir`, and renders mean ± std over seeds as Markdown (stdout and `<sweep_dir>/<name>.md`) and CSV. A cell
with no runs shows as "not run", never as a number.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from fmlab.utils.cli import CONFIG_DIR, check_group_choices, run_entry_point
from fmlab.utils.errors import UserError, exit_on_user_error
from fmlab.utils.run_files import METRICS_FILE

NOT_RUN = "not run"


def collect_metrics(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every run's metrics.json below `sweep_dir`."""
    return [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).rglob(METRICS_FILE))]


def aggregate(records: Iterable[dict[str, Any]], row_key: str, column_key: str) -> dict[tuple[str, str], list[dict]]:
    """Group runs into table cells by (row value, column value)."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        cells[(str(record.get(row_key)), str(record.get(column_key)))].append(record)
    return cells


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_cell(runs: list[dict], metric: str) -> str:
    values = [float(r[metric]) for r in runs if isinstance(r.get(metric), int | float)]
    if not values:
        return NOT_RUN
    mean, std = mean_std(values)
    digits = 0 if metric.startswith("nfe") or metric.endswith("seconds") else 3
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if len(values) >= 3 else f"{text} (n={len(values)})"


def render_markdown(table: DictConfig, cells: dict[tuple[str, str], list[dict]]) -> str:
    columns, metrics = list(table.column_order), list(table.metrics)
    labels = dict(table.get("column_labels") or {})
    header = [table.rows] + [f"{labels.get(c, c)}: {m}" for c in columns for m in metrics]
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.row_order:
        entries = [format_cell(cells.get((row, c), []), m) for c in columns for m in metrics]
        lines.append("| " + " | ".join([row, *entries]) + " |")
    if "w2" in metrics:
        floors = []
        for c in columns:
            runs = [r for (_, col), rs in cells.items() if col == c for r in rs]
            floors += [format_cell(runs, "w2_floor") if m == "w2" else "" for m in metrics]
        lines.append("| floor (held-out vs held-out) | " + " | ".join(floors) + " |")
    runs = [r for rs in cells.values() for r in rs]
    seconds = sum(float(r.get("train_seconds", 0.0)) for r in runs)
    lines += ["", f"{len(runs)} runs, {seconds / 60:.1f} minutes of training in all."]
    return "\n".join(lines) + "\n"


def write_csv(target: Path, table: DictConfig, cells: dict[tuple[str, str], list[dict]]) -> None:
    metrics = [*table.metrics, *table.get("extra_metrics", [])]
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([table.rows, table.columns, "runs", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")]])
        for row in table.row_order:
            for column in table.column_order:
                runs = cells.get((row, column), [])
                values = []
                for metric in metrics:
                    numbers = [float(r[metric]) for r in runs if isinstance(r.get(metric), int | float)]
                    values += list(mean_std(numbers)) if numbers else ["", ""]
                writer.writerow([row, column, len(runs), *values])


def expected_jobs(args: list[str]) -> int:
    """How many jobs a multirun over `args` launches: the product of the sweep lists' lengths."""
    count = 1
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            count *= len(list(override.sweep_iterator()))
    return count


def run_sweeps(table: DictConfig, sweep_dir: Path) -> None:
    """One `fmlab.train -m` per named sweep, each into `<sweep_dir>/<sweep name>`; complete ones are skipped,
    an incomplete one (a crash, a kill) runs again whole."""
    for name, overrides in table.sweeps.items():
        target = sweep_dir / name
        args = [*table.common, *overrides]
        done, expected = len(list(target.rglob(METRICS_FILE))) if target.is_dir() else 0, expected_jobs(args)
        if done >= expected:
            print(f"fmlab.table: {target} has all {expected} runs; not running it again", flush=True)
            continue
        if done:
            print(f"fmlab.table: {target} has {done} of {expected} runs; running the sweep again", flush=True)
        args.append(f"hydra.sweep.dir={target}")
        check_group_choices(args)
        print(f"fmlab.table: python -m fmlab.train -m {' '.join(args)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "fmlab.train", "-m", *args])
        if result.returncode != 0:
            raise UserError(f"sweep {name} failed (exit {result.returncode}); its runs so far stay in {target}")


@exit_on_user_error
def make_table(cfg: DictConfig) -> str:
    sweep_dir = Path(cfg.sweep_dir)
    if cfg.run:
        run_sweeps(cfg.table, sweep_dir)
    records = collect_metrics(sweep_dir)
    if not records:
        raise UserError(
            f"sweep_dir={sweep_dir} holds no {METRICS_FILE}; run the table first (run=true) or give a sweep"
        )
    cells = aggregate(records, cfg.table.rows, cfg.table.columns)
    markdown = render_markdown(cfg.table, cells)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / f"{cfg.table.name}.md").write_text(markdown)
    write_csv(sweep_dir / f"{cfg.table.name}.csv", cfg.table, cells)
    print(markdown, flush=True)
    return markdown


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="table")
def hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    make_table(cfg)


def main() -> None:
    run_entry_point(hydra_main)


if __name__ == "__main__":
    main()

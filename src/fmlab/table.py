"""Tables entry point: `python -m fmlab.table table=NAME [sweep_dir=DIR] [run=false] [workers=N]`.

Runs the Hydra multiruns a table names (only the jobs whose runs are not already in `sweep_dir`; with
`workers=N`, N jobs at once, the CPU threads split between them), reads every metrics.json below `sweep_dir`, and
renders mean ± std over seeds as Markdown (stdout and `<sweep_dir>/<name>.md`) and CSV. A cell
with no runs shows as "not run", never as a number.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import queue
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from fmlab.errors import UserError, exit_on_user_error
from fmlab.runs import METRICS_FILE, write_atomically
from fmlab.utils.cli import CONFIG_DIR, CONFIG_PATH, check_composes, run_entry_point
from fmlab.utils.cpus import own_cpus
from fmlab.utils.sweep_summary import job_overrides

NOT_RUN = "not run"


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


def format_floor(runs: list[dict]) -> str:
    """The W2 floor of a column: mean ± std over its runs, or one value marked "(fixed sets)" when every run
    measured it on the same held-out sets (a fixed split): a "± 0.000" there would read as a floor with no spread."""
    values = [float(r["w2_floor"]) for r in runs if isinstance(r.get("w2_floor"), int | float)]
    if len(values) > 1 and all(math.isfinite(v) for v in values) and len(set(values)) == 1:
        return f"{values[0]:.3f} (fixed sets)"
    return format_cell(runs, "w2_floor")


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
    if any(m == "w2" for _, m in cell_keys):
        for column, metric in cell_keys:
            runs = [r for (_, col), rs in cells.items() if col == column for r in rs]
            floors.append(format_floor(runs) if metric == "w2" else "")
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
    if any(f.endswith("(fixed sets)") for f in floors):
        lines.append(
            "A floor marked (fixed sets) is measured on the same held-out sets in every run: it does not vary over"
            " runs (scripts/w2_floors.py measures its spread over draws)."
        )
    return "\n".join(lines) + "\n"


def write_csv(target: Path, table: DictConfig, cells: dict[tuple[str, str], list[dict]]) -> None:
    """The table as CSV (mean and std of every metric per cell, the paper's number beside), written whole or not at
    all: a failure part-way keeps the previous file."""
    metrics = list(dict.fromkeys([m for c in table.column_order for m in column_metrics(table, c)]))
    metrics += [m for m in table.get("extra_metrics", []) if m not in metrics]
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    papers = metrics if table.get("reference") else []
    header = [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + [f"{m}_paper" for m in papers]
    column_header = table.columns if isinstance(table.columns, str) else "→".join(table.columns)
    writer.writerow([table.rows, column_header, "runs", *header])
    for row in table.row_order:
        for column in table.column_order:
            runs = cells.get((row, column), [])
            values: list[Any] = []
            for metric in metrics:
                numbers = [float(r[metric]) for r in runs if isinstance(r.get(metric), int | float)]
                values += list(mean_std(numbers)) if numbers else ["", ""]
            references = [reference_value(table, row, column, m) or "" for m in papers]
            writer.writerow([row, column, len(runs), *values, *references])
    write_atomically(target, handle.getvalue().encode())


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The override list of every job a multirun over `args` launches (the product of its sweep lists)."""
    jobs: list[list[str]] = [[]]
    for override in OverridesParser.create().parse_overrides(args):
        key = override.get_key_element()
        values = (
            [override.get_value_element_as_str()]
            if not override.is_sweep_override()
            else [str(v) for v in override.sweep_string_iterator()]
        )
        jobs = [[*job, f"{key}={value}"] for job in jobs for value in values]
    return jobs


def finished_jobs(target: Path) -> set[frozenset[str]]:
    """The override sets of the runs below `target` that wrote metrics.json (a job resumed with `ckpt_path=` is the
    same job)."""
    runs = target.rglob(METRICS_FILE) if target.is_dir() else []
    return {
        frozenset(o for o in job_overrides(metrics_file.parent) if not o.startswith("ckpt_path="))
        for metrics_file in runs
    }


def stopped_jobs(target: Path) -> dict[frozenset[str], list[str]]:
    """`ckpt_path=<last checkpoint>` for each job below `target` that was stopped after saving a checkpoint and
    before its metrics.json (keyed by its overrides): it resumes, never restarts over its own checkpoints."""
    checkpoints = target.glob("*/checkpoints/last.ckpt") if target.is_dir() else []
    return {
        frozenset(o for o in job_overrides(c.parent.parent) if not o.startswith("ckpt_path=")): [
            f"ckpt_path={c.resolve()}"
        ]
        for c in checkpoints
        if not (c.parent.parent / METRICS_FILE).exists()
    }


def job_subdir_pattern() -> str:
    """conf/hydra/default.yaml's sweep.subdir: the run dir name Hydra gives a multirun's job `${hydra.job.num}`."""
    return yaml.safe_load((CONFIG_DIR / "hydra" / "default.yaml").read_text())["sweep"]["subdir"]


@dataclass(frozen=True)
class Launch:
    """One `python -m fmlab.train -m ARGS`: a whole sweep, or one job of it (`label` names it in logs)."""

    label: str
    args: list[str]


def pending_launches(table: DictConfig, sweep_dir: Path, whole_sweeps: bool = True) -> list[Launch]:
    """The launches that fill in `table`'s runs missing from `<sweep_dir>/<sweep name>`. A sweep with no finished
    run is one multirun when `whole_sweeps`; otherwise, and for a partly finished sweep (a kill, a crash, fewer
    seeds before), each missing job is its own launch, into the run dir the whole multirun would have given it."""
    per_sweep: list[list[Launch]] = []
    subdir = job_subdir_pattern()
    for name, overrides in table.sweeps.items():
        launches: list[Launch] = []
        per_sweep.append(launches)
        target = sweep_dir / name
        args = [*table.common, *overrides]
        check_composes("train", args)
        jobs, done = sweep_jobs(args), finished_jobs(target)
        missing = [(index, job) for index, job in enumerate(jobs) if frozenset(job) not in done]
        if not missing:
            print(f"fmlab.table: {target} has all {len(jobs)} runs; not running it again", flush=True)
            continue
        if len(missing) == len(jobs) and whole_sweeps:
            launches.append(Launch(name, [*args, f"hydra.sweep.dir={target}"]))
            continue
        if len(missing) < len(jobs):
            print(
                f"fmlab.table: {target} has {len(jobs) - len(missing)} of {len(jobs)} runs; running the other "
                f"{len(missing)}",
                flush=True,
            )
        stopped = stopped_jobs(target)
        launches += [
            Launch(
                f"{name}_{index}",
                [
                    *job,
                    *stopped.get(frozenset(job), []),
                    f"hydra.sweep.dir={target}",
                    f"hydra.sweep.subdir='{subdir.replace('${hydra.job.num}', str(index))}'",
                ],
            )
            for index, job in missing
        ]
    return interleaved(per_sweep)


def interleaved(per_sweep: list[list[Launch]]) -> list[Launch]:
    """The sweeps' launches taken in turn, one from each: a table stopped part-way (a kill, the end of a session)
    has its cells filled to about the same number of seeds, not some cells finished and others not started."""
    order: list[Launch] = []
    for position in range(max((len(launches) for launches in per_sweep), default=0)):
        order += [launches[position] for launches in per_sweep if position < len(launches)]
    return order


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """CPU threads each of `workers` concurrent runs gets: small nets run faster as several one-thread
    processes than as one process with many threads."""
    return max(1, (cpus or len(own_cpus())) // workers)


def cpu_slices(workers: int, cpus: list[int] | None = None) -> list[list[int]]:
    """The CPUs each of `workers` concurrent runs is pinned to: disjoint slices of `threads_per_worker` CPUs of this
    process's set (where runs outnumber CPUs, they share them in turn). A run then sees its share as its own
    CPUs, so `data.num_workers=auto` starts loader workers only on CPUs no other run of the table uses."""
    cpus = own_cpus() if cpus is None else cpus
    size = threads_per_worker(workers, len(cpus))
    return [[cpus[(slot * size + k) % len(cpus)] for k in range(size)] for slot in range(workers)]


def run_pinned(command: list[str], cpus: list[int], **popen_kwargs: Any) -> int:
    """Run `command` on `cpus` to its end and return its exit code. The affinity is set as the child starts, before
    its imports start any thread (threads inherit it). If the wait raises in this thread, the child gets SIGTERM
    (a training run checkpoints and exits) and is waited for, never left running."""
    process = subprocess.Popen(command, **popen_kwargs)
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(ProcessLookupError):  # it already ended
            os.sched_setaffinity(process.pid, cpus)
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        process.wait()
        raise


def run_sweeps(table: DictConfig, sweep_dir: Path, workers: int = 1) -> None:
    """Run every pending launch. One worker: whole sweeps, in order, output on this terminal. More: every job on
    its own, `workers` at a time from one queue (a long sweep doesn't leave a worker idle), each with
    `threads_per_worker` CPU threads on its own slice of CPUs (`cpu_slices`) and its output in
    `<sweep_dir>/logs/<sweep>_<job>.log`."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise UserError(f"workers={workers} is not valid; choose a whole number of concurrent runs, 1 or more")
    launches = pending_launches(table, sweep_dir, whole_sweeps=workers == 1)
    threads = threads_per_worker(workers)
    env = os.environ if workers == 1 else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    free_slices: queue.Queue[list[int]] = queue.Queue()
    for cpus in cpu_slices(workers):
        free_slices.put(cpus)

    def say(line: str) -> None:
        sys.stdout.write(f"fmlab.table: {line}\n")  # one write per line: concurrent runs don't splice lines
        sys.stdout.flush()

    def run_one(launch: Launch) -> int:
        command = [sys.executable, "-m", "fmlab.train", "-m", *launch.args]
        say(f"python -m fmlab.train -m {' '.join(launch.args)}")
        if workers == 1:
            return subprocess.run(command, env=env).returncode
        log = sweep_dir / "logs" / f"{launch.label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cpus = free_slices.get()  # one per pool thread: a slice is never used by two runs at once
        try:
            with log.open("w") as stream:
                code = run_pinned(command, cpus, env=env, stdout=stream, stderr=subprocess.STDOUT)
        finally:
            free_slices.put(cpus)
        say(f"{launch.label} ended with exit {code} ({threads} threads on CPUs {cpus}; output in {log})")
        return code

    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = list(pool.map(run_one, launches))
    failed = [f"{launch.label} (exit {code})" for launch, code in zip(launches, codes, strict=True) if code != 0]
    if failed:
        raise UserError(f"runs failed: {', '.join(failed)}; the finished ones stay in {sweep_dir}")


def make_table(cfg: DictConfig) -> str:
    sweep_dir = Path(cfg.sweep_dir)
    if cfg.run:
        run_sweeps(cfg.table, sweep_dir, cfg.workers)
    records = collect_metrics(sweep_dir)
    if not records:
        raise UserError(
            f"sweep_dir={sweep_dir} holds no {METRICS_FILE}; run the table first (run=true) or give a sweep"
        )
    cells = aggregate(records, cfg.table.rows, cfg.table.columns)
    markdown = render_markdown(cfg.table, cells)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(sweep_dir / f"{cfg.table.name}.md", markdown.encode())
    write_csv(sweep_dir / f"{cfg.table.name}.csv", cfg.table, cells)
    print(markdown, flush=True)
    return markdown


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="table")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    make_table(cfg)


def main() -> None:
    run_entry_point(hydra_main, "table")


if __name__ == "__main__":
    main()

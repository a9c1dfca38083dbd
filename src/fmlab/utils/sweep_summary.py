"""A Hydra callback that writes `summary.csv` in a multirun's sweep dir: one row per job, from its metrics.json."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fmlab.runs import METRICS_FILE, read_metrics, write_atomically

SUMMARY_FILE = "summary.csv"


def job_overrides(job_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run in `job_dir` (`.hydra/overrides.yaml`)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []


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
    target = Path(sweep_dir) / SUMMARY_FILE
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=["job", "overrides", *metric_names])
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(target, handle.getvalue().encode())  # a reader never sees half a summary
    return target


class SweepSummary(Callback):
    """Registered in conf/hydra/default.yaml; runs once when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        target = write_sweep_summary(config.hydra.sweep.dir)
        if target is not None:
            print(f"fmlab: sweep summary: {target}")

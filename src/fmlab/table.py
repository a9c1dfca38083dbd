"""Tables entry point: `python -m fmlab.table table=NAME [sweep_dir=DIR] [run=false] [workers=N]`.

Runs the Hydra multiruns a table names (only the jobs whose runs are not already in `sweep_dir`, resuming stopped
ones; with `workers=N`, N jobs at once on their own CPUs: `fmlab.launch`), reads every metrics.json below
`sweep_dir`, and renders mean ± std over seeds as Markdown (stdout and `<sweep_dir>/<name>.md`) and CSV
(`fmlab.results`). A cell with no runs shows as "not run", never as a number.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fmlab.cli import CONFIG_PATH, check_writable, run_entry_point
from fmlab.errors import UserError, exit_on_user_error
from fmlab.io import write_csv, write_text
from fmlab.launch import run_sweeps
from fmlab.results import aggregate, collect_metrics, render_markdown, table_rows
from fmlab.runs import METRICS_FILE


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
    write_text(sweep_dir / f"{cfg.table.name}.md", markdown)
    write_csv(sweep_dir / f"{cfg.table.name}.csv", table_rows(cfg.table, cells))
    print(markdown, flush=True)
    return markdown


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="table")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    make_table(cfg)


def preflight(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra creates the sweep dir: one line when it cannot be written."""
    check_writable(Path(str(cfg.sweep_dir)), "sweep_dir")


def main() -> None:
    run_entry_point(hydra_main, "table", preflight)


if __name__ == "__main__":
    main()

"""Tables: mean ± std over seeds from metrics.json files, partial cells marked, missing cells never invented."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir

from fmlab.table import aggregate, collect_metrics, render_markdown
from fmlab.utils.cli import CONFIG_DIR
from tests.conftest import run_cli


def write_run(root: Path, name: str, **metrics: object) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def fixture_sweep(root: Path) -> None:
    for seed, (w2, nfe) in enumerate([(0.20, 68), (0.22, 74), (0.18, 62)]):
        write_run(root, f"a/{seed}", method="fm_ot", source="gaussian", seed=seed, w2=w2, nfe=nfe, w2_floor=0.075)
    for seed, w2 in enumerate([0.30, 0.34]):
        write_run(root, f"b/{seed}", method="ddpm", source="gaussian", seed=seed, w2=w2, nfe=150, w2_floor=0.077)


def table_config():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("table", overrides=["table=methods2d"]).table


def test_cells_are_mean_and_std_over_seeds_and_missing_cells_say_not_run(tmp_path: Path) -> None:
    fixture_sweep(tmp_path)
    cells = aggregate(collect_metrics(tmp_path), "method", "source")
    markdown = render_markdown(table_config(), cells)
    fm_ot_row = next(line for line in markdown.splitlines() if line.startswith("| fm_ot |"))
    w2_cell = f"{statistics.fmean([0.20, 0.22, 0.18]):.3f} ± {statistics.stdev([0.20, 0.22, 0.18]):.3f}"
    assert fm_ot_row.split(" | ")[1] == w2_cell == "0.200 ± 0.020"
    assert fm_ot_row.split(" | ")[2] == "68 ± 6"
    assert "| not run | not run |" in fm_ot_row  # no 8gaussians runs
    ddpm_row = next(line for line in markdown.splitlines() if line.startswith("| ddpm |"))
    assert "0.320 ± 0.028 (n=2)" in ddpm_row
    otcfm_row = next(line for line in markdown.splitlines() if line.startswith("| otcfm |"))
    assert otcfm_row.count("not run") == 4
    assert "| floor (held-out vs held-out) | 0.076 ± 0.001 |  | not run |" in markdown  # all five runs of the column


def test_table_cli_reads_a_finished_sweep_and_writes_markdown_and_csv(tmp_path: Path) -> None:
    fixture_sweep(tmp_path / "sweep")
    result = run_cli("fmlab.table", "table=methods2d", f"sweep_dir={tmp_path / 'sweep'}", "run=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| fm_ot | 0.200 ± 0.020 | 68 ± 6 |" in result.stdout
    rows = list(csv.DictReader((tmp_path / "sweep" / "methods2d.csv").open()))
    fm_ot = next(r for r in rows if r["method"] == "fm_ot" and r["source"] == "gaussian")
    assert float(fm_ot["w2_mean"]) == statistics.fmean([0.20, 0.22, 0.18]) and fm_ot["runs"] == "3"
    assert (tmp_path / "sweep" / "methods2d.md").read_text().strip() in result.stdout


def test_table_cli_without_a_sweep_says_what_to_do(tmp_path: Path) -> None:
    result = run_cli("fmlab.table", f"sweep_dir={tmp_path / 'missing'}", "run=false", cwd=tmp_path)
    assert result.returncode == 2 and "holds no metrics.json; run the table first" in result.stderr

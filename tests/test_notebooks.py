"""The notebooks run top to bottom on tiny settings, and git holds them without outputs."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    saved = dict(os.environ)
    # the kernel inherits this process's environment; the suite's Agg backend would hide the notebooks' figures
    os.environ.update({**env, "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    try:
        NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return notebook


def outputs_of(notebook: nbformat.NotebookNode, kind: str) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if kind in o.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "results.ipynb"])
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_quickstart_trains_samples_and_draws_the_field(tmp_path: Path) -> None:
    tiny = "data.num_eval_samples=300 eval.nll_samples=20 callbacks.sample_logger=null"
    env = {"FMLAB_QUICKSTART_STEPS": "300", "FMLAB_QUICKSTART_DIR": str(tmp_path), "FMLAB_QUICKSTART_OVERRIDES": tiny}
    notebook = execute("quickstart.ipynb", env)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 300
    shown = " ".join(o["data"]["text/plain"] for o in outputs_of(notebook, "text/plain"))
    assert f"'w2': {round(metrics['w2'], 4)}" in shown  # the metrics cell shows what the run wrote
    streams = " ".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "step 300: 1000 samples with" in streams
    assert len(outputs_of(notebook, "image/png")) == 2  # samples with trajectories, the velocity field


def test_results_reads_a_sweep_into_a_dataframe_and_plots_it(tmp_path: Path) -> None:
    for seed, (w2, nfe) in enumerate([(0.20, 68), (0.22, 74), (0.18, 62)]):
        run = tmp_path / f"fm_ot_{seed}"
        run.mkdir()
        record = {"method": "fm_ot", "data": "moons", "source": "gaussian", "seed": seed, "w2": w2, "nfe": nfe}
        (run / "metrics.json").write_text(json.dumps(record))
    notebook = execute("results.ipynb", {"FMLAB_RESULTS_SWEEP": str(tmp_path)})
    tables = [o["data"]["text/plain"] for o in outputs_of(notebook, "text/html")]
    assert "0.18" in tables[0] and "0.22" in tables[0]  # every run, one row each
    row = next(line.split() for line in tables[1].splitlines() if line.startswith("fm_ot"))
    w2, nfe = [0.20, 0.22, 0.18], [68, 74, 62]
    expected = [statistics.fmean(w2), statistics.stdev(w2), 3, statistics.fmean(nfe), statistics.stdev(nfe), 3]
    assert row[1] == "gaussian" and [float(v) for v in row[2:]] == pytest.approx(expected)
    assert len(outputs_of(notebook, "image/png")) == 2

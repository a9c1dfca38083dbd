"""The package as users install and run it: the import graph (entry points apart, the math core and the evaluation
engine free of Lightning), a wheel that finds its configs outside the checkout, user config dirs on Hydra's search
path, a resumable Optuna study on SQLite, and a default run that prints each line once."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, cli_error, run_cli

PACKAGE = REPO_ROOT / "src" / "fmlab"
ENTRY_POINTS = {"fmlab.train", "fmlab.evaluate", "fmlab.table"}
LIGHTNING_FREE = [
    "fmlab.paths",
    "fmlab.nets",
    "fmlab.evaluation",
    "fmlab.objectives",
    "fmlab.samplers",
    "fmlab.couplings",
    "fmlab.io",
    "fmlab.likelihood",
    "fmlab.runs",
    "fmlab.errors",
    "fmlab.seeding",
    "fmlab.distributed",
    "fmlab.optim",
    *(
        f"fmlab.{p.parent.name}.{p.stem}"
        for d in ("paths", "nets", "evaluation", "metrics", "samplers")
        for p in (PACKAGE / d).glob("*.py")
    ),
]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_entry_point_imports_another() -> None:
    for entry in ENTRY_POINTS:
        path = PACKAGE / f"{entry.split('.')[1]}.py"
        assert not (imported_modules(path) & (ENTRY_POINTS - {entry})), entry
    users = {
        str(p.relative_to(PACKAGE)): imported_modules(p) & ENTRY_POINTS
        for p in PACKAGE.rglob("*.py")
        if f"fmlab.{p.stem}" not in ENTRY_POINTS
    }
    assert {name: found for name, found in users.items() if found} == {}  # library code never imports them either


def test_the_math_core_and_the_evaluation_engine_import_no_lightning() -> None:
    # a fresh interpreter: what importing these modules loads, transitively
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {LIGHTNING_FREE!r}]; print(sorted(sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'fmlab.evaluation.engine'" in loaded and "'fmlab.samplers'" in loaded
    assert not re.search(r"'(lightning|pytorch_lightning)[.']", loaded)


def test_a_wheel_installed_outside_the_checkout_trains_with_its_own_configs(tmp_path: Path) -> None:
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    source = tmp_path / "source"  # a copy of what the wheel is built from: the build leaves the checkout untouched
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("src", "conf"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source],
                           check=True, capture_output=True, text=True)  # fmt: skip
    assert "Warning" not in built.stdout + built.stderr  # conf/ ships as listed packages: no warning per group
    (wheel,) = wheels.glob("fmlab-*.whl")
    # the wheel alone on the path (its dependencies come from this environment), run from a dir with no conf/
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}
    where = subprocess.run(
        [sys.executable, "-c", "import fmlab.cli as c; print(c.__file__, c.CONFIG_DIR)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert where == [str(site / "fmlab" / "cli.py"), str(site / "fmlab" / "conf")]
    result = subprocess.run(
        [site / "bin" / "fmlab-train", "trainer.max_steps=50", "logger=csv", "data.num_eval_samples=200",
         "eval.num_draws=1", "eval.nll_samples=0"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (elsewhere / "outputs" / "train" / "runs").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["steps"] == 50


def test_a_config_dir_on_the_search_path_adds_a_data_option_that_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    user_conf = tmp_path / "my_conf" / "data"
    user_conf.mkdir(parents=True)
    (user_conf / "my_checkerboard.yaml").write_text(
        (REPO_ROOT / "conf" / "data" / "moons.yaml").read_text().replace("target: moons", "target: checkerboard")
    )
    result = run_cli(
        "fmlab.train", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "data=my_checkerboard",
        "trainer.max_steps=50", "logger=none", "data.num_eval_samples=200", "eval.num_draws=1", "eval.nll_samples=0",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"] == "checkerboard"
    # nested options resolve as Hydra resolves them; a missing one is still one line with the choices
    nested = ["experiment=recipes/digits", "trainer.max_steps=0", f"hydra.run.dir={tmp_path / 'nested'}"]
    status, _, err = cli_error("train", nested, capsys)
    assert status == 2 and err.strip() == "fmlab: error: trainer.max_steps=0 is invalid; it must be a positive integer"
    missing = run_cli("fmlab.train", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "data=nope", cwd=tmp_path)
    line = missing.stderr.strip()
    assert missing.returncode == 2 and line.startswith("fmlab: error: data=nope is not a valid choice; choose one of:")
    assert "my_checkerboard" in line and "moons" in line


@pytest.mark.slow  # keeps `make test` inside its 10 minutes; `make test-all` runs it
def test_an_optuna_study_on_sqlite_resumes(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for attempt in (1, 2):
        result = run_cli(
            "fmlab.train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1",
            f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resumable", "trainer.max_steps=30",
            "logger=none", "data.num_eval_samples=100", "eval.num_draws=1", "eval.nll_samples=0",
            "callbacks.sample_logger=null", "extras.print_config=false", f"hydra.sweep.dir={tmp_path / str(attempt)}",
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name="resumable", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the second run added to the first's study
    assert all(0 < t.value < 5 for t in trials)


def test_a_default_run_prints_each_log_line_once_without_ads_or_deprecations(tmp_path: Path) -> None:
    # a new interpreter: what the first import of every dependency prints is part of what a user sees
    result = run_cli("fmlab.train", "trainer.max_steps=60", "data.num_eval_samples=200", "eval.num_draws=1",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, fresh=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    records = [re.sub(r"^\[[^]]*\]", "", line) for line in output.splitlines() if re.match(r"^\[\d{4}-", line)]
    assert records and all(count == 1 for count in Counter(records).values()), Counter(records)
    assert not re.search(r"^INFO: ", output, re.MULTILINE)  # Lightning's own handler, the second copy
    assert "Tip:" not in output and "deprecated" not in output.lower()
    tree = (tmp_path / "run" / "config_tree.log").read_text()
    assert "optimizer" in tree and "lr: 0.002" in tree  # the composed config, as printed at the start

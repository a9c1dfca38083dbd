"""Shared fixtures: compose the real Hydra configs, run the real CLI, keep W&B offline and quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from fmlab.cli import CONFIG_DIR, compose_train_config
from tests.cli_process import CLIProcess

REPO_ROOT = CONFIG_DIR.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def train_config(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        return compose_train_config(list(overrides), tmp_path)

    return make


def config_choices(group: str) -> str:
    """A config group's choices as the one-line errors list them: every yaml in conf/<group>, sorted (read from the
    files here, not through fmlab.cli.group_options, so the expectation does not share the code it checks)."""
    return ", ".join(sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml")))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment the tests run commands in: this one, unbuffered output, Hydra's short errors."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "", **extra}


def start_cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> CLIProcess:
    """Start `python -m <module> args...` in `cwd` as its own process (forked with the heavy dependencies already
    imported: tests/cli_process.py says what that keeps and what it skips)."""
    return CLIProcess(module, list(args), str(cwd), env or cli_env())


def run_cli(
    module: str, *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` as a user would, in `cwd`. `fresh`: in a new interpreter, for the tests of
    what a first import prints or loads."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    return start_cli(module, *args, cwd=cwd, env=env).communicate(timeout=timeout)


def cli_error(entry: str, args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`python -m fmlab.<entry> args` run in this process up to its pre-run checks: (exit status, stdout, stderr).
    For commands that must stop there (nothing is trained, no state outlives the call): the same code path as a
    real process without its seconds of imports."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    module = importlib.import_module(f"fmlab.{entry}")
    saved = sys.argv
    sys.argv = [f"fmlab-{entry}", *args]
    try:
        with pytest.raises(SystemExit) as stopped:
            module.main()
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return stopped.value.code, out, err

"""The suite's forked commands behave as `python -m` in a new interpreter: output, exit status, signals, cwd, env."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli, start_cli

SCRIPT = """
import os, sys, time
print("argv", sys.argv[1:], "cwd first on the path", sys.path[0] == os.getcwd(), "env", os.environ.get("PROBE"))
print("to stderr", file=sys.stderr)
what = sys.argv[1]
if what == "message":
    raise SystemExit("a message")
if what == "status":
    raise SystemExit(7)
if what == "raise":
    raise ValueError("boom")
if what == "sleep":
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    (tmp_path / "probe_module.py").write_text(SCRIPT)
    return tmp_path


@pytest.mark.parametrize("what", ["done", "message", "status", "raise"])
def test_a_forked_command_prints_and_exits_as_a_new_interpreter_does(probe: Path, what: str) -> None:
    env = cli_env(PROBE="seen")
    forked = run_cli("probe_module", what, cwd=probe, env=env)
    fresh = run_cli("probe_module", what, cwd=probe, env=env, fresh=True)
    assert forked.returncode == fresh.returncode == {"done": 0, "message": 1, "status": 7, "raise": 1}[what]
    assert forked.stdout == fresh.stdout == f"argv ['{what}'] cwd first on the path True env seen\n"
    assert forked.stderr.splitlines()[0] == fresh.stderr.splitlines()[0] == "to stderr"
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]  # "a message", "ValueError: boom"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_ends_a_forked_command_as_it_ends_a_new_interpreter(probe: Path, signum: int) -> None:
    forked = start_cli("probe_module", "sleep", cwd=probe)
    fresh = subprocess.Popen([sys.executable, "-m", "probe_module", "sleep"], cwd=probe, env=cli_env(),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert fresh.stdout.readline().startswith("argv") and fresh.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 60
    while "ready" not in forked.stdout_so_far():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    forked.send_signal(signum)
    fresh.send_signal(signum)
    assert forked.communicate(timeout=60).returncode == fresh.wait(timeout=60) == -signum
    fresh.stdout.close()

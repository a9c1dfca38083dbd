"""`python -m <module> args` as a real process that starts with the heavy dependencies already imported.

Each command-line run of the suite would pay ~3.5 s of imports (torch, torchvision through torchmetrics, SciPy, POT's
scikit-learn) before its first line, about a third of the suite's CPU. Here a fork server (the standard library's,
a fresh interpreter) imports them once per test worker and forks one child per command: the child is a separate
process with its own pid, signals, exit status, files, cwd and environment, which runs the module as `__main__`
exactly as `python -m` does. Only modules whose import leaves no state that depends on the run are preloaded:
Lightning is not (it picks its log handler by whether Hydra configured logging first), nor fmlab, nor W&B.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading

# third-party modules a training run imports, none of which reads the run's environment or logging set-up at import
PRELOADED = [
    "numpy",
    "scipy.signal",
    "scipy.stats",
    "sklearn",
    "torch",
    "torch._dynamo",
    "torchvision",
    "torchmetrics",
    "torchmetrics.functional",
    "torchdiffeq",
    "ot",
    "omegaconf",
    "hydra",
    "tests.cli_process",
]

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOADED)


def _exit_status(code: object) -> int:
    """The status the interpreter exits with for `SystemExit(code)`: None is 0, an int itself, anything else is
    printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_as_main(module: str, args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked child: the process state `python -m module args` starts with, then the module as `__main__`,
    then the interpreter's shutdown (non-daemon threads joined, atexit handlers run), then exit with its status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    for stream in (sys.stdout, sys.stderr):  # as PYTHONUNBUFFERED=1 leaves them
        stream.reconfigure(line_buffering=True, write_through=True)
    multiprocessing.set_start_method(None, force=True)  # the platform's default (loader workers fork), as fresh
    sys.path.insert(0, cwd)  # `python -m` puts the working directory first
    sys.argv = [module, *args]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    threading._shutdown()  # what the interpreter does at exit, before the atexit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class CLIProcess:
    """A started `python -m module args` with the parts of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, module: str, args: list[str], cwd: str, env: dict[str, str]) -> None:
        self.args = [sys.executable, "-m", module, *args]
        self._output_dir = tempfile.mkdtemp(prefix="fmlab-cli-")
        self._stdout = os.path.join(self._output_dir, "stdout")
        self._stderr = os.path.join(self._output_dir, "stderr")
        self._process = _CONTEXT.Process(
            target=_run_as_main, args=(module, list(args), str(cwd), dict(env), self._stdout, self._stderr)
        )
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def stdout_so_far(self) -> str:
        try:
            with open(self._stdout, encoding="utf-8", errors="replace") as file:
                return file.read()
        except FileNotFoundError:  # not started yet
            return ""

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def communicate(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait for the exit (killing the process past `timeout`, as `subprocess.run` does) and return what it
        printed."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            shutil.rmtree(self._output_dir, ignore_errors=True)
            raise subprocess.TimeoutExpired(self.args, timeout)
        outputs = []
        for path in (self._stdout, self._stderr):
            with open(path, encoding="utf-8", errors="replace") as file:
                outputs.append(file.read())
        shutil.rmtree(self._output_dir, ignore_errors=True)
        return subprocess.CompletedProcess(self.args, self._process.exitcode, *outputs)

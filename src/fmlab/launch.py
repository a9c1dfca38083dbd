"""Running a table's jobs: which runs a table still needs (resuming stopped ones from their checkpoints), how many
at once, each pinned to its own slice of the CPUs, and stopping them all when the table is stopped.

A table stopped by SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) passes SIGTERM on to every job it
started, so each saves its checkpoint, waits for them to exit, and exits with 143; the rerun resumes them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from fmlab.cli import CONFIG_DIR, check_composes
from fmlab.distributed import SIGTERM_EXIT_STATUS, on_signals, own_cpus
from fmlab.errors import UserError
from fmlab.runs import METRICS_FILE, job_overrides


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


class Jobs:
    """The table's running jobs. `stop()` (from the signal handler) sends each SIGTERM and lets no new one start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], cpus: list[int] | None = None, **popen_kwargs: Any) -> int:
        """Run `command` (on `cpus` when given) to its end and return its exit code; SIGTERM_EXIT_STATUS without
        starting it once the table is stopping. The affinity is set as the child starts, before its imports start
        any thread (threads inherit it)."""
        with self._lock:
            if self.stopping:
                return SIGTERM_EXIT_STATUS
            process = subprocess.Popen(command, **popen_kwargs)
            self._running.add(process)
        if cpus is not None and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(ProcessLookupError):  # it already ended
                os.sched_setaffinity(process.pid, cpus)
        try:
            return process.wait()
        finally:
            with self._lock:
                self._running.discard(process)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            for process in self._running:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()

    def wait_all(self) -> None:
        with self._lock:
            running = list(self._running)
        for process in running:
            process.wait()


def stopped_by_signals(jobs: Jobs, say: Any):
    """Within the block SIGTERM and SIGINT stop every job (each checkpoints on its SIGTERM), wait for them, and end
    the table with status 143."""

    def handler(signum: int, frame: Any) -> None:
        say(f"{signal.Signals(signum).name}: stopping every job (each saves a checkpoint); rerun to resume them")
        jobs.stop()
        jobs.wait_all()
        raise SystemExit(SIGTERM_EXIT_STATUS)

    return on_signals(handler)


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
    jobs = Jobs()

    def say(line: str) -> None:
        sys.stdout.write(f"fmlab.table: {line}\n")  # one write per line: concurrent runs don't splice lines
        sys.stdout.flush()

    def run_one(launch: Launch) -> int:
        command = [sys.executable, "-m", "fmlab.train", "-m", *launch.args]
        if jobs.stopping:
            return SIGTERM_EXIT_STATUS
        say(f"python -m fmlab.train -m {' '.join(launch.args)}")
        if workers == 1:
            return jobs.run(command, env=env)
        log = sweep_dir / "logs" / f"{launch.label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cpus = free_slices.get()  # one per pool thread: a slice is never used by two runs at once
        try:
            with log.open("w") as stream:
                code = jobs.run(command, cpus, env=env, stdout=stream, stderr=subprocess.STDOUT)
        finally:
            free_slices.put(cpus)
        say(f"{launch.label} ended with exit {code} ({threads} threads on CPUs {cpus}; output in {log})")
        return code

    with stopped_by_signals(jobs, say), ThreadPoolExecutor(max_workers=workers) as pool:
        codes = list(pool.map(run_one, launches))
    failed = [f"{launch.label} (exit {code})" for launch, code in zip(launches, codes, strict=True) if code != 0]
    if failed:
        raise UserError(f"runs failed: {', '.join(failed)}; the finished ones stay in {sweep_dir}")

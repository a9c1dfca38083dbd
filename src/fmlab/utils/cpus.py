"""The CPUs a process may use: its affinity set, which a scheduler (SLURM, `taskset`, `fmlab.table workers=N`)
narrows to the process's share."""

from __future__ import annotations

import os


def own_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity set where the OS has one; else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))

"""What a run leaves on disk: metrics.json (what tables and notebooks read), the config digest, checkpoints, and the
lock that keeps two runs out of one run dir."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fmlab.utils.errors import UserError

METRICS_FILE = "metrics.json"
LOCK_FILE = ".fmlab.lock"
UNHASHED_KEYS = ("paths", "hydra", "ckpt_path", "logger")  # where outputs go and who records them


def config_digest(config: DictConfig) -> str:
    """SHA-256 (first 16 hex digits) of the resolved config, leaving out where outputs go: equal digests, same run."""
    container = OmegaConf.to_container(config, resolve=True)
    for key in UNHASHED_KEYS:
        container.pop(key, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_atomically(target: Path, data: bytes | memoryview) -> None:
    """Write `data` to `target` whole or not at all: a temp file beside it, flushed to disk, then renamed over it.
    On failure (a full disk) the temp file is removed and `target` keeps what it held."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `metrics.json` atomically. It only grows: keys of the file already there that `metrics` lacks are kept
    (a resumed run that measures less never erases what was measured before)."""
    target = Path(output_dir) / METRICS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = read_metrics(target.parent) if target.is_file() else {}
    merged = {**previous, **metrics}
    text = json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n"
    write_atomically(target, text.encode())
    return target


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


# where fmlab keeps its own entries (config, format, W&B run id) in a Lightning checkpoint
CHECKPOINT_KEY = "fmlab"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by `fmlab.train`, or a one-line error saying what is wrong with the file.

    `mmap=True` maps the tensors instead of reading them: cheap when only the metadata is needed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={path} does not exist; give the path of a .ckpt file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def run_checkpoint(run_dir: str | Path) -> Path:
    """<run dir>/checkpoints/last.ckpt, or a one-line error when the run saved none."""
    checkpoint = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise UserError(
            f"ckpt_path={run_dir} is a directory without checkpoints/last.ckpt (the run saved no checkpoint); "
            "give a run dir that saved one, or a .ckpt file"
        )
    return checkpoint


_held_locks: dict[Path, int] = {}  # run dir -> open file descriptor holding its lock, for this process's life


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold an exclusive lock on `run_dir` for the rest of this process (idempotent within a process).

    flock locks belong to the open file: the kernel releases them when the process ends, however it ends, so a
    killed run never leaves its dir locked. A second run given the same dir gets a one-line error.
    """
    import fcntl

    directory = Path(run_dir).resolve()
    if directory in _held_locks:
        return
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise UserError(
            f"hydra.run.dir={run_dir} is in use by another fmlab run (pid {holder}); wait for it to end or choose "
            "another run dir"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _held_locks[directory] = descriptor


def is_launching_process() -> bool:
    """False in the extra ranks of a multi-process run (started by Lightning, torchrun or srun): they share the
    launching process's run dir and must not take its lock."""
    return all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))

"""The run-dir contract: what a run leaves on disk (metrics.json, what tables and notebooks read; the config digest;
checkpoints carrying their config), how a run is loaded back (`load_run`) or resumed in place (`resume_arguments`,
`check_resume`), and the lock that keeps two runs out of one run dir."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from fmlab.errors import UserError, first_detail
from fmlab.io import write_json

if TYPE_CHECKING:
    from torch import nn

    from fmlab.data.interface import EvaluationData
    from fmlab.module import FlowModule
    from fmlab.objectives import VelocityField

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


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `metrics.json` atomically. It only grows: keys of the file already there that `metrics` lacks are kept
    (a resumed run that measures less never erases what was measured before)."""
    target = Path(output_dir) / METRICS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = read_metrics(target.parent) if target.is_file() else {}
    return write_json(target, {**previous, **metrics})


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


# where fmlab keeps its own entries (config, format, W&B run id) in a Lightning checkpoint
CHECKPOINT_KEY = "fmlab"


def load_checkpoint(path: str | Path, mmap: bool = False, name: str = "ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint written by `fmlab.train`, or a one-line error saying what is wrong with the file.

    `mmap=True` maps the tensors instead of reading them: cheap when only the metadata is needed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{name}={path} does not exist; give the path of a .ckpt file or a run dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise UserError(f"{name}={path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{name}={path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def run_checkpoint(run_dir: str | Path, name: str = "ckpt_path") -> Path:
    """<run dir>/checkpoints/last.ckpt, or a one-line error when the run saved none."""
    checkpoint = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise UserError(
            f"{name}={run_dir} is a directory without checkpoints/last.ckpt (the run saved no checkpoint); "
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


def _drop_inherited_locks() -> None:
    """In a forked child (a loader worker): close the copies of the run dir locks. flock locks belong to the open
    file, which a fork shares, so a worker outliving a SIGKILLed run would hold its dir for seconds; closing the
    copy (never unlocking it, which would free the parent's lock too) leaves the lock to the run alone."""
    for descriptor in _held_locks.values():
        os.close(descriptor)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def is_launching_process() -> bool:
    """False in the extra ranks of a multi-process run (started by Lightning, torchrun, srun, or a cluster
    launcher that starts one command per node with NODE_RANK): they share the launching process's run dir and
    must not take its lock or write into it."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def slurm_job_identity() -> str | None:
    """The SLURM job this process runs in, as `scontrol requeue` names it: `<array job>_<task>` for an array
    task, else the job id; None outside SLURM. A requeued job keeps it."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # an salloc shell, as Lightning reads it
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_stamp() -> str:
    """The first part of a new run dir's name: `slurm<job>` inside a SLURM job (so the requeued job finds the dir
    its first start made, `slurm_resume_arguments`), else the start time."""
    import datetime

    job = slurm_job_identity()
    return f"slurm{job}" if job else datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def slurm_requeued() -> bool:
    """This process runs in a SLURM job that was requeued (SLURM sets SLURM_RESTART_COUNT from the first requeue)."""
    return slurm_job_identity() is not None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def requeued_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a requeued SLURM job resumes from in its own run dir (a multirun job's dir, which submitit
    keeps across a requeue), if it has one."""
    last = run_dir / "checkpoints" / "last.ckpt"
    return last.resolve() if slurm_requeued() and last.exists() else None


def slurm_resume_arguments(args: list[str], runs_dir: Path = Path("outputs/train/runs")) -> list[str]:
    """A SLURM job that was requeued (SLURM_RESTART_COUNT > 0) resumes by itself: with no `ckpt_path` given, the
    run dir this job made on its first start (`hydra.run.dir` if given, else the one dir `slurm<job>_*` under
    `runs_dir`) is resumed when it has a last.ckpt. Outside SLURM, in a multirun (submitit reruns its job dirs
    itself) or with a checkpoint given: the arguments as they are."""
    job = slurm_job_identity()
    if not slurm_requeued() or any(a.startswith("ckpt_path=") for a in args) or {"-m", "--multirun"} & set(args):
        return args
    given = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    log_dirs = [a.split("=", 1)[1] for a in args if a.startswith("paths.log_dir=")]
    if log_dirs:
        runs_dir = Path(log_dirs[-1]) / "train" / "runs"
    candidates = [Path(given[-1])] if given else sorted(runs_dir.glob(f"slurm{job}_*"))
    resumable = [d for d in candidates if (d / "checkpoints" / "last.ckpt").exists()]
    if len(resumable) != 1:
        return args
    print(f"fmlab: SLURM job {job} was requeued: resuming its run dir {resumable[0]}", flush=True)
    return [*args, f"ckpt_path={resumable[0]}"]


# the environment that names a process's rank: Lightning's and torchrun's (local, global, node) and SLURM's
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


# classes that moved since a checkpoint was written: its stored config builds them from their new homes
MOVED_TARGETS = {
    "fmlab.sampling.ODESolver": "fmlab.samplers.ODESolver",
    "fmlab.sampling.AncestralSampler": "fmlab.samplers.AncestralSampler",
    "fmlab.stochastic.EulerMaruyama": "fmlab.samplers.EulerMaruyama",
    "fmlab.stochastic.PredictorCorrector": "fmlab.samplers.PredictorCorrector",
    "fmlab.stochastic.EDMHeun": "fmlab.samplers.EDMHeun",
    "fmlab.paths.IndependentCoupling": "fmlab.couplings.IndependentCoupling",
    "fmlab.paths.MinibatchOTCoupling": "fmlab.couplings.MinibatchOTCoupling",
    "fmlab.paths.couplings.IndependentCoupling": "fmlab.couplings.IndependentCoupling",
    "fmlab.paths.couplings.MinibatchOTCoupling": "fmlab.couplings.MinibatchOTCoupling",
    "fmlab.paths.couplings.ReflowCoupling": "fmlab.reflow.ReflowCoupling",
    "fmlab.utils.loggers.ResumableCSVLogger": "fmlab.loggers.ResumableCSVLogger",
    "fmlab.utils.loggers.wandb_logger": "fmlab.loggers.wandb_logger",
}


def upgrade_config(node: Any) -> Any:
    """A stored config with every moved `_target_` rewritten to its new home (`MOVED_TARGETS`)."""
    if isinstance(node, dict):
        return {
            key: MOVED_TARGETS.get(value, value)
            if key == "_target_" and isinstance(value, str)
            else upgrade_config(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [upgrade_config(value) for value in node]
    return node


def stored_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved config a checkpoint carries, upgraded to today's targets; None for files from before."""
    stored = checkpoint.get(CHECKPOINT_KEY, {}).get("config")
    return upgrade_config(stored) if stored is not None else None


def run_config(checkpoint: dict[str, Any], path: str | Path, name: str = "ckpt_path") -> DictConfig:
    """The training config of a checkpoint: stored in it, or (older files) the run dir's .hydra/config.yaml."""
    stored = stored_config(checkpoint)
    if stored is not None:
        return OmegaConf.create(stored)
    saved = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
    if saved.is_file():
        return OmegaConf.create(upgrade_config(OmegaConf.to_container(OmegaConf.load(saved))))
    raise UserError(f"{name}={path} carries no fmlab config and {saved} does not exist; cannot rebuild the run")


def ema_weights(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA callback's averaged weights saved in a checkpoint, if any."""
    for name, state in checkpoint.get("callbacks", {}).items():
        if name.startswith("EMA") and state.get("weights") is not None:
            return state["weights"]
    return None


@dataclass
class LoadedRun:
    """A saved run, rebuilt: its system, the net to sample with, its data, its config, and its step."""

    module: FlowModule
    net: nn.Module  # the EMA weights when asked for and saved, else the trained net
    datamodule: EvaluationData
    config: DictConfig
    step: int

    def velocity_field(self) -> VelocityField:
        """The PF-ODE drift of `net`: what samplers, the likelihood and the Evaluator take."""
        return self.module.velocity_field(self.net)


def load_run(path: str | Path, use_ema: bool = True, name: str = "ckpt_path") -> LoadedRun:
    """Rebuild a run from a checkpoint file or a run dir (its checkpoints/last.ckpt) alone: the config stored in the
    checkpoint builds the module and the datamodule, the weights are loaded, and `net` carries the EMA weights when
    `use_ema` and the run kept them. Raises `UserError` with one line (naming `name`, the setting that gave the
    path) for anything wrong with the file."""
    import copy

    from hydra.utils import instantiate

    from fmlab.module import FlowModule

    if Path(path).is_dir():
        path = run_checkpoint(path, name)
    checkpoint = load_checkpoint(path, name=name)
    config = run_config(checkpoint, path, name)
    module = FlowModule.from_config(config)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise UserError(f"{name}={path} does not match the net its config builds: {first_detail(error)}") from None
    net = module.net
    weights = ema_weights(checkpoint) if use_ema else None
    if weights is not None:
        net = copy.deepcopy(module.net)
        net.load_state_dict(weights)
    return LoadedRun(module, net, instantiate(config.data), config, int(checkpoint.get("global_step", 0)))


def resume_arguments(args: list[str], runs_dir: Path = Path("outputs/train/runs")) -> list[str]:
    """`ckpt_path=<run dir>` or `ckpt_path=last` (the newest run under `runs_dir` with a checkpoint) resumes that
    run in place: its own overrides first, then the given ones, its last.ckpt, and its run dir as Hydra's.
    A `ckpt_path=<file>` starts a new run dir from that checkpoint."""
    values = [a.split("=", 1)[1] for a in args if a.startswith("ckpt_path=")]
    if not values or (values[-1] != "last" and not Path(values[-1]).is_dir()):
        return args
    if values[-1] == "last":
        candidates = sorted(p.parent.parent for p in runs_dir.glob("*/checkpoints/last.ckpt"))
        if not candidates:
            raise UserError(f"ckpt_path=last found no run with checkpoints/last.ckpt under {runs_dir}")
        run_dir = candidates[-1]
    else:
        run_dir = Path(values[-1])
    checkpoint = run_checkpoint(run_dir)
    saved = run_dir / ".hydra" / "overrides.yaml"
    original = [str(o) for o in OmegaConf.load(saved)] if saved.is_file() else []
    keep = [o for o in original if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    given = [a for a in args if not a.startswith("ckpt_path=")]
    print(f"fmlab: resuming {run_dir} from {checkpoint.resolve().name}", flush=True)
    return [*merged_overrides(keep, given), f"ckpt_path={checkpoint.resolve()}", f"hydra.run.dir={run_dir}"]


def merged_overrides(saved: list[str], given: list[str]) -> list[str]:
    """The run's own overrides with the given ones over them: one entry per key (a given value replaces the saved
    one in its place), so a run resumed N times lists each setting once."""
    merged: dict[str, str] = {}
    for override in [*saved, *given]:
        key = override.split("=", 1)[0].lstrip("+~") if "=" in override else override
        if merged.get(key, "").startswith("+") and not override.startswith(("+", "~")):
            override = f"+{override}"  # a key the run added stays added
        merged[key] = override
    return list(merged.values())


# what a resumed run cannot change: the run's model, its training data and its optimiser and schedule, whose states
# come from the checkpoint (Lightning would restore the old ones over the new values without a word)
RESUME_FIXED_KEYS = ("method", "net", "path", "schedule", "objective", "coupling", "time_sampler", "conditioning",
                     "data", "optimizer", "scheduler", "scheduler_interval", "seed")  # fmt: skip
# settings of those groups that only say where data lives or how it is evaluated
RESUME_FREE_KEYS = ("data.num_eval_samples", "data.num_workers", "data.data_dir")


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def resume_conflicts(stored: dict[str, Any], cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every setting in RESUME_FIXED_KEYS that differs."""
    conflicts = []
    for group in RESUME_FIXED_KEYS:
        if group not in stored:  # a group this checkpoint's fmlab did not have yet: it ran as the default
            continue
        current = OmegaConf.to_container(cfg[group], resolve=True) if isinstance(cfg.get(group), DictConfig) else None
        old = _flat(stored.get(group), group)
        new = _flat(current if current is not None else cfg.get(group), group)
        # options added to (or dropped from) a group since the checkpoint was written are not compared
        both = isinstance(stored.get(group), dict) and isinstance(current, dict)
        for key in sorted(old.keys() & new.keys() if both else old.keys() | new.keys()):
            if key not in RESUME_FREE_KEYS and old.get(key, "<unset>") != new.get(key, "<unset>"):
                conflicts.append((key, old.get(key, "<unset>"), new.get(key, "<unset>")))
    return conflicts


def check_resume(cfg: DictConfig) -> int:
    """A resumed run continues the checkpoint's run: refuse settings it would ignore or could not load, and a
    checkpoint already past `trainer.max_steps`. Returns the checkpoint's step."""
    checkpoint = load_checkpoint(cfg.ckpt_path, mmap=True)  # mapped, not read: Lightning reads it when it restores
    step = int(checkpoint.get("global_step", 0))
    if step > cfg.trainer.max_steps:
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} is at step {step}, beyond trainer.max_steps={cfg.trainer.max_steps}; "
            f"give trainer.max_steps >= {step}, or evaluate it with python -m fmlab.evaluate"
        )
    stored = stored_config(checkpoint)
    conflicts = resume_conflicts(stored, cfg) if stored is not None else []
    if conflicts:
        listed = "; ".join(f"{key}: {old} in the checkpoint, {new} now" for key, old, new in conflicts[:4])
        listed += f"; and {len(conflicts) - 4} more" if len(conflicts) > 4 else ""
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} cannot resume with other settings ({listed}): a resumed run keeps the "
            "checkpoint's model, data, optimiser and schedule; drop these overrides or start a new run"
        )
    return step


def wandb_run_id(cfg: DictConfig) -> str | None:
    """The W&B run a resumed run's checkpoint logged into (stored by `RunConfigInCheckpoint`), if any."""
    if cfg.get("ckpt_path") is None:
        return None
    return load_checkpoint(cfg.ckpt_path, mmap=True).get(CHECKPOINT_KEY, {}).get("wandb_id")


def check_new_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A new run never overwrites another run's checkpoints: a run dir holding one is resumed, not reused."""
    if cfg.get("ckpt_path") is None and (run_dir / "checkpoints" / "last.ckpt").exists():
        raise UserError(
            f"hydra.run.dir={run_dir} already holds a run (checkpoints/last.ckpt); resume it with "
            f"ckpt_path={run_dir}, or choose another run dir"
        )


def optimized_value(cfg: DictConfig, metrics: dict[str, Any], direction: str | None = None) -> float | None:
    """The metric a sweeper optimises. A diverged run, or one whose evaluation failed, gets the worst value for
    `direction` (+inf when minimising, -inf when maximising; NaN when unknown), never a number that looks good:
    Optuna ranks such a trial last and the search goes on."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    value = metrics.get(name)
    if not metrics.get("diverged") and isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return {"minimize": math.inf, "maximize": -math.inf}.get(str(direction).lower(), math.nan)


def job_overrides(job_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run in `job_dir` (`.hydra/overrides.yaml`)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []

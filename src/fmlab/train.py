"""Training entry point: `python -m fmlab.train [group=option ...] [key=value ...]`.

compose → validate → seed → instantiate → fit (callbacks sample and evaluate) → write metrics.json → return the
metric a sweeper optimises.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fmlab import __version__
from fmlab.errors import UserError, exit_on_user_error
from fmlab.utils.cli import CONFIG_PATH, run_entry_point

if TYPE_CHECKING:  # torch and Lightning load inside `train`, so a bad command line fails in well under a second.
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from fmlab.module import FlowModule


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _local_multirun() -> bool:
    """A Hydra multirun outside SLURM (where srun, not Lightning, starts the ranks)."""
    return _in_multirun() and "SLURM_NTASKS" not in os.environ


# what a resumed run cannot change: the run's model, its training data and its optimiser and schedule, whose states
# come from the checkpoint (Lightning would restore the old ones over the new values without a word)
RESUME_FIXED_KEYS = ("method", "net", "path", "schedule", "objective", "coupling", "time_sampler", "conditioning",
                     "data", "optimizer", "scheduler", "scheduler_interval", "seed")  # fmt: skip
# the weights the final evaluation measures: the end of training, or a monitoring checkpoint's best
EVAL_CHECKPOINTS = ("last", "best")
# settings of those groups that only say where data lives or how it is evaluated
RESUME_FREE_KEYS = ("data.num_eval_samples", "data.num_workers", "data.data_dir")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(cfg: DictConfig) -> None:
    """Checks Lightning would accept silently (max_steps = -1 trains forever, lr = 0 trains nothing) or report
    with a traceback, and the checks of a resumed run against its checkpoint."""
    trainer = cfg.trainer
    if not trainer.get("fast_dev_run") and (not isinstance(trainer.max_steps, int) or trainer.max_steps < 1):
        raise UserError(f"trainer.max_steps={trainer.max_steps} is invalid; it must be a positive integer")
    lr = cfg.optimizer.get("lr")
    if lr is not None and (not _is_number(lr) or lr <= 0):
        raise UserError(f"optimizer.lr={lr!r} is invalid; it must be a positive number such as 2e-3")
    if cfg.get("eval_checkpoint", "last") not in EVAL_CHECKPOINTS:
        raise UserError(
            f"eval_checkpoint={cfg.eval_checkpoint} is not one of {', '.join(EVAL_CHECKPOINTS)}: the weights at the "
            "end of training, or the best checkpoint of a monitoring ModelCheckpoint (callbacks=best_val)"
        )
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed!r} is invalid; it must be a whole number from 0 to 2**32 - 1")
    if "ddp" in str(trainer.get("strategy", "")) and trainer.get("devices", 1) != 1 and _local_multirun():
        raise UserError(
            f"trainer.strategy={trainer.strategy} cannot run inside a local multirun (Lightning would relaunch the "
            "whole sweep once per rank); run the jobs one at a time or submit them with hydra/launcher=slurm"
        )
    conditioning = cfg.get("conditioning") or {}
    if conditioning.get("labels") and not conditioning.get("num_classes"):
        raise UserError(
            f"conditioning=class needs data with class labels; data={cfg.data.get('target')} has none (labelled: "
            "moons, 8gaussians, tong_moons, tong_8gaussians, digits, mnist, cifar10, imagenet32, imagenet64)"
        )
    from hydra.utils import instantiate

    instantiate(cfg.solver).check_path(instantiate(cfg.path))  # e.g. the ancestral sampler on the OT path
    if cfg.ckpt_path is not None:
        check_resume(cfg)


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


def check_resume(cfg: DictConfig) -> None:
    """A resumed run continues the checkpoint's run: refuse settings it would ignore or could not load, and a
    checkpoint already past `trainer.max_steps`."""
    from fmlab.runs import CHECKPOINT_KEY, load_checkpoint

    if not Path(cfg.ckpt_path).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist; give the path of a .ckpt file or a run dir")
    checkpoint = load_checkpoint(cfg.ckpt_path, mmap=True)
    step = int(checkpoint.get("global_step", 0))
    if step > cfg.trainer.max_steps:
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} is at step {step}, beyond trainer.max_steps={cfg.trainer.max_steps}; "
            f"give trainer.max_steps >= {step}, or evaluate it with python -m fmlab.evaluate"
        )
    stored = checkpoint.get(CHECKPOINT_KEY, {}).get("config")
    conflicts = resume_conflicts(stored, cfg) if stored is not None else []
    if conflicts:
        listed = "; ".join(f"{key}: {old} in the checkpoint, {new} now" for key, old, new in conflicts[:4])
        listed += f"; and {len(conflicts) - 4} more" if len(conflicts) > 4 else ""
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} cannot resume with other settings ({listed}): a resumed run keeps the "
            "checkpoint's model, data, optimiser and schedule; drop these overrides or start a new run"
        )


def check_new_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A new run never overwrites another run's checkpoints: a run dir holding one is resumed, not reused."""
    if cfg.get("ckpt_path") is None and (run_dir / "checkpoints" / "last.ckpt").exists():
        raise UserError(
            f"hydra.run.dir={run_dir} already holds a run (checkpoints/last.ckpt); resume it with "
            f"ckpt_path={run_dir}, or choose another run dir"
        )


def preflight(cfg: DictConfig, args: list[str]) -> None:
    """Before Hydra writes into the run dir: the config's values, the run dir (writable, not another run's, not in
    use), all in one line on failure. Then the run dir stays locked for this process."""
    from fmlab.runs import is_launching_process, lock_run_dir
    from fmlab.utils.cli import check_writable, run_dir_override

    validate_config(cfg)
    run_dir = run_dir_override(args)
    if run_dir is None:  # a new, timestamped run dir under paths.log_dir
        check_writable(Path(str(cfg.paths.log_dir)), "paths.log_dir")
        return
    check_writable(run_dir)
    check_new_run_dir(cfg, run_dir)
    if is_launching_process():
        lock_run_dir(run_dir)


def run_metrics(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: FlowModule,
    datamodule: Any,
    callbacks: list[Callback],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """What metrics.json records: the evaluation, the cost of training, and what was run."""
    import torch
    from lightning.pytorch.callbacks import Timer

    from fmlab.module import net_parameters
    from fmlab.runs import config_digest

    metrics: dict[str, Any] = {
        "method": cfg.method.name,
        "data": cfg.data.get("target", cfg.data.get("name")),
        "source": cfg.data.get("source", "gaussian"),
        "seed": cfg.seed,
        "tags": list(cfg.get("tags") or []),
        "steps": trainer.global_step,
        "config_digest": config_digest(cfg),
        "path": repr(module.path),
        "objective": repr(module.objective),
        "coupling": repr(datamodule.coupling),
        "net_parameters": net_parameters(module.net),
        "fmlab_version": __version__,
        "torch_version": torch.__version__,
        # train_seconds depends on them: the training process's threads and the loader workers beside it
        "torch_threads": getattr(datamodule, "training_threads", torch.get_num_threads()),
        "loader_workers": getattr(datamodule, "loader_workers", 0),
    }
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None:
        metrics["train_loss"] = float(loss)
    for callback in callbacks:
        if isinstance(callback, Timer):
            metrics["train_seconds"] = callback.time_elapsed("train")
    metrics.update(evaluation)
    return metrics


def continue_wandb_run(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """When resuming, log into the W&B run the checkpoint names (its id is stored by RunConfigInCheckpoint)."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    from fmlab.runs import CHECKPOINT_KEY

    run_id = checkpoint.get(CHECKPOINT_KEY, {}).get("wandb_id")
    if wandb_cfg and run_id:
        from omegaconf import open_dict

        with open_dict(wandb_cfg):
            wandb_cfg.id, wandb_cfg.resume = run_id, "allow"


@contextmanager
def exit_on_sigterm(message: str):
    """SIGTERM inside the block prints `message` and exits with status 143 at once (Lightning's own handler, which
    only notes the signal for the training loop to act on, is gone once `fit` returns)."""
    from fmlab.callbacks.resume import SIGTERM_EXIT_STATUS

    def handler(signum: int, frame: Any) -> None:
        print(message, flush=True)
        raise SystemExit(SIGTERM_EXIT_STATUS)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says and return its metrics (also written to <output_dir>/metrics.json).

    A resumed run whose training is complete only evaluates. Raises `UserError` on bad input; `SystemExit(143)` on
    SIGTERM, after saving a checkpoint (during training) or keeping the last one (during the final evaluation).
    """
    validate_config(cfg)
    import lightning as L
    from hydra.utils import instantiate

    from fmlab.callbacks import PeriodicEvaluation, build_callbacks
    from fmlab.callbacks.resume import SIGTERM_EXIT_STATUS, AtomicCheckpointIO, restore_best_checkpoint
    from fmlab.data.reflow import ReflowDataModule, init_student
    from fmlab.distributed import end_process_group
    from fmlab.module import FlowModule, net_parameters
    from fmlab.paths.couplings import ReflowCoupling
    from fmlab.runs import is_launching_process, load_checkpoint, lock_run_dir, write_metrics
    from fmlab.sampling import SolverError
    from fmlab.utils.config import instantiate_each
    from fmlab.utils.console import config_tree, quiet_third_party_output
    from fmlab.utils.loggers import finish_wandb, keep_history_before, log_final_metrics

    output_dir = Path(cfg.paths.output_dir)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings", True):
        quiet_third_party_output()
    if is_launching_process():
        lock_run_dir(output_dir)
        check_new_run_dir(cfg, output_dir)
        if extras.get("print_config", False):
            config_tree(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = FlowModule.from_config(cfg)
    coupling = instantiate(cfg.coupling)
    source = datamodule.source
    if module.objective.needs_gaussian_source and source != "gaussian":
        raise UserError(
            f"data.source={source} cannot be used with method={cfg.method.name}: its objective "
            f"({module.objective!r}) assumes a N(0, I) source; use data.source=gaussian or a velocity objective"
        )
    if isinstance(coupling, ReflowCoupling):  # training batches: the teacher's pairs; evaluation: the data
        datamodule = ReflowDataModule(datamodule, coupling, cfg.data.batch_size, cfg.seed)
        if cfg.ckpt_path is None and coupling.init_from_teacher:
            init_student(module.net, coupling)
    else:  # the coupling runs where the batches are made (loader workers with data.num_workers)
        datamodule.couple_with(coupling)
    print(f"fmlab: net {type(module.net).__name__} with {net_parameters(module.net):,} parameters", flush=True)
    callbacks = build_callbacks(cfg)
    resume_step = 0
    if cfg.ckpt_path is not None:
        # mapped, not read: Lightning reads the whole file again when it restores the run
        checkpoint = load_checkpoint(cfg.ckpt_path, mmap=True)
        resume_step = int(checkpoint.get("global_step", 0))
        continue_wandb_run(cfg, checkpoint)
    loggers = instantiate_each(cfg.get("logger"))
    if is_launching_process():  # rank 0 writes the loggers' files
        keep_history_before(loggers, resume_step)
    plugins = [AtomicCheckpointIO()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    evaluator = next((c for c in callbacks if isinstance(c, PeriodicEvaluation)), None)
    metrics: dict[str, Any] = {}
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        started = time.perf_counter()
        if resume_step >= cfg.trainer.max_steps:
            print(f"fmlab: {cfg.ckpt_path} finished training (step {resume_step}); evaluating it", flush=True)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)  # restores, then skips if done
            last = output_dir / "checkpoints" / "last.ckpt"
            kept = f"the checkpoint {last} is kept; resume with ckpt_path={output_dir} to evaluate it"
            if getattr(trainer, "received_sigterm", False):  # noted by Lightning after the last step
                print(f"fmlab: SIGTERM at the end of training: {kept}", flush=True)
                raise SystemExit(SIGTERM_EXIT_STATUS)
            with exit_on_sigterm(f"fmlab: SIGTERM during the final evaluation: {kept}"):
                chosen = restore_best_checkpoint(trainer, module) if cfg.eval_checkpoint == "best" else {}
                evaluation = evaluator.final(trainer, module) if evaluator is not None else {}
                evaluation.update(chosen)
        except SolverError as failure:
            failed = {"eval_error": str(failure), "diverged": True}
            metrics = run_metrics(cfg, trainer, module, datamodule, callbacks, failed)
            if trainer.is_global_zero:
                write_metrics(output_dir, metrics)  # what was measured before the solver gave up
            if not _in_multirun():
                raise
            print(f"fmlab: warning: {failure}", flush=True)  # a sweep goes on; this job gets the worst value
            end_process_group()
            return metrics
        metrics = run_metrics(cfg, trainer, module, datamodule, callbacks, evaluation)
        metrics.update(getattr(datamodule, "generation", {}))  # reflow: the pairs' cost
        metrics["wall_seconds"] = time.perf_counter() - started
        if trainer.is_global_zero:
            write_metrics(output_dir, metrics)
            log_final_metrics(loggers, metrics)
    finally:
        finish_wandb(loggers)
    end_process_group()
    return metrics


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


def sweeper_direction() -> str | None:
    """`hydra.sweeper.direction` of the running sweep (Optuna's), if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    direction = (HydraConfig.get().get("sweeper") or {}).get("direction")
    return direction if isinstance(direction, str) else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, train(cfg), sweeper_direction())


def main() -> None:
    import sys

    if "LOCAL_RANK" not in os.environ:  # DDP ranks > 0 are started with the resolved arguments already
        from fmlab.runs import resume_arguments

        sys.argv[1:] = exit_on_user_error(resume_arguments)(sys.argv[1:])
    run_entry_point(hydra_main, "train", preflight)


if __name__ == "__main__":
    main()

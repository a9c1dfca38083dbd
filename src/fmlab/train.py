"""Training entry point: `python -m fmlab.train [group=option ...] [key=value ...]`.

compose → build (`fmlab.build`: every part, checked before the run dir exists) → fit (callbacks sample and evaluate)
→ the final evaluation → write metrics.json → return the metric a sweeper optimises.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from fmlab.build import TrainingRun, build_parts, build_training, in_multirun, preflight
from fmlab.cli import CONFIG_PATH, quiet_third_party_output, run_entry_point, what_was_run
from fmlab.distributed import SIGTERM_EXIT_STATUS, on_signals
from fmlab.errors import exit_on_user_error
from fmlab.runs import (
    check_new_run_dir,
    is_launching_process,
    lock_run_dir,
    optimized_value,
    requeued_checkpoint,
    slurm_job_identity,
    write_metrics,
)


def exit_on_sigterm(message: str):
    """SIGTERM (or SIGINT) inside the block prints `message` and exits with status 143 at once (Lightning's own
    handler, which only notes the signal for the training loop to act on, is gone once `fit` returns)."""

    def handler(signum: int, frame: Any) -> None:
        print(message, flush=True)
        raise SystemExit(SIGTERM_EXIT_STATUS)

    return on_signals(handler)


def fit_and_evaluate(run: TrainingRun) -> dict[str, Any]:
    """Fit (a finished run resumed only restores), then evaluate the chosen weights. SIGTERM at the end of training
    or during the final evaluation keeps the last checkpoint and exits with 143."""
    from fmlab.callbacks.resume import restore_best_checkpoint, sigint_as_sigterm

    cfg, trainer, module = run.cfg, run.trainer, run.module
    if run.parts.resume_step >= cfg.trainer.max_steps:
        print(f"fmlab: {cfg.ckpt_path} finished training (step {run.parts.resume_step}); evaluating it", flush=True)
    with sigint_as_sigterm():
        trainer.fit(module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path)  # restores, then skips if done
    kept = (
        f"the checkpoint {run.output_dir / 'checkpoints' / 'last.ckpt'} is kept; resume with ckpt_path={run.output_dir}"
    )
    if getattr(trainer, "received_sigterm", False):  # noted by Lightning after the last step
        print(f"fmlab: SIGTERM at the end of training: {kept} to evaluate it", flush=True)
        raise SystemExit(SIGTERM_EXIT_STATUS)
    with exit_on_sigterm(f"fmlab: SIGTERM during the final evaluation: {kept} to evaluate it"):
        chosen = restore_best_checkpoint(trainer, module) if cfg.eval_checkpoint == "best" else {}
        evaluation = run.evaluation.final(trainer, module) if run.evaluation is not None else {}
    return {**evaluation, **chosen}


def lost_rank_error(run: TrainingRun, failure: RuntimeError) -> BaseException:
    """A collective that failed because another rank died ends in one line naming it, the checkpoint kept and how
    to resume; any other error as it was."""
    from fmlab.distributed import lost_rank_message
    from fmlab.errors import UserError

    message = lost_rank_message(failure, run.trainer.global_rank, run.trainer.world_size)
    if message is None:
        return failure
    last = run.output_dir / "checkpoints" / "last.ckpt"
    kept = f"the newest checkpoint {last.resolve().name} is kept" if last.exists() else "no checkpoint yet"
    return UserError(f"{message}; {kept}: resume with ckpt_path={run.output_dir}")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says and return its metrics (also written to <output_dir>/metrics.json).

    A resumed run whose training is complete only evaluates. Raises `UserError` on bad input; `SystemExit(143)` on
    SIGTERM or SIGINT, after saving a checkpoint (during training) or keeping the last one (during the final
    evaluation). A solver that gives up on a diverged model records what was measured, `diverged: true`; a
    multirun goes on with the next job, a single run ends in one line.
    """
    from fmlab.distributed import end_process_group
    from fmlab.loggers import finish_wandb, keep_history_before, log_final_metrics
    from fmlab.module import net_parameters
    from fmlab.results import run_metrics, summary_lines
    from fmlab.samplers import SolverError

    resumed = requeued_checkpoint(Path(cfg.paths.output_dir)) if cfg.get("ckpt_path") is None else None
    if resumed is not None:  # a multirun job submitit requeued: its own job dir, resumed in place
        print(f"fmlab: SLURM job {slurm_job_identity()} was requeued: resuming from {resumed}", flush=True)
        with open_dict(cfg):
            cfg.ckpt_path = str(resumed)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings", True):
        quiet_third_party_output()
    parts = build_parts(cfg)  # built and checked by the preflight already, for a single run
    run = build_training(cfg, parts)
    net = parts.module.net
    print(f"fmlab: net {type(net).__name__} with {net_parameters(net):,} parameters", flush=True)
    if is_launching_process():
        lock_run_dir(run.output_dir)
        check_new_run_dir(cfg, run.output_dir)
        what_was_run(cfg, run.output_dir, echo=extras.get("print_config", False))
        keep_history_before(run.loggers, parts.resume_step)  # rank 0 writes the loggers' files
    started = time.perf_counter()
    try:
        for logger in run.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        try:
            evaluation = fit_and_evaluate(run)
        except RuntimeError as failure:
            raise lost_rank_error(run, failure) from None
        except SolverError as failure:
            metrics = run_metrics(run, {"eval_error": str(failure), "diverged": True}, started)
            if run.trainer.is_global_zero:
                write_metrics(run.output_dir, metrics)  # what was measured before the solver gave up
            if not in_multirun():
                raise
            print(f"fmlab: warning: {failure}", flush=True)  # a sweep goes on; this job gets the worst value
            end_process_group()
            return metrics
        metrics = run_metrics(run, evaluation, started)
        if run.trainer.is_global_zero:
            write_metrics(run.output_dir, metrics)
            log_final_metrics(run.loggers, metrics)
    finally:
        finish_wandb(run.loggers)
    if run.trainer.is_global_zero:  # the last screen: fmlab's own summary, with or without W&B
        print("\n".join(summary_lines(metrics, run.output_dir)), flush=True)
    end_process_group()
    return metrics


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
        from fmlab.runs import resume_arguments, slurm_resume_arguments

        sys.argv[1:] = exit_on_user_error(resume_arguments)(slurm_resume_arguments(sys.argv[1:]))
    run_entry_point(hydra_main, "train", preflight)


if __name__ == "__main__":
    main()

"""Training entry point: `python -m fmlab.train [group=option ...] [key=value ...]`.

compose → validate → seed → instantiate → fit (callbacks sample and evaluate) → write metrics.json → return the
metric a sweeper optimises.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fmlab import __version__
from fmlab.utils.cli import CONFIG_DIR, run_entry_point
from fmlab.utils.errors import UserError, exit_on_user_error

if TYPE_CHECKING:  # torch and Lightning load inside `train`, so a bad command line fails in well under a second.
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from fmlab.module import FlowModule


def _local_multirun() -> bool:
    """A Hydra multirun outside SLURM (where srun, not Lightning, starts the ranks)."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and "SLURM_NTASKS" not in os.environ


def validate_config(cfg: DictConfig) -> None:
    """Checks Lightning would accept silently (e.g. max_steps = -1 trains forever)."""
    trainer = cfg.trainer
    if not trainer.get("fast_dev_run") and (not isinstance(trainer.max_steps, int) or trainer.max_steps < 1):
        raise UserError(f"trainer.max_steps={trainer.max_steps} is invalid; it must be a positive integer")
    if "ddp" in str(trainer.get("strategy", "")) and trainer.get("devices", 1) != 1 and _local_multirun():
        raise UserError(
            f"trainer.strategy={trainer.strategy} cannot run inside a local multirun (Lightning would relaunch the "
            "whole sweep once per rank); run the jobs one at a time or submit them with hydra/launcher=slurm"
        )
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist; give the path of a .ckpt file")


def build_module(cfg: DictConfig) -> FlowModule:
    from hydra.utils import instantiate

    from fmlab.module import FlowModule

    return FlowModule(
        net=instantiate(cfg.net),
        path=instantiate(cfg.path),
        objective=instantiate(cfg.objective),
        coupling=instantiate(cfg.coupling),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        scheduler_interval=cfg.scheduler_interval,
    )


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The configured callbacks, plus the one that stores the resolved config in every checkpoint."""
    from fmlab.callbacks.run_config import RunConfigInCheckpoint
    from fmlab.utils.config import instantiate_each

    return [*instantiate_each(cfg.get("callbacks")), RunConfigInCheckpoint(OmegaConf.to_container(cfg, resolve=True))]


def run_metrics(cfg: DictConfig, trainer: L.Trainer, module: FlowModule, callbacks: list[Callback]) -> dict[str, Any]:
    """What metrics.json records: the evaluation, the cost of training, and what was run."""
    import torch
    from lightning.pytorch.callbacks import Timer

    from fmlab.callbacks import Evaluator
    from fmlab.utils.run_files import config_digest

    metrics: dict[str, Any] = {
        "method": cfg.method.name,
        "data": cfg.data.get("target", cfg.data.get("name")),
        "source": cfg.data.get("source", "gaussian"),
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "num_params": sum(p.numel() for p in module.net.parameters()),
        "config_digest": config_digest(cfg),
        "path": repr(module.path),
        "objective": repr(module.objective),
        "coupling": repr(module.coupling),
        "fmlab_version": __version__,
        "torch_version": torch.__version__,
    }
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None:
        metrics["train_loss"] = float(loss)
    for callback in callbacks:
        if isinstance(callback, Timer):
            metrics["train_seconds"] = callback.time_elapsed("train")
        if isinstance(callback, Evaluator):
            metrics.update(callback.results)
    return metrics


@exit_on_user_error
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says and return its metrics (also written to <output_dir>/metrics.json)."""
    validate_config(cfg)
    import lightning as L
    from hydra.utils import instantiate

    from fmlab.utils.config import instantiate_each
    from fmlab.utils.loggers import finish_wandb, log_final_metrics
    from fmlab.utils.run_files import write_metrics

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    source = getattr(datamodule, "source", "gaussian")
    if module.objective.needs_gaussian_source and source != "gaussian":
        raise UserError(
            f"data.source={source} cannot be used with method={cfg.method.name}: its objective "
            f"({module.objective!r}) assumes a N(0, I) source; use data.source=gaussian or a velocity objective"
        )
    callbacks = build_callbacks(cfg)
    loggers = instantiate_each(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics = run_metrics(cfg, trainer, module, callbacks)
        metrics["wall_seconds"] = time.perf_counter() - started
        if trainer.is_global_zero:
            write_metrics(cfg.paths.output_dir, metrics)
            log_final_metrics(loggers, metrics)
    finally:
        finish_wandb(loggers)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if isinstance(value, int | float) else None


def main() -> None:
    run_entry_point(hydra_main)


if __name__ == "__main__":
    main()

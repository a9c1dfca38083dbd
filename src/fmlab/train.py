"""Training entry point: `python -m fmlab.train [group=option ...] [key=value ...]`.

compose → validate → seed → instantiate → fit (callbacks sample and evaluate) → write metrics.json → return the
metric a sweeper optimises.
"""

from __future__ import annotations

import os
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
    from fmlab.utils.performance import configure_throughput

    performance = cfg.get("performance") or {}
    net = configure_throughput(instantiate(cfg.net), **performance)
    return FlowModule(
        net=net,
        path=instantiate(cfg.path),
        objective=instantiate(cfg.objective),
        coupling=instantiate(cfg.coupling),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        scheduler_interval=cfg.scheduler_interval,
    )


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The configured callbacks, plus the ones every run needs: the resolved config in every checkpoint, per-step
    seeds and a checkpoint on SIGTERM (exact resume), and a one-line stop on a non-finite loss."""
    from fmlab.callbacks.resume import CheckpointOnSigterm, StepSeed, StopOnNonFiniteLoss
    from fmlab.callbacks.run_config import RunConfigInCheckpoint
    from fmlab.utils.config import instantiate_each

    config = OmegaConf.to_container(cfg, resolve=True)
    return [
        *instantiate_each(cfg.get("callbacks")),
        RunConfigInCheckpoint(config),
        StepSeed(cfg.seed),
        CheckpointOnSigterm(),
        StopOnNonFiniteLoss(),
    ]


def net_parameters(net: Any) -> int:
    """How many numbers the net learns."""
    return sum(p.numel() for p in net.parameters())


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
        "config_digest": config_digest(cfg),
        "path": repr(module.path),
        "objective": repr(module.objective),
        "coupling": repr(module.coupling),
        "net_parameters": net_parameters(module.net),
        "fmlab_version": __version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # train_seconds depends on it
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


def continue_wandb_run(cfg: DictConfig) -> None:
    """When resuming, log into the W&B run the checkpoint names (its id is stored by RunConfigInCheckpoint)."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not cfg.ckpt_path or not wandb_cfg:
        return
    from fmlab.utils.run_files import CHECKPOINT_KEY, load_checkpoint

    # mapped, not read: Lightning reads the whole file again when it restores the run
    run_id = load_checkpoint(cfg.ckpt_path, mmap=True).get(CHECKPOINT_KEY, {}).get("wandb_id")
    if run_id:
        from omegaconf import open_dict

        with open_dict(wandb_cfg):
            wandb_cfg.id, wandb_cfg.resume = run_id, "allow"


@exit_on_user_error
def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says and return its metrics (also written to <output_dir>/metrics.json)."""
    validate_config(cfg)
    import lightning as L
    from hydra.utils import instantiate

    from fmlab.distributed import end_process_group
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
    print(f"fmlab: net {type(module.net).__name__} with {net_parameters(module.net):,} parameters", flush=True)
    callbacks = build_callbacks(cfg)
    continue_wandb_run(cfg)
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
    end_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if isinstance(value, int | float) else None


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
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise UserError(f"ckpt_path={values[-1]}: {checkpoint} does not exist; the run saved no checkpoint yet")
    saved = run_dir / ".hydra" / "overrides.yaml"
    original = [str(o) for o in OmegaConf.load(saved)] if saved.is_file() else []
    keep = [o for o in original if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    given = [a for a in args if not a.startswith("ckpt_path=")]
    print(f"fmlab: resuming {run_dir} from {checkpoint.resolve().name}", flush=True)
    return [*keep, *given, f"ckpt_path={checkpoint.resolve()}", f"hydra.run.dir={run_dir}"]


def main() -> None:
    import sys

    if "LOCAL_RANK" not in os.environ:  # DDP ranks > 0 are started with the resolved arguments already
        sys.argv[1:] = exit_on_user_error(resume_arguments)(sys.argv[1:])
    run_entry_point(hydra_main)


if __name__ == "__main__":
    main()

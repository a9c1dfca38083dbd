"""Thin Lightning hooks: EMA, periodic evaluation (calls `fmlab.evaluation`), sample pictures, resume guards. They
never compute a loss."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from fmlab.callbacks.ema import EMA, sampling_net
from fmlab.callbacks.evaluator import PeriodicEvaluation
from fmlab.callbacks.sample_logger import SampleLogger

__all__ = ["EMA", "PeriodicEvaluation", "SampleLogger", "build_callbacks", "sampling_net"]


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

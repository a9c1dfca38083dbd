"""Evaluator: at the end of training, generate samples through the PF-ODE and measure them."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from fmlab.callbacks.ema import sampling_net
from fmlab.metrics.distances import wasserstein2
from fmlab.module import FlowModule
from fmlab.sampling import ODESolver, sample


class Evaluator(L.Callback):
    """Generates `num_samples` points from the datamodule's fixed source batch and reports

    `w2` (exact W2 to the held-out set), `w2_floor` (W2 between two independent held-out sets of the same size:
    what a perfect sampler reaches) and `nfe` (net calls of the solver), sampling with the EMA weights when an
    `EMA` callback runs. Results land in `self.results` and in every logger under `eval/`.
    """

    def __init__(self, solver: ODESolver, num_samples: int = 2000) -> None:
        self.solver = solver
        self.num_samples = num_samples
        self.results: dict[str, Any] = {}

    def evaluate(self, module: FlowModule, datamodule: Any, net: torch.nn.Module | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        was_training = module.training
        module.eval()
        try:
            x0 = datamodule.eval_source(self.num_samples).to(module.device)
            result = sample(module.velocity_field(net), x0, self.solver)
        finally:
            module.train(was_training)
        held_out = datamodule.held_out(self.num_samples)
        metrics = {
            "w2": wasserstein2(result.samples, held_out),
            "w2_floor": wasserstein2(datamodule.held_out(self.num_samples, index=1), held_out),
            "nfe": result.nfe,
            "num_eval_samples": self.num_samples,
            "solver": repr(self.solver),
        }
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.results = self.evaluate(pl_module, trainer.datamodule, sampling_net(trainer, pl_module))
        numeric = {f"eval/{k}": float(v) for k, v in self.results.items() if isinstance(v, int | float)}
        for logger in trainer.loggers:
            logger.log_metrics(numeric, step=trainer.global_step)

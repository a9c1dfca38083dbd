"""PeriodicEvaluation: the training-time hook of the evaluation engine (`fmlab.evaluation.Evaluator`)."""

from __future__ import annotations

from typing import Any

import lightning as L

from fmlab.callbacks.ema import sampling_net
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.evaluation import Evaluator


class PeriodicEvaluation(L.Callback):
    """Every `every_n_steps` optimiser steps (0: never) evaluates the run's EMA weights (the trained net without an
    `EMA` callback) with `evaluator`, on every rank; `final` does it once more after training (the entry point calls
    it). Results go to every logger under `eval/` at their step and into `callback_metrics`, so a
    `ModelCheckpoint(monitor="eval/w2")` or early stopping can watch them; `history` keeps every evaluation."""

    def __init__(self, evaluator: Evaluator, every_n_steps: int = 0) -> None:
        if every_n_steps < 0:
            raise UserError(f"callbacks.evaluator.every_n_steps={every_n_steps} is invalid; it must be >= 0")
        self.evaluator, self.every_n_steps = evaluator, every_n_steps
        self.results: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, in_loop: bool = True) -> dict[str, Any]:
        field = pl_module.velocity_field(sampling_net(trainer, pl_module))
        results = self.evaluator.evaluate(field, trainer.datamodule, Ranks.of_trainer(trainer))
        results["step"] = trainer.global_step
        numeric = {f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, int | float)}
        if in_loop:  # callback_metrics for checkpoint monitors; the loggers get the values below, at this step
            pl_module.log_dict(numeric, logger=False, batch_size=1)
        for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
            logger.log_metrics(numeric, step=trainer.global_step)
            logger.save()  # the final evaluation runs after fit, when Lightning no longer saves the loggers
        self.history = [row for row in self.history if row["step"] != trainer.global_step]
        self.history.append({k: v for k, v in results.items() if isinstance(v, int | float)})
        return results

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < (trainer.max_steps or 0):
            self.run(trainer, pl_module)

    def final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The evaluation of the trained run, after `trainer.fit` (also when a resumed run had nothing left to
        train): in `self.results`, with the periodic evaluations in `eval_history`."""
        pl_module.to(trainer.strategy.root_device)  # fit's teardown moved it to the CPU
        self.results = self.run(trainer, pl_module, in_loop=False)
        if len(self.history) > 1:
            self.results["eval_history"] = self.history
        return self.results

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}  # a resumed run keeps the periodic evaluations before the kill

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

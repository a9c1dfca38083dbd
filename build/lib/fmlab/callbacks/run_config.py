"""Every checkpoint carries the run's resolved config, so a checkpoint file alone rebuilds its run."""

from __future__ import annotations

from typing import Any

import lightning as L

from fmlab import __version__
from fmlab.runs import CHECKPOINT_KEY

# bump when what a checkpoint holds changes in a way older code cannot read
CHECKPOINT_FORMAT = 1


class RunConfigInCheckpoint(L.Callback):
    """Adds checkpoint["fmlab"] = {"config", "format", "version", "wandb_id"}: `fmlab.evaluate` rebuilds the run
    from it, a resumed run logs into the same W&B run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_ids = [lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        checkpoint[CHECKPOINT_KEY] = {
            "config": self.config,
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "wandb_id": wandb_ids[0] if wandb_ids else None,  # a resumed run continues the same W&B run
        }

"""Every checkpoint carries the run's resolved config, so a checkpoint file alone rebuilds its run."""

from __future__ import annotations

from typing import Any

import lightning as L

from fmlab import __version__

# bump when what a checkpoint holds changes in a way older code cannot read
CHECKPOINT_FORMAT = 1


class RunConfigInCheckpoint(L.Callback):
    """Adds checkpoint["fmlab"] = {"config", "format", "version"}; `fmlab.evaluate` rebuilds the run from it."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["fmlab"] = {"config": self.config, "format": CHECKPOINT_FORMAT, "version": __version__}

"""What makes a killed run resumable exactly: per-step random seeds, and a checkpoint on SIGTERM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fmlab.data.toy2d import stream_seed

SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class StepSeed(L.Callback):
    """Reseeds torch's global generator before every training step from (seed, rank, step): the times, noise and
    couplings of step k are the same whether the run got there in one go or resumed from a checkpoint."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        torch.manual_seed(stream_seed(self.seed, "step", trainer.global_rank, trainer.global_step))


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (a scheduler's preemption, `kill`), save `step<k>.ckpt` after the step in progress, point
    `last.ckpt` at it, and exit with status 143. Lightning alone would only stop at the end of the epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stop = bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or trainer.checkpoint_callback is None or trainer.checkpoint_callback.dirpath is None:
            return
        directory = Path(trainer.checkpoint_callback.dirpath)
        target = directory / f"step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(target)
        if trainer.is_global_zero:
            last = directory / "last.ckpt"
            if last.is_symlink() or last.exists():
                last.unlink()
            os.symlink(target.name, last)
            print(f"fmlab: SIGTERM: saved {target}; resume with ckpt_path={directory.parent}", flush=True)
        raise SystemExit(SIGTERM_EXIT_STATUS)

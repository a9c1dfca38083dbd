"""What makes a killed run resumable exactly: per-step random seeds, a checkpoint on SIGTERM, and checkpoint files
that are written whole or not at all."""

from __future__ import annotations

import io
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmlab.distributed import SIGTERM_EXIT_STATUS, on_signals
from fmlab.errors import UserError
from fmlab.io import write_atomically
from fmlab.seeding import stream_seed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints serialised in memory, then written through a temp file renamed over the target: a full disk or a
    kill mid-write leaves the checkpoints already saved as they were and no truncated file beside them."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, buffer.getbuffer())
        except OSError as error:
            raise UserError(
                f"could not write the checkpoint {target} ({error.strerror or error}); the checkpoints saved before "
                "are kept: free some space (or give a writable paths.log_dir) and resume"
            ) from None


class StepSeed(L.Callback):
    """Reseeds torch's global generator before every training step from (seed, rank, step): the times, noise and
    couplings of step k are the same whether the run got there in one go or resumed from a checkpoint."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        seed = stream_seed(self.seed, "step", trainer.global_rank, trainer.global_step)
        # only the generators this step draws from: torch.manual_seed visits every backend (~0.3 ms a call)
        torch.default_generator.manual_seed(seed)
        if pl_module.device.type == "cuda":
            torch.cuda.manual_seed(seed)


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (a scheduler's preemption, `kill`), save `step<k>.ckpt` after the step in progress, point
    `last.ckpt` at it, and exit with status 143.

    One process only: Lightning just notes the signal (and would stop at the end of the epoch), so the flag is read
    after every step. Under DDP Lightning itself shares the flag before each step and stops every rank; saving then
    hangs gloo here, so a DDP run resumes from its last epoch checkpoint. (No per-step collective of our own.)
    """

    # the scheduler's warnings before a SLURM job is stopped: sbatch --signal=USR1@<s> (Lightning's convention) and
    # submitit's USR2; fmlab's handler replaces submitit's while training runs, and Lightning's auto-requeue is off
    # (fmlab.build), so one owner checkpoints and requeues, once
    REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.requeue_asked: int | None = None
        self.requeued = False
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from fmlab.runs import slurm_job_identity

        if slurm_job_identity() is None or self._previous:
            return
        for signum in self.REQUEUE_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note_requeue)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note_requeue(self, signum: int, frame: Any) -> None:
        self.requeue_asked = signum  # acted on after the step in progress, as SIGTERM

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.requeue_asked is not None:
            if trainer.world_size == 1:
                self._flush_step_logs(trainer)
                self._save(trainer, signal.Signals(self.requeue_asked).name)
            if trainer.is_global_zero:
                self._requeue(signal.Signals(self.requeue_asked).name)
            raise SystemExit(SIGTERM_EXIT_STATUS)
        if trainer.world_size > 1 or not getattr(trainer, "received_sigterm", False):
            return
        self._flush_step_logs(trainer)
        self._save(trainer)
        raise SystemExit(SIGTERM_EXIT_STATUS)

    def _requeue(self, signal_name: str) -> None:
        """`scontrol requeue <job>`, once per process: the requeued job finds its run dir and resumes by itself
        (`fmlab.runs.slurm_resume_arguments`)."""
        import subprocess

        from fmlab.runs import slurm_job_identity

        if self.requeued:
            return
        self.requeued = True
        job = slurm_job_identity()
        try:
            done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=60)
            failure = done.stderr.strip() if done.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as error:
            failure = str(error)
        if failure:
            print(f"fmlab: {signal_name}: requeueing SLURM job {job} failed ({failure}); resume it with ckpt_path=<run "
                  "dir>", flush=True)  # fmt: skip
        else:
            print(f"fmlab: {signal_name}: requeued SLURM job {job}; it resumes from this checkpoint", flush=True)

    @staticmethod
    def _flush_step_logs(trainer: L.Trainer) -> None:
        """Lightning hands a step's logged values to the loggers only after the `on_train_batch_end` hooks: a run
        leaving from this hook would lose the row of its last step (kept across a resume otherwise). Hand them over
        and save the loggers first, as Lightning's loop would."""
        connector = trainer._logger_connector
        connector.on_batch_end()
        connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A signal that lands after an epoch's last step (while the epoch-end checkpoint is written) is raised by
        Lightning's fit loop as `SIGTERMException`, a `SystemExit` with status 0: save, and exit with 143."""
        if trainer.world_size > 1 or not isinstance(exception, SIGTERMException):
            return
        self._save(trainer)
        exception.code = SIGTERM_EXIT_STATUS  # the same exception is re-raised by Lightning after this hook

    @staticmethod
    def _save(trainer: L.Trainer, signal_name: str = "SIGTERM") -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            return
        directory = Path(checkpoint.dirpath)
        target = directory / f"step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(target)
        last = directory / "last.ckpt"
        if last.is_symlink() or last.exists():
            last.unlink()
        os.symlink(target.name, last)
        print(f"fmlab: {signal_name}: saved {target}; resume with ckpt_path={directory.parent}", flush=True)


class TrainingClock(L.Callback):
    """The wall time of training, `seconds`: from the start of `fit` (loader workers' start-up included) to the end
    of training, summed over a resumed run's segments (kept in checkpoints)."""

    def __init__(self) -> None:
        self.before = 0.0  # seconds of the segments before this one
        self._started: float | None = None
        self._ended: float | None = None

    @property
    def seconds(self) -> float:
        if self._started is None:
            return self.before
        return self.before + ((self._ended or time.perf_counter()) - self._started)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._ended = time.perf_counter(), None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ended = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict["seconds"])


def sigint_as_sigterm():
    """Within the block Ctrl-C (SIGINT) does what SIGTERM does: Lightning notes it and `CheckpointOnSigterm` saves
    the step in progress, so an interrupted run resumes exactly instead of losing its steps since the last
    checkpoint."""

    def forward(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    return on_signals(forward, (signal.SIGINT,))


class StopOnNonFiniteLoss(L.Callback):
    """Stops training with one line when the loss is NaN or infinite, naming the step and the last good
    checkpoint (kept: on the CPU the check runs every step, before anything is saved after it), or when it is
    exactly 0 for each of the first `zero_steps` steps (a loss that learns nothing: a weight of 0 for every draw).
    A loss that is not finite at the first step of a run was computed before any update, so the message names the
    settings that make the loss (`settings`), not the learning rate."""

    def __init__(self, settings: str = "", zero_steps: int = 3) -> None:
        self.settings, self.zero_steps = settings, zero_steps
        self._first_step: int | None = None
        self._zeros = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step, self._zeros = trainer.global_step, 0  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        first = self._first_step if self._first_step is not None else 0
        steps_run = trainer.global_step - first
        # on accelerators the check waits for the device: do it only on logging steps there (and the first ones)
        early = steps_run <= self.zero_steps
        if not early and loss.device.type != "cpu" and trainer.global_step % max(trainer.log_every_n_steps, 1):
            return
        value = loss.item()  # the loss is a scalar; .item() is ~30x cheaper than isfinite().all()
        if early:
            self._zeros = self._zeros + 1 if value == 0.0 else -(10**9)
            if self._zeros == self.zero_steps:
                raise UserError(
                    f"the training loss is exactly 0 at each of steps {first + 1}-{trainer.global_step}: the model "
                    f"learns nothing (a loss weight of 0 for every draw?); check {self.settings or 'the settings'}"
                )
        if math.isfinite(value):
            return
        if steps_run <= 1:  # computed with the weights the run started from: no update has happened yet
            raise UserError(
                f"the training loss is {value} at step {trainer.global_step}, before any update (so not the "
                f"learning rate): the settings make the loss itself non-finite; check {self.settings or 'them'}"
            )
        checkpoint = trainer.checkpoint_callback
        last = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint is not None and checkpoint.dirpath else None
        kept = f"last good checkpoint: {last.resolve()}" if last is not None and last.exists() else "no checkpoint yet"
        raise UserError(
            f"the training loss became {value} at step {trainer.global_step}; {kept} "
            "(lower optimizer.lr, or check the data and schedule)"
        )


def restore_best_checkpoint(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """Load the weights (and the EMA copy) of the best checkpoint kept by the first `ModelCheckpoint` that monitors
    a metric, e.g. `callbacks=best_val`'s lowest `val/loss`, into `module`; what metrics.json records about it."""
    from fmlab.callbacks.ema import EMA
    from fmlab.runs import ema_weights, load_checkpoint

    monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    if not monitored:
        raise UserError(
            "eval_checkpoint=best needs a checkpoint callback with a monitor (callbacks=best_val keeps the lowest "
            "val/loss, or set callbacks.model_checkpoint.monitor); choose eval_checkpoint=last otherwise"
        )
    callback = monitored[0]
    if not callback.best_model_path or not Path(callback.best_model_path).is_file():
        raise UserError(
            f"eval_checkpoint=best: no checkpoint monitoring {callback.monitor} was saved (does the data have a "
            "validation split, and did validation run before the last step?); choose eval_checkpoint=last"
        )
    checkpoint = load_checkpoint(callback.best_model_path)
    module.load_state_dict(checkpoint["state_dict"])
    averaged = ema_weights(checkpoint)
    for ema in (c for c in trainer.callbacks if isinstance(c, EMA) and c.net is not None):
        if averaged is not None:
            ema.net.load_state_dict(averaged)
    return {
        "eval_checkpoint": "best",
        "eval_checkpoint_step": int(checkpoint.get("global_step", 0)),
        "eval_checkpoint_monitor": callback.monitor,
        "eval_checkpoint_score": float(callback.best_model_score),
    }

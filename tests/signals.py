"""A callback the kill-and-resume tests add from the command line: it sends a real signal to its own process at a
chosen point of training, so the point the run is killed at does not depend on the machine's speed."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class SignalAt(L.Callback):
    """Send `signal_name` to this process after training step `step` ("batch_end"), or at the end of the epoch that
    ends at `step` ("epoch_end", after the step's hooks: what a kill during the epoch-end checkpoint looks like)."""

    def __init__(self, step: int | list[int], signal_name: str = "SIGTERM", when: str = "batch_end") -> None:
        if when not in ("batch_end", "epoch_end"):
            raise ValueError(f"when={when!r}: expected batch_end or epoch_end")
        self.steps = {int(s) for s in step} if hasattr(step, "__iter__") else {int(step)}  # a list, or a ListConfig
        self.signal, self.when = getattr(signal, signal_name), when

    def _maybe_send(self, trainer: L.Trainer, when: str) -> None:
        if when == self.when and trainer.global_step in self.steps:
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe_send(trainer, "batch_end")

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe_send(trainer, "epoch_end")


class SignalAfterTraining(L.Callback):
    """Send `signal_name` to this process `delay` seconds after training ends: during the final evaluation."""

    def __init__(self, delay: float, signal_name: str = "SIGTERM") -> None:
        self.delay, self.signal = delay, getattr(signal, signal_name)

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        import threading

        threading.Timer(self.delay, os.kill, (os.getpid(), self.signal)).start()


class FileSizeLimitAt(L.Callback):
    """From training step `step` on, files this process writes may not grow past `max_bytes` (RLIMIT_FSIZE): a
    full disk for every file larger than that (a write past it fails with EFBIG; Python ignores SIGXFSZ)."""

    def __init__(self, step: int, max_bytes: int) -> None:
        self.step, self.max_bytes = step, max_bytes

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, resource.RLIM_INFINITY))

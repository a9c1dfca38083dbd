"""Exponential moving average of the network weights, the weights sampling and evaluation use."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from fmlab.errors import UserError


class EMA(L.Callback):
    """θ_ema ← d θ_ema + (1 − d) θ after every optimiser step, with the warm-up d = min(decay, (1 + n)/(10 + n))
    at update n so that early averages do not drag the untrained initial weights along.

    The averaged copy is saved in checkpoints (callback state) and used by `SampleLogger` and `Evaluator`.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise UserError(f"callbacks.ema.decay={decay} is invalid; it must satisfy 0 <= decay < 1")
        self.decay, self.warmup = float(decay), warmup
        self.net: nn.Module | None = None
        self.num_updates = 0
        self._pending_state: dict[str, Any] | None = None
        self._params: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._buffers: list[tuple[Tensor, Tensor]] = []

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.net is None:
            self.net = copy.deepcopy(pl_module.net).requires_grad_(False).eval()
        if self._pending_state is not None:
            self.net.load_state_dict(self._pending_state)
            self._pending_state = None
        self.net.to(pl_module.device)
        # the tensors are fixed for the whole fit (loading and moving keep them): list them once, not every step
        self._params = (list(self.net.parameters()), list(pl_module.net.parameters()))
        self._buffers = list(zip(self.net.buffers(), pl_module.net.buffers(), strict=True))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        ema_params, params = self._params
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
        for ema_buffer, buffer in self._buffers:
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        weights = None if self.net is None else {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self._pending_state = state_dict["weights"]


def sampling_net(trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
    """The net to sample and evaluate with: the EMA copy when an `EMA` callback runs, else the trained net."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and callback.net is not None:
            return callback.net
    return pl_module.net

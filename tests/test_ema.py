"""The EMA callback against its recursion, computed by hand from the trained weights after every step."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fmlab.callbacks import EMA


class TinyRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WeightsAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.snapshots: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.snapshots.append([p.detach().clone() for p in pl_module.net.parameters()])


def test_ema_follows_its_warm_up_recursion_and_copies_buffers() -> None:
    torch.manual_seed(0)
    module = TinyRegression()
    initial = [p.detach().clone() for p in copy.deepcopy(module.net).parameters()]
    data = DataLoader(TensorDataset(torch.randn(64, 2), torch.randn(64, 1)), batch_size=8)
    recorder, ema = WeightsAfterEachStep(), EMA(decay=0.9)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        callbacks=[recorder, ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)

    expected = initial
    for n, weights in enumerate(recorder.snapshots):
        decay = min(0.9, (1 + n) / (10 + n))  # the warm-up: 0.1, 0.18, ... then 0.9 from n = 80 on
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    assert len(recorder.snapshots) == ema.num_updates == 20
    for averaged, value in zip(ema.net.parameters(), expected, strict=True):
        torch.testing.assert_close(averaged, value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(next(ema.net.parameters()), next(module.net.parameters()))  # an average, not a copy
    for averaged, buffer in zip(ema.net.buffers(), module.net.buffers(), strict=True):
        assert torch.equal(averaged, buffer)  # running statistics are copied, not averaged

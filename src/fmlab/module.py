"""FlowModule: the training system. It computes the loss and configures optimisers; callbacks do the rest."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn

from fmlab.conditioning import drop_to_null
from fmlab.errors import UserError
from fmlab.objectives import Objective, VelocityField
from fmlab.paths.path import AffinePath
from fmlab.paths.time_samplers import TimeSampler, UniformTime

if TYPE_CHECKING:
    from omegaconf import DictConfig

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# the seed of every validation batch's draws (offset by the batch index)
VALIDATION_SEED = 20_240_101
SchedulerFactory = Callable[..., Any]


def net_parameters(net: nn.Module) -> int:
    """How many numbers the net learns."""
    return sum(p.numel() for p in net.parameters())


class FlowModule(L.LightningModule):
    """net + path + objective. One training step:

    (x0, x1) a batch, already coupled by the datamodule (the run's `coupling` reads only the batch, so it runs in
    the data pipeline, ahead of the step), t ~ time_sampler (uniform on [t_min, t_max] by default),
    loss = objective(net, path, t, x0, x1), e.g. for FM
    E ‖v_θ(t, α_t x1 + σ_t x0) − (α̇_t x1 + σ̇_t x0)‖² (seed 001, §3.2).

    Class-conditional batches (x0, x1, y) train v_θ(t, x, y'), where y' is y replaced by the null class ∅ with
    probability `p_uncond` (classifier-free guidance's label dropout, Ho & Salimans 2022).
    """

    def __init__(
        self,
        net: nn.Module,
        path: AffinePath,
        objective: Objective,
        time_sampler: TimeSampler | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        p_uncond: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.path = path
        self.objective = objective
        self.time_sampler = time_sampler or UniformTime()
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        if not 0.0 <= p_uncond < 1.0:
            raise UserError(f"conditioning.p_uncond={p_uncond} must satisfy 0 <= p_uncond < 1")
        self.p_uncond = float(p_uncond)
        self._loss_sum = torch.zeros(())
        self._loss_count = 0
        self.logged_loss: float | None = None  # the mean loss of the last logged window

    @classmethod
    def from_config(cls, cfg: DictConfig, make: Callable[[str], Any] | None = None) -> FlowModule:
        """The system a run's config describes: `net` (with the `performance` switches), `path`, `objective`,
        `time_sampler`, `optimizer`, `scheduler` (the `coupling` goes to the datamodule). `make(key)` builds the
        config node at `key` (default: Hydra's `instantiate`; `fmlab.build` passes one that names a bad key)."""
        from hydra.utils import instantiate

        from fmlab.nets.performance import configure_throughput

        make = make or (lambda key: instantiate(cfg[key]))
        net = configure_throughput(make("net"), **(cfg.get("performance") or {}))
        return cls(
            net=net,
            path=make("path"),
            objective=make("objective"),
            time_sampler=make("time_sampler") if cfg.get("time_sampler") else None,
            optimizer=make("optimizer"),
            scheduler=make("scheduler") if cfg.get("scheduler") else None,
            scheduler_interval=cfg.scheduler_interval,
            p_uncond=float((cfg.get("conditioning") or {}).get("p_uncond", 0.0)),
        )

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.net(t, x)

    def velocity_field(self, net: nn.Module | None = None) -> VelocityField:
        """The PF-ODE drift of this method, for `net` (default: the trained net; callbacks pass the EMA copy)."""
        return VelocityField(net if net is not None else self.net, self.objective, self.path, self.p_uncond > 0)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = self._loss(*batch, drop_labels=True)
        self._log_running_loss(loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The training loss on a validation batch (datamodules with a val split), logged as `val/loss`: what a
        best-val-loss checkpoint monitors. Its random draws (t, noise) are fixed per batch, and the datamodule couples
        the validation pairs once, so successive validations differ only by the weights; the training streams are
        left as they were."""
        devices = [batch[1].device] if batch[1].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(VALIDATION_SEED + batch_idx)
            loss = self._loss(*batch)
        self.log("val/loss", loss, on_epoch=True, batch_size=batch[1].shape[0], sync_dist=True)
        return loss

    def _loss(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None, drop_labels: bool = False) -> Tensor:
        """t ~ time_sampler, then the objective's loss, weighted per sample when the time sampler asks for it; with
        labels, the net is conditioned on them (in training, after label dropout)."""
        t = self.time_sampler.sample(self.path, x1.shape[0], device=x1.device, dtype=x1.dtype)
        noise = torch.randn_like(x1) if self.path.has_smoothing else None
        weights = self.time_sampler.weights(self.path, t)
        net: Callable[[Tensor, Tensor], Tensor] = self.net
        if labels is not None:
            if drop_labels:
                labels = drop_to_null(labels, self.p_uncond, getattr(self.net, "num_classes", 0))
            net = partial(self.net, labels=labels)
        return self.objective.loss(net, self.path, t, x0, x1, noise, weights)

    def _log_running_loss(self, loss: Tensor) -> None:
        """Log the mean loss since the last logging step, only on the steps the loggers write.

        A `self.log` on every step costs more than the whole step of a small 2D model.
        """
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach()
        self._loss_count += 1
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if every and (self.global_step + 1) % every == 0:
            mean = self._loss_sum / self._loss_count
            self.log("train/loss", mean, prog_bar=True, batch_size=1)
            self.logged_loss = float(mean)
            self._loss_sum = torch.zeros((), device=loss.device)
            self._loss_count = 0

    def train_loss(self) -> float | None:
        """What metrics.json reports as the training loss: the mean of the last logged window, or of every step so
        far when the run took fewer steps than one window (None before any step)."""
        if self.logged_loss is not None:
            return self.logged_loss
        return float(self._loss_sum / self._loss_count) if self._loss_count else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the running loss of the steps since the last logged one, so a run resumed between two logging steps
        logs the same mean as an unbroken run, and the last logged mean, which a resumed run reports."""
        checkpoint["running_loss"] = {"sum": self._loss_sum.detach().cpu().clone(), "count": self._loss_count,
                                      "logged": self.logged_loss}  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        running = checkpoint.get("running_loss")
        if running is not None:
            self._loss_sum, self._loss_count = running["sum"].clone(), int(running["count"])
            self.logged_loss = running.get("logged")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

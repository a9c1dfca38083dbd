"""SampleLogger: a picture of what the model generates (`fmlab.plotting`): a 2D scatter with a few ODE trajectories
over the data, or an image grid."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from fmlab.callbacks.ema import sampling_net
from fmlab.io import save_figure, write_atomically
from fmlab.plotting import plot_2d_samples, plot_image_grid
from fmlab.samplers import Sampler, sample


class SampleLogger(L.Callback):
    """Every `every_n_steps` (0: only at the end of training) draws samples from a fixed source batch (at most 256
    images) with the EMA weights, saves a PNG under `<output_dir>/samples/` and sends it to every logger that takes
    images. The last one is also `samples.png`. A class-conditional run's image grid has one row per class (the
    first 16 classes), guided with `guidance_scale`."""

    def __init__(
        self,
        solver: Sampler,
        output_dir: str,
        every_n_steps: int = 0,
        num_samples: int = 1000,
        num_trajectories: int = 24,
        num_trajectory_times: int = 50,
        guidance_scale: float = 0.0,
    ) -> None:
        self.solver = solver
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.num_samples, self.num_trajectories = num_samples, num_trajectories
        self.num_trajectory_times = num_trajectory_times
        self.guidance_scale = float(guidance_scale)
        self.saved: list[Path] = []

    def log_samples(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> Path | None:
        datamodule = trainer.datamodule
        was_training = module.training
        module.eval()
        try:
            is_image = datamodule.is_image
            field = module.velocity_field(sampling_net(trainer, module))
            count, columns, labels = min(self.num_samples, 256) if is_image else self.num_samples, 16, None
            if field.num_classes and is_image:  # row k: class k
                classes = min(field.num_classes, 16)
                columns = min(16, 256 // classes)
                count = classes * columns
                labels = torch.arange(count, device=module.device) // columns
            elif field.num_classes:  # every class equally often
                labels = torch.arange(count, device=module.device) % field.num_classes
            elif field.condition_dim:  # the conditions of the held-out points drawn beside the samples
                labels = datamodule.held_out_conditions(count).to(module.device)
            x0 = datamodule.eval_source(count)
            trajectory_times = 0 if is_image else self.num_trajectory_times
            with field.conditioned_on(labels, self.guidance_scale if labels is not None else 0.0):
                result = sample(field, x0.to(module.device), self.solver, trajectory_times)
        finally:
            module.train(was_training)
        if not trainer.is_global_zero:
            return None
        title = f"step {trainer.global_step}: {len(result.samples)} samples, NFE {result.nfe}"
        if labels is not None:
            title += f", one {'row' if datamodule.is_image else 'colour'} per class, guidance {self.guidance_scale:g}"
        if datamodule.is_image:
            fig = plot_image_grid(result.samples, title, columns)
        else:
            fig = plot_2d_samples(datamodule.held_out(self.num_samples), result, self.num_trajectories, title)
        target = self.output_dir / "samples" / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, target)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(target)], step=trainer.global_step)
        self.saved.append(target)
        return target

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module, f"step{trainer.global_step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = self.log_samples(trainer, pl_module, f"step{trainer.global_step:07d}")
        if final is not None:
            write_atomically(self.output_dir / "samples.png", final.read_bytes())

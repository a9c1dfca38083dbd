"""SampleLogger: a picture of what the model generates: a 2D scatter with a few ODE trajectories over the data, or
an image grid."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt  # no backend forced: headless runs get Agg, notebooks their inline backend
import torch
from torch import Tensor

from fmlab.callbacks.ema import sampling_net
from fmlab.runs import write_atomically
from fmlab.sampling import ODEResult, ODESolver, sample


def plot_2d_samples(data: Tensor, result: ODEResult, num_trajectories: int, title: str):
    """Held-out data (grey), generated samples (blue) and `num_trajectories` ODE paths from source (black) on."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.scatter(data[:, 0], data[:, 1], s=2, c="0.7", label="data")
    ax.scatter(result.samples[:, 0], result.samples[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples")
    if result.trajectory is not None and num_trajectories > 0:
        paths = result.trajectory[:, :num_trajectories].cpu()
        ax.plot(paths[..., 0], paths[..., 1], c="olive", lw=0.6, alpha=0.8)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=6, c="black", label="source")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    fig.tight_layout()
    return fig


def plot_image_grid(images: Tensor, title: str, columns: int = 16):
    """A grid of [-1, 1] images (grey or RGB)."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().cpu().clamp(-1, 1), nrow=columns, normalize=True, value_range=(-1, 1), padding=1)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[1] / grid.shape[2] + 0.4), dpi=120)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


class SampleLogger(L.Callback):
    """Every `every_n_steps` (0: only at the end of training) draws samples from a fixed source batch (at most 256
    images) with the EMA weights, saves a PNG under `<output_dir>/samples/` and sends it to every logger that takes
    images. The last one is also `samples.png`. A class-conditional run's image grid has one row per class (the
    first 16 classes), guided with `guidance_scale`."""

    def __init__(
        self,
        solver: ODESolver,
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
        fig.savefig(target)
        plt.close(fig)
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

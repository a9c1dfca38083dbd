"""Every picture fmlab draws: 2D sample scatters with ODE trajectories, image grids, quality against NFE and against
the guidance scale. Each returns its figure or saves it whole (`fmlab.io.save_figure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # no backend forced: headless runs get Agg, notebooks their inline backend
from torch import Tensor

from fmlab.io import save_figure


def plot_2d_samples(data: Tensor, result: Any, num_trajectories: int, title: str):
    """Held-out data (grey), generated samples (blue) and `num_trajectories` ODE paths from source (black) on.
    `result` is a `fmlab.samplers.SampleResult` (its `trajectory` drawn when there is one)."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.scatter(data[:, 0], data[:, 1], s=2, c="0.7", label="data")
    samples = result.samples.cpu()
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples")
    if result.trajectory is not None and num_trajectories > 0:
        paths = result.trajectory[:, :num_trajectories].cpu()
        ax.plot(paths[..., 0], paths[..., 1], c="olive", lw=0.6, alpha=0.8)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=6, c="black", label="source")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    fig.tight_layout()
    return fig


def plot_2d_sample_panels(data: Tensor, panels: list[tuple[str, Tensor]], target: Path) -> Path:
    """Several titled 2D sample scatters side by side over the same held-out data (grey), saved to `target`."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), dpi=120, sharex=True, sharey=True)
    for ax, (title, samples) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        ax.scatter(data[:, 0].cpu(), data[:, 1].cpu(), s=1, c="0.75")
        ax.scatter(samples[:, 0].cpu(), samples[:, 1].cpu(), s=1, c="tab:blue", alpha=0.6)
        ax.set_title(title, fontsize=8)
        ax.set_aspect("equal")
    fig.tight_layout()
    return save_figure(fig, target)


def image_grid(images: Tensor, columns: int = 16) -> Tensor:
    """[-1, 1] images tiled into one (C, H, W) picture in [0, 1], `columns` per row."""
    from torchvision.utils import make_grid

    return make_grid(images.detach().cpu().clamp(-1, 1), nrow=columns, normalize=True, value_range=(-1, 1), padding=1)


def plot_image_grid(images: Tensor, title: str, columns: int = 16):
    """A grid of [-1, 1] images (grey or RGB)."""
    grid = image_grid(images, columns)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[1] / grid.shape[2] + 0.4), dpi=120)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_image_grids(panels: list[tuple[str, Tensor]], target: Path, columns: int = 8) -> Path:
    """Several titled image grids side by side (e.g. one per reflow stage), saved to `target`."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), dpi=120)
    for ax, (title, images) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        ax.imshow(image_grid(images, columns).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return save_figure(fig, target)


def plot_nfe_sweep(rows: list[dict[str, Any]], target: Path, subject: str = "") -> Path:
    """Quality (FID or W2) against NFE, one line per sampler, log-log."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["nfe"], r["value"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=method)
    metric = rows[0]["metric"].upper()
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=metric, title=f"{metric} against NFE {subject}".strip())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, target)


def solver_label(row: dict[str, Any]) -> str:
    if row["num_steps"] != "":
        return f"{row['method']} {row['num_steps']} steps"
    return f"{row['method']} {row['tolerance']:g}"


def plot_guidance_sweep(rows: list[dict[str, Any]], target: Path, subject: str = "") -> Path:
    """The metric against w (left) and, where measured, the class accuracy against w (right), one line per solver."""
    with_accuracy = any(r["class_accuracy"] != "" for r in rows)
    fig, axes = plt.subplots(1, 2 if with_accuracy else 1, figsize=(10 if with_accuracy else 5.5, 4), dpi=120)
    axes = list(axes) if with_accuracy else [axes]
    metric = rows[0]["metric"].upper()
    for label in dict.fromkeys(solver_label(r) for r in rows):
        mine = sorted((r for r in rows if solver_label(r) == label), key=lambda r: r["guidance_scale"])
        scales = [r["guidance_scale"] for r in mine]
        axes[0].plot(scales, [r["value"] for r in mine], marker="o", ms=3, label=label)
        if with_accuracy:
            axes[1].plot(scales, [r["class_accuracy"] for r in mine], marker="o", ms=3, label=label)
    axes[0].set(xlabel="guidance scale w", ylabel=metric, title=f"{metric} against guidance {subject}".strip())
    if with_accuracy:
        axes[1].set(xlabel="guidance scale w", ylabel="class accuracy", title="digits classifier agrees with the class")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, target)

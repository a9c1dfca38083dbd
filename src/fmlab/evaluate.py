"""Evaluation entry point: `python -m fmlab.evaluate ckpt_path=RUN/checkpoints/last.ckpt [solver=...] [eval.*=...]`.

Rebuilds the run from the config stored in the checkpoint, evaluates its EMA weights with the `Evaluator` (on every
rank of `trainer=ddp_cpu|ddp`, through Lightning Fabric) and writes metrics.json into this job's run dir.
`sweep=nfe` evaluates the checkpoint across solvers and step counts instead and writes nfe_sweep.csv and
nfe_sweep.png (sample quality against NFE, as in Lipman et al. 2023, Fig. 7).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fmlab.utils.cli import CONFIG_DIR, run_entry_point
from fmlab.utils.errors import UserError, exit_on_user_error, first_detail
from fmlab.utils.run_files import CHECKPOINT_KEY, load_checkpoint, run_checkpoint


def run_config(checkpoint: dict[str, Any], path: str | Path) -> DictConfig:
    """The training config of a checkpoint: stored in it, or (older files) the run dir's .hydra/config.yaml."""
    stored = checkpoint.get(CHECKPOINT_KEY, {}).get("config")
    if stored is not None:
        return OmegaConf.create(stored)
    saved = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
    if saved.is_file():
        return OmegaConf.load(saved)
    raise UserError(f"ckpt_path={path} carries no fmlab config and {saved} does not exist; cannot rebuild the run")


def ema_weights(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for name, state in checkpoint.get("callbacks", {}).items():
        if name.startswith("EMA") and state.get("weights") is not None:
            return state["weights"]
    return None


def restore(ckpt_path: str | Path, use_ema: bool = True, num_eval_samples: int | None = None):
    """(module, datamodule, sampling net, training config, checkpoint step) of a saved run."""
    import copy

    from hydra.utils import instantiate

    from fmlab.train import build_module

    if Path(ckpt_path).is_dir():  # a run dir: its last checkpoint
        ckpt_path = run_checkpoint(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    train_cfg = run_config(checkpoint, ckpt_path)
    if num_eval_samples is not None:
        train_cfg.data.num_eval_samples = num_eval_samples
    module = build_module(train_cfg)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise UserError(
            f"ckpt_path={ckpt_path} does not match the net its config builds: {first_detail(error)}"
        ) from None
    net = module.net
    weights = ema_weights(checkpoint) if use_ema else None
    if weights is not None:
        net = copy.deepcopy(module.net)
        net.load_state_dict(weights)
    return module, instantiate(train_cfg.data), net, train_cfg, int(checkpoint.get("global_step", 0))


def build_solvers(sweep: DictConfig) -> list[Any]:
    from fmlab.sampling import ODESolver

    solvers = [ODESolver(m, num_steps=n) for m in sweep.fixed_step_methods for n in sweep.num_steps]
    solvers += [ODESolver(m, atol=tol, rtol=tol) for m in sweep.adaptive_methods for tol in sweep.tolerances]
    return solvers


def nfe_sweep(cfg: DictConfig, module, datamodule, net, ranks, output_dir: Path, subject: str = "") -> list[dict]:
    """Sample quality against NFE for every solver of `cfg.sweep`; rows also go to nfe_sweep.csv / .png."""
    rows = []
    # one evaluator for the whole sweep: its FID extractor and reference statistics are built once
    evaluator = instantiate_evaluator(cfg, num_draws=cfg.sweep.num_draws, nll_samples=0)
    for solver in build_solvers(cfg.sweep):
        evaluator.solver = solver
        results = evaluator.evaluate(module, datamodule, net, ranks)
        metric = "fid" if "fid" in results else "w2"
        rows.append(
            {
                "method": solver.method,
                "num_steps": solver.num_steps if not solver.is_adaptive else "",
                "tolerance": solver.atol if solver.is_adaptive else "",
                "nfe": results["nfe"],
                "metric": metric,
                "value": results[metric],
                "seconds": results["eval_seconds"],
            }
        )
    if ranks.rank == 0:
        write_rows(output_dir / "nfe_sweep.csv", rows)
        plot_nfe_sweep(rows, output_dir / "nfe_sweep.png", subject)
    return rows


def write_rows(target: Path, rows: list[dict[str, Any]]) -> None:
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_nfe_sweep(rows: list[dict[str, Any]], target: Path, subject: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["nfe"], r["value"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=method)
    metric = rows[0]["metric"].upper()
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=metric, title=f"{metric} against NFE {subject}".strip())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def instantiate_evaluator(cfg: DictConfig, **overrides: Any):
    """The `Evaluator` that `cfg.eval` describes (the same node the training callback uses)."""
    from hydra.utils import instantiate

    return instantiate(cfg.eval, **overrides)


def make_fabric(trainer_cfg: DictConfig):
    import lightning as L

    return L.Fabric(
        accelerator=trainer_cfg.get("accelerator", "cpu"),
        devices=trainer_cfg.get("devices", 1),
        strategy=trainer_cfg.get("strategy") or "auto",
        num_nodes=trainer_cfg.get("num_nodes", 1),
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` as `cfg` says; returns the metrics (also in <output_dir>/metrics.json)."""
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required: python -m fmlab.evaluate ckpt_path=<run dir>/checkpoints/last.ckpt")
    import torch

    from fmlab.distributed import Ranks, end_process_group
    from fmlab.utils.run_files import write_metrics

    started = time.perf_counter()
    module, datamodule, net, train_cfg, step = restore(cfg.ckpt_path, cfg.use_ema, cfg.eval.num_samples)
    if cfg.eval.num_samples is None:  # default: as many samples as the run evaluated with
        cfg.eval.num_samples = train_cfg.data.num_eval_samples
    # a bad eval.* or solver.* value, or a solver that does not fit the path, fails here, before any process starts
    instantiate_evaluator(cfg).solver.check_path(module.path)
    fabric = make_fabric(cfg.trainer)
    fabric.launch()
    torch.manual_seed(cfg.seed)
    module, net = module.to(fabric.device), net.to(fabric.device)
    ranks = Ranks.of_fabric(fabric)
    output_dir = Path(cfg.paths.output_dir)
    metrics: dict[str, Any] = {
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "checkpoint_step": step,
        "method": train_cfg.method.name,
        "data": train_cfg.data.get("target"),
        "seed": train_cfg.seed,
        "ema": bool(cfg.use_ema),
    }
    if cfg.get("sweep"):
        subject = f"({metrics['method']} on {metrics['data']}, step {step})"
        metrics["nfe_sweep"] = nfe_sweep(cfg, module, datamodule, net, ranks, output_dir, subject)
    else:
        metrics.update(instantiate_evaluator(cfg).evaluate(module, datamodule, net, ranks))
    metrics["wall_seconds"] = time.perf_counter() - started
    if ranks.rank == 0:
        write_metrics(output_dir, metrics)
    end_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    run_entry_point(hydra_main, "evaluate")


if __name__ == "__main__":
    main()

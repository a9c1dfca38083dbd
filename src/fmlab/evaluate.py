"""Evaluation entry point: `python -m fmlab.evaluate ckpt_path=<run dir or .ckpt> [solver=...] [eval.*=...]`.

build (`fmlab.build.build_evaluation`: the run and the evaluation, checked before the run dir exists) → launch the
processes (Lightning Fabric) → evaluate (the engine in `fmlab.evaluation`) → write metrics.json in this job's run
dir. `sweep=nfe` evaluates the checkpoint across samplers and step counts instead and writes nfe_sweep.csv and
nfe_sweep.png (quality against NFE, Lipman et al. 2023, Fig. 7); `sweep=guidance` across classifier-free guidance
scales (guidance_sweep.csv and .png).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fmlab.build import build_evaluation, preflight_evaluation
from fmlab.cli import CONFIG_PATH, quiet_third_party_output, run_entry_point
from fmlab.errors import exit_on_user_error


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` as `cfg` says; returns the metrics (also in <output_dir>/metrics.json). Raises
    `UserError` on bad input."""
    import torch

    from fmlab.distributed import Ranks, end_process_group, make_fabric
    from fmlab.evaluation import guidance_sweep, nfe_sweep
    from fmlab.io import write_csv
    from fmlab.plotting import plot_guidance_sweep, plot_nfe_sweep
    from fmlab.results import summary_lines, training_card
    from fmlab.runs import write_metrics

    if (cfg.get("extras") or {}).get("ignore_warnings", True):
        quiet_third_party_output()
    started = time.perf_counter()
    built = build_evaluation(cfg)
    run, evaluator = built.run, built.evaluator
    fabric = make_fabric(cfg.trainer)
    fabric.launch()
    torch.manual_seed(cfg.seed)
    run.module, run.net = run.module.to(fabric.device), run.net.to(fabric.device)
    ranks = Ranks.of_fabric(fabric)
    output_dir = Path(cfg.paths.output_dir)
    metrics: dict[str, Any] = {
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "checkpoint_step": run.step,
        "method": run.config.method.name,
        "data": run.config.data.get("target"),
        "seed": run.config.seed,
        "ema": bool(cfg.use_ema),
    }
    if built.sweep_kind is not None:
        evaluator.num_draws, evaluator.nll_samples = cfg.sweep.num_draws, 0
        subject = f"({metrics['method']} on {metrics['data']}, step {run.step})"
        field = run.velocity_field()
        if built.sweep_kind == "guidance":
            scales = list(cfg.sweep.guidance_scales)
            rows = guidance_sweep(evaluator, field, run.datamodule, built.samplers, scales, ranks)
            plot = plot_guidance_sweep
        else:
            rows = nfe_sweep(evaluator, field, run.datamodule, built.samplers, ranks)
            plot = plot_nfe_sweep
        if ranks.rank == 0:
            write_csv(output_dir / f"{built.sweep_kind}_sweep.csv", rows)
            plot(rows, output_dir / f"{built.sweep_kind}_sweep.png", subject)
        metrics[f"{built.sweep_kind}_sweep"] = rows
    else:
        metrics.update(evaluator.evaluate(run.velocity_field(), run.datamodule, ranks))
    metrics["wall_seconds"] = time.perf_counter() - started
    # this evaluation's card: the run's training as its config says, these weights, this evaluation's settings
    trained = run.config.trainer
    devices = trained.get("devices", 1)
    world = devices * trained.get("num_nodes", 1) if isinstance(devices, int) else str(devices)
    ema = run.net is not run.module.net  # the checkpoint's EMA weights were loaded
    decay = (run.config.get("callbacks") or {}).get("ema", {}).get("decay") if ema else None
    card = {**training_card(run.config, run.step, world, decay), **metrics.pop("card", {})}
    card["checkpoint"] = {"scored": metrics["ckpt_path"], "step": run.step}
    card["evaluated_weights"] = "EMA" if ema else "trained"
    metrics["card"] = card
    if ranks.rank == 0:
        write_metrics(output_dir, metrics)
        print("\n".join(summary_lines(metrics, output_dir, "evaluate")), flush=True)
    end_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    run_entry_point(hydra_main, "evaluate", preflight_evaluation)


if __name__ == "__main__":
    main()

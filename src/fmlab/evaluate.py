"""Evaluation entry point: `python -m fmlab.evaluate ckpt_path=<run dir or .ckpt> [solver=...] [eval.*=...]`.

load the run → check the solver fits its path → launch the processes (Lightning Fabric) → evaluate (the engine in
`fmlab.evaluation`) → write metrics.json in this job's run dir. `sweep=nfe` evaluates the checkpoint across solvers
and step counts instead and writes nfe_sweep.csv and nfe_sweep.png (quality against NFE, Lipman et al. 2023, Fig. 7);
`sweep=guidance` across classifier-free guidance scales (guidance_sweep.csv and .png).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fmlab.errors import UserError, choices_error, exit_on_user_error
from fmlab.utils.cli import CONFIG_PATH, run_entry_point

SWEEP_KINDS = ("nfe", "guidance")


def make_fabric(trainer_cfg: DictConfig):
    import lightning as L

    return L.Fabric(
        accelerator=trainer_cfg.get("accelerator", "cpu"),
        devices=trainer_cfg.get("devices", 1),
        strategy=trainer_cfg.get("strategy") or "auto",
        num_nodes=trainer_cfg.get("num_nodes", 1),
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` as `cfg` says; returns the metrics (also in <output_dir>/metrics.json). Raises
    `UserError` on bad input."""
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required: python -m fmlab.evaluate ckpt_path=<run dir or .ckpt file>")
    import torch
    from hydra.utils import instantiate

    from fmlab.distributed import Ranks, end_process_group
    from fmlab.evaluation import nfe_sweep, sweep_solvers
    from fmlab.evaluation.guidance_sweep import guidance_sweep, plot_guidance_sweep
    from fmlab.evaluation.nfe_sweep import plot_nfe_sweep, write_rows
    from fmlab.runs import load_run, write_metrics
    from fmlab.utils.console import quiet_third_party_output

    if (cfg.get("extras") or {}).get("ignore_warnings", True):
        quiet_third_party_output()
    started = time.perf_counter()
    run = load_run(cfg.ckpt_path, cfg.use_ema)
    if cfg.eval.num_samples is None:  # default: as many samples as the run evaluated with
        cfg.eval.num_samples = run.config.eval.num_samples
    evaluator = instantiate(cfg.eval)  # a bad eval.* or solver.* value fails here, before any process starts
    evaluator.solver.check_path(run.module.path)
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
    if cfg.get("sweep"):
        sweep = cfg.sweep
        solvers = sweep_solvers(
            sweep.fixed_step_methods,
            sweep.num_steps,
            sweep.adaptive_methods,
            sweep.tolerances,
            sweep.get("stochastic_methods", []),
            sweep.get("stochastic_num_steps", []),
        )
        evaluator.num_draws, evaluator.nll_samples = sweep.num_draws, 0
        subject = f"({metrics['method']} on {metrics['data']}, step {run.step})"
        kind = sweep.get("kind", "nfe")
        if kind not in SWEEP_KINDS:
            raise choices_error("sweep.kind", kind, SWEEP_KINDS)
        if kind == "guidance":
            scales = list(sweep.guidance_scales)
            rows = guidance_sweep(evaluator, run.velocity_field(), run.datamodule, solvers, scales, ranks)
            plot = plot_guidance_sweep
        else:
            rows = nfe_sweep(evaluator, run.velocity_field(), run.datamodule, solvers, ranks)
            plot = plot_nfe_sweep
        if ranks.rank == 0:
            write_rows(output_dir / f"{kind}_sweep.csv", rows)
            plot(rows, output_dir / f"{kind}_sweep.png", subject)
        metrics[f"{kind}_sweep"] = rows
    else:
        metrics.update(evaluator.evaluate(run.velocity_field(), run.datamodule, ranks))
    metrics["wall_seconds"] = time.perf_counter() - started
    if ranks.rank == 0:
        write_metrics(output_dir, metrics)
    end_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@exit_on_user_error
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    run_entry_point(hydra_main, "evaluate")


if __name__ == "__main__":
    main()

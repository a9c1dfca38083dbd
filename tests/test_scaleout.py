"""Scale-out from the CLI: 2-process DDP training (gloo), grid multiruns with a summary, Optuna, the SLURM launcher
config, and W&B offline runs read back from their run files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fmlab.cli import CONFIG_DIR
from tests.conftest import REPO_ROOT, run_cli
from tests.wandb_files import read_run, run_files

TINY = ["trainer.max_steps=80", "data.num_eval_samples=300", "eval.num_draws=1", "eval.nll_samples=40"]


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_two_process_ddp_training_writes_one_run_and_evaluates_like_one_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    result = run_cli("fmlab.train", "trainer=ddp_cpu", *TINY, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = metrics_of(run_dir)
    assert trained["eval_world_size"] == 2 and trained["steps"] == 80
    assert len(list(tmp_path.rglob("metrics.json"))) == 1 and len(run_files(run_dir)) == 1  # one run, one W&B run
    assert not list(tmp_path.rglob(".pl_hydra*"))
    out = tmp_path / "eval"
    result = run_cli(
        "fmlab.evaluate",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "eval.num_draws=1",
        "eval.nll_samples=40",
        f"hydra.run.dir={out}",
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = metrics_of(out)
    assert single["eval_world_size"] == 1
    for key in ("w2", "mmd", "nll", "nfe"):
        assert single[key] == pytest.approx(trained[key], rel=1e-9), key
    logged = read_run(run_files(run_dir)[0])
    assert logged.values("eval/w2") == [pytest.approx(trained["w2"], rel=1e-6)]


def test_grid_multirun_gives_each_job_its_run_dir_w_and_b_run_and_a_summary_row(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "fmlab.train", "-m", "method=fm_ot,icfm", "seed=1", *TINY, f"hydra.sweep.dir={sweep_dir}", cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert len(job_dirs) == 2
    with open(sweep_dir / "summary.csv") as handle:
        summary = {row["job"]: row for row in csv.DictReader(handle)}
    assert set(summary) == {d.name for d in job_dirs}
    groups = set()
    for job_dir in job_dirs:
        metrics = metrics_of(job_dir)
        assert float(summary[job_dir.name]["w2"]) == pytest.approx(metrics["w2"], rel=1e-12)
        assert f"seed={metrics['seed']}" in summary[job_dir.name]["overrides"]
        (run_file,) = run_files(job_dir)  # each job its own W&B run
        logged = read_run(run_file)
        groups.add(logged.run["group"])
        assert set(logged.run["tags"]) == {metrics["method"], "moons", f"seed{metrics['seed']}"}
        assert logged.config["method"]["name"] == metrics["method"] and logged.config["seed"] == metrics["seed"]
        assert logged.values("eval/w2") == [pytest.approx(metrics["w2"], rel=1e-6)]
        assert logged.values("eval/nfe") == [metrics["nfe"]]
        assert any(v > 0 for v in logged.values("train/loss"))
        assert logged.values("final_metrics/_type") == ["table-file"]
        assert logged.summary["final/w2"] == pytest.approx(metrics["w2"], rel=1e-12)
        (image,) = logged.values("samples/filenames")
        assert image[0].endswith(".png") and (run_file.parent / "files" / image[0]).stat().st_size > 1000
    assert groups == {f"sweep-{sweep_dir.name}"}


@pytest.mark.slow  # 20 s; test_config composes hparams_search=optuna in the fast suite
def test_optuna_search_reports_the_best_of_its_trials(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    result = run_cli(
        "fmlab.train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "logger=csv",
        *TINY,
        "eval.nll_samples=0",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    trials = [metrics_of(p.parent) for p in sweep_dir.glob("*/metrics.json")]
    assert len(trials) == 3
    assert best["best_value"] == pytest.approx(min(t["w2"] for t in trials), rel=1e-12)
    assert set(best["best_params"]) == {"optimizer.lr", "schedule.sigma_min", "net.width", "net.depth"}
    assert 3e-4 <= best["best_params"]["optimizer.lr"] <= 1e-2


def test_slurm_launcher_config_renders_the_job_parameters_from_the_trainer() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min == 1440
    assert (cfg.trainer.strategy, cfg.trainer.accelerator) == ("ddp", "gpu")


def test_ddp_inside_a_local_multirun_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_cli("fmlab.train", "-m", "trainer=ddp_cpu", "seed=0,1", f"hydra.sweep.dir={tmp_path}", cwd=REPO_ROOT)
    assert result.returncode == 2
    assert "cannot run inside a local multirun" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("metrics.json"))

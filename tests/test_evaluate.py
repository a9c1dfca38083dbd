"""`python -m fmlab.evaluate`: a checkpoint alone rebuilds its run; metrics equal the training-time evaluation and are
the same under 2 DDP processes (gloo) as under one; the NFE sweep; periodic evaluation; clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli

EVAL = ["eval.num_draws=2", "eval.batch_size=200", "eval.nll_samples=60"]


def train_run(run_dir: Path, *overrides: str) -> Path:
    result = run_cli(
        "fmlab.train",
        "logger=csv",
        "trainer.max_steps=300",
        "data.num_eval_samples=600",
        *EVAL,
        *overrides,
        f"hydra.run.dir={run_dir}",
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def evaluate(run_dir: Path, out: Path, *overrides: str) -> dict:
    result = run_cli(
        "fmlab.evaluate",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        *EVAL,
        *overrides,
        f"hydra.run.dir={out}",
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluating (" in result.stderr  # the progress bar over evaluation chunks
    assert f"fmlab: run dir: {out}" in result.stdout.strip().splitlines()[-2:]  # the closing summary
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        # the checkpoint watches the periodic evaluation's W2 (callback_metrics), as a user's monitor would
        "moons": train_run(
            root / "moons", "callbacks.evaluator.every_n_steps=100", "callbacks.model_checkpoint.monitor=eval/w2"
        ),
        "digits": train_run(root / "digits", "data=digits"),
    }


def test_evaluating_the_checkpoint_reproduces_the_training_time_evaluation(runs, tmp_path: Path) -> None:
    trained = json.loads((runs["moons"] / "metrics.json").read_text())
    evaluated = evaluate(runs["moons"], tmp_path / "eval")
    assert evaluated["checkpoint_step"] == trained["steps"] == 300
    for key in ("w2", "mmd", "nll", "nfe", "nll_nfe"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-9, abs=1e-12), key
    raw = evaluate(runs["moons"], tmp_path / "raw", "use_ema=false")
    assert raw["w2"] != evaluated["w2"]  # the EMA weights are what was evaluated
    # fmlab.evaluate writes its own card: the same training, this evaluation's solver and weights
    card, raw_card = evaluated["card"], raw["card"]
    assert card["solver"] == trained["card"]["solver"] and card["training_steps"] == 300
    assert card["checkpoint"]["step"] == 300 and card["checkpoint"]["scored"].endswith(".ckpt")
    assert (card["evaluated_weights"], raw_card["evaluated_weights"]) == ("EMA", "trained")
    assert card["global_batch_size"] == trained["card"]["global_batch_size"]
    assert card["reference"] == trained["card"]["reference"]


def test_a_notebook_evaluates_a_run_without_a_trainer_and_gets_the_runs_own_numbers(runs) -> None:
    from hydra.utils import instantiate

    from fmlab.runs import load_run

    run = load_run(runs["moons"])  # a run dir: its last checkpoint, the EMA weights, the stored config
    assert run.step == 300 and run.net is not run.module.net
    evaluator = instantiate(run.config.eval)  # the engine alone: no Trainer, no Fabric, no callback
    results = evaluator.evaluate(run.velocity_field(), run.datamodule)
    trained = json.loads((runs["moons"] / "metrics.json").read_text())
    for key in ("w2", "mmd", "nll", "nfe"):
        assert results[key] == pytest.approx(trained[key], rel=1e-9, abs=1e-12), key
    raw = load_run(runs["moons"], use_ema=False)
    assert raw.net is raw.module.net


def test_periodic_evaluation_logs_every_n_steps_and_at_the_end(runs) -> None:
    history = json.loads((runs["moons"] / "metrics.json").read_text())["eval_history"]
    assert [row["step"] for row in history] == [100, 200, 300]
    with open(next((runs["moons"] / "csv").rglob("metrics.csv"))) as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("eval/w2")]
    assert [int(row["step"]) for row in logged] == [100, 200, 300]
    assert float(logged[-1]["eval/w2"]) == pytest.approx(history[-1]["w2"], rel=1e-6)
    # the epoch-end checkpoint (step 300, before the final evaluation) saw the W2 of step 200 through its monitor
    import torch

    checkpoint = torch.load(runs["moons"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert state["monitor"] == "eval/w2"
    assert float(state["best_model_score"]) == pytest.approx(history[1]["w2"], rel=1e-6)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        # W2 under DDP is also checked by the 2-process training test (test_scaleout.py)
        pytest.param("moons", ("w2", "mmd", "nll"), marks=pytest.mark.slow),
        ("digits", ("fid", "nll", "bpd")),
    ],
)
def test_two_gloo_processes_give_the_one_process_metrics(runs, tmp_path: Path, name: str, keys) -> None:
    # the training-time evaluation ran in one process (and fmlab.evaluate reproduces it, tested above)
    one = json.loads((runs[name] / "metrics.json").read_text())
    two = evaluate(runs[name], tmp_path / "two", "trainer=ddp_cpu")
    assert (one["eval_world_size"], two["eval_world_size"]) == (1, 2)
    assert two["nfe"] == one["nfe"] and two["nll_nfe"] == one["nll_nfe"]
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert len(list(tmp_path.rglob("metrics.json"))) == 1  # one run dir, written once


def test_nfe_sweep_writes_quality_against_exact_nfe(runs, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    evaluate(
        runs["moons"],
        out,
        "sweep=nfe",
        "sweep.fixed_step_methods=[euler,rk4]",
        "sweep.num_steps=[1,4,32]",
        "sweep.tolerances=[1e-2,1e-5]",
        "sweep.stochastic_methods=[euler_maruyama,edm_heun]",
        "sweep.stochastic_num_steps=[9]",
    )
    with open(out / "nfe_sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    fixed = {(r["method"], int(r["num_steps"])): r for r in rows if r["num_steps"]}
    # the OT path's g² is infinite at t = 0: euler_maruyama is skipped, EDM-Heun takes 2N − 1 calls
    assert {k: float(r["nfe"]) for k, r in fixed.items()} == {
        ("edm_heun", 9): 17,
        ("euler", 1): 1,
        ("euler", 4): 4,
        ("euler", 32): 32,
        ("rk4", 1): 4,
        ("rk4", 4): 16,
        ("rk4", 32): 128,
    }
    adaptive = {float(r["tolerance"]): r for r in rows if r["tolerance"]}
    reference = float(adaptive[1e-5]["value"])
    # more steps, closer to the tight-tolerance solution; RK4 at 32 steps has converged
    assert abs(float(fixed[("euler", 32)]["value"]) - reference) < abs(float(fixed[("euler", 1)]["value"]) - reference)
    assert float(fixed[("rk4", 32)]["value"]) == pytest.approx(reference, abs=0.01)
    assert float(adaptive[1e-2]["nfe"]) < float(adaptive[1e-5]["nfe"])
    assert (out / "nfe_sweep.png").stat().st_size > 10_000


@pytest.mark.slow  # keeps `make test` inside its 10 minutes; `make test-all` runs it
def test_evaluate_errors_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "broken.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cases = {
        (): "ckpt_path is required",
        (f"ckpt_path={tmp_path / 'missing.ckpt'}",): "does not exist",
        (f"ckpt_path={garbage}",): "is not a readable checkpoint",
    }
    for args, message in cases.items():
        result = run_cli("fmlab.evaluate", *args, f"hydra.run.dir={tmp_path / 'out'}", cwd=REPO_ROOT)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1

"""The main job end to end: CLI, a fast_dev_run, a short real run, its files, and the CLI's errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fmlab.cli import quiet_stack_deprecations
from fmlab.data.toy2d import Toy2DDataModule
from fmlab.evaluation import Evaluator
from fmlab.module import FlowModule
from fmlab.paths import AffinePath, CondOT
from fmlab.samplers import ODESolver
from fmlab.train import train
from tests.conftest import REPO_ROOT, cli_error, config_choices, run_cli

METRICS_KEYS = {"w2", "w2_floor", "nfe", "train_seconds", "steps", "method", "data", "seed", "config_digest"}


def untrained_w2(cfg) -> float:
    torch.manual_seed(cfg.seed)
    module = FlowModule.from_config(cfg)
    datamodule = Toy2DDataModule(cfg.data.target, cfg.data.source, num_eval_samples=cfg.data.num_eval_samples)
    return Evaluator(ODESolver("dopri5"), cfg.data.num_eval_samples, num_draws=1).evaluate(
        module.velocity_field(), datamodule
    )["w2"]


def test_short_fm_ot_run_beats_untrained_net_and_writes_its_files(train_config, tmp_path: Path) -> None:
    cfg = train_config("logger=csv", "trainer.max_steps=1500", "data.num_eval_samples=1000")
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk.keys() >= METRICS_KEYS
    assert on_disk["w2"] == pytest.approx(metrics["w2"]) and on_disk["steps"] == 1500
    assert (on_disk["method"], on_disk["data"], on_disk["seed"]) == ("fm_ot", "moons", 0)
    assert on_disk["nfe"] >= 14 and on_disk["nfe_max"] >= on_disk["nfe"]  # dopri5: >= 2 steps of 6 + 2 start calls
    assert on_disk["w2"] == pytest.approx(sum(on_disk["w2_draws"]) / 4) and len(set(on_disk["w2_draws"])) == 4
    assert on_disk["w2"] < 0.4 * untrained_w2(cfg)
    # NLL through the PF-ODE beats N(0, I) itself (about an untrained net's flow) on the same held-out points
    held_out = Toy2DDataModule("moons", num_eval_samples=1000).held_out(250, index=5)
    source_nll = -AffinePath(CondOT()).prior_log_prob(held_out.double()).mean().item()  # N(0, I)
    assert on_disk["nll"] < source_nll - 2.0 and on_disk["nll_nfe"] > 0
    assert 0.03 < on_disk["w2_floor"] < on_disk["w2"]
    # the loss is logged as a running mean on exactly the steps the loggers write
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(49, 1500, 50))
    assert (tmp_path / "samples.png").stat().st_size > 10_000
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 1500 and any("EMA" in key for key in checkpoint["callbacks"])
    restored = FlowModule.from_config(cfg)
    restored.load_state_dict(checkpoint["state_dict"])
    assert isinstance(restored, FlowModule)


@pytest.mark.parametrize("method", ["icfm", "otcfm"])
def test_data_to_data_cfm_from_8gaussians_to_moons_learns(method: str, train_config) -> None:
    cfg = train_config(
        f"method={method}",
        "data.source=8gaussians",
        "logger=none",
        "trainer.max_steps=800",
        "data.num_eval_samples=500",
    )
    metrics = train(cfg)
    assert metrics["w2"] < 0.5 * untrained_w2(cfg)


@pytest.mark.slow  # debug=fdr composes and instantiates in test_config; this runs it end to end
def test_fast_dev_run_through_the_cli(tmp_path: Path) -> None:
    result = run_cli("fmlab.train", "debug=fdr", "logger=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["w2"] > 0


def test_default_job_leaves_config_csv_wandb_checkpoint_png_and_metrics(tmp_path: Path) -> None:
    result = run_cli("fmlab.train", "trainer.max_steps=120", "data.num_eval_samples=300", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert run_dir.name.endswith("_fm_ot_moons_seed0")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "samples.png").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 120
    assert f"fmlab: net MLP with {metrics['net_parameters']:,} parameters" in result.stdout
    assert metrics["net_parameters"] == (3 * 128 + 128) + 2 * (128 * 128 + 128) + (128 * 2 + 2)  # conf/net/mlp.yaml
    # the first ten minutes: what was run on screen (the whole config in its file), no warning a user cannot act
    # on, and the run ends with fmlab's summary as its last lines, after W&B's
    output = result.stdout + result.stderr
    assert "fmlab: groups: " in result.stdout and "method=fm_ot" in result.stdout and "├──" not in result.stdout
    assert "optimizer" in (run_dir / "config_tree.log").read_text()
    assert "validation_step" not in output and "Warning" not in output
    tail = result.stdout.strip().splitlines()[-5:]
    assert tail[0].startswith(f"fmlab: train result: W2 {metrics['w2']:.3f} ± {metrics['w2_std']:.3f} (floor ")
    assert f"fmlab: run dir: {run_dir}" in tail and f"fmlab: samples: {run_dir / 'samples.png'}" in tail
    # the result card: what these numbers were measured with
    card = metrics["card"]
    assert card["solver"] == {"method": "dopri5", "atol": 1e-5, "rtol": 1e-5, "max_nfe": 10000}
    assert (card["precision"], card["matmul_precision"], card["ema"]) == ("32-true", "highest", {"decay": 0.9995})
    assert card["checkpoint"] == {"scored": "last", "step": 120} and card["evaluated_weights"] == "EMA"
    assert (card["devices"], card["per_device_batch_size"], card["global_batch_size"]) == (1, 256, 256)
    assert card["samples_seen"] == 120 * 256 and card["reference"]["size"] == 300
    assert card["versions"]["torch"] == torch.__version__ and card["likelihood"]["solver"] == card["solver"]
    # every setting that changes the numbers, as it ran, and the card line once
    settings = card["settings"]
    assert settings["coupling"]["kind"] == "IndependentCoupling" and settings["optimizer"]["lr"] == 2e-3
    assert settings["schedule"]["kind"] == "CondOT" and settings["time_sampler"]["kind"] == "UniformTime"
    assert set(settings) == {"method", "path", "schedule", "objective", "time_sampler", "coupling", "conditioning",
                             "optimizer", "scheduler"}  # fmt: skip
    assert sum(line.startswith("fmlab: card: ") for line in output.splitlines()) == 1


# modules of the stack's packages, and modules outside it (a user's, fmlab's, names that only share a prefix)
STACK_MODULES = ["torch.jit._script", "torch", "lightning.pytorch.trainer", "torchmetrics.image.fid", "numpy.core"]
OTHER_MODULES = ["my_project.nets", "fmlab.nets.unet", "torchy", "scipyx.stats"]
DEPRECATIONS = [DeprecationWarning, FutureWarning, PendingDeprecationWarning]


def test_deprecations_raised_inside_the_stack_are_quiet_and_those_of_any_other_module_show() -> None:
    """What a run hides is decided by where a deprecation is raised, not by a list of known messages: messages
    nobody listed, from any of the stack's packages, are hidden; the same from any other module still show, as does
    any other kind of warning from the stack."""
    raised = [(m, c) for m in STACK_MODULES + OTHER_MODULES for c in DEPRECATIONS]
    raised += [("torch.utils.data", UserWarning), ("lightning.pytorch", RuntimeWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_stack_deprecations()
        for module, category in raised:
            warnings.warn_explicit(f"{module} {category.__name__}: x is deprecated", category, "file.py", 1, module)
    shown = {str(w.message).split(":")[0] for w in caught}
    assert shown == {f"{m} {c.__name__}" for m, c in raised if m not in STACK_MODULES or c not in DEPRECATIONS}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data=nope", f"data=nope is not a valid choice; choose one of: {config_choices('data')}"),
        ("method=nope", f"method=nope is not a valid choice; choose one of: {config_choices('method')}"),
        ("trainer.max_steps=-1", "trainer.max_steps=-1 is invalid; it must be a positive integer"),
        ("schedule.sigma_min=0", "schedule.sigma_min=0 is invalid; it must satisfy 0 < sigma_min < 1"),
        ("scheduler=nope", f"scheduler=nope is not a valid choice; choose one of: {config_choices('scheduler')}"),
    ],
)
def test_bad_overrides_end_with_one_line_naming_value_and_choices(
    override: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # the choices are read from conf/, so a new option does not break the test while a missing one does. A bad
    # choice ends before torch is imported, so it runs as a real process; a bad value needs the built parts, so it
    # runs the same checks in this process (a real process for a bad value: test_reliability)
    run_dir = tmp_path / "run"
    if "=nope" in override:
        result = run_cli("fmlab.train", override, "logger=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        status, err = result.returncode, result.stderr
    else:
        status, _, err = cli_error("train", [override, "logger=none", f"hydra.run.dir={run_dir}"], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmlab: error: ") and lines[0].endswith(expected), err
    assert not run_dir.exists()


def test_entry_points_check_a_command_before_importing_torch() -> None:
    # what makes a mistyped option end at once: the entry points import torch (and Lightning) only to build a run
    entry_points = "import sys, fmlab.train, fmlab.evaluate, fmlab.table"
    code = f"{entry_points}; print(sorted({{'torch', 'lightning'}} & sys.modules.keys()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_repo_root_is_where_the_configs_live() -> None:
    assert (REPO_ROOT / "conf" / "train.yaml").is_file()

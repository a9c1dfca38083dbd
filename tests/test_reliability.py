"""Nothing lost, nothing silently wrong: bad input ends in one line and leaves an existing run dir as it was; a
finished run resumed only evaluates; SIGTERM during the final evaluation, concurrent runs, a full disk and a diverged
model each end the way the README's reliability section says."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import pickle
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from fmlab.data.images import DigitsDataModule, MNISTDataModule
from fmlab.data.toy2d import Toy2DDataModule
from fmlab.errors import UserError
from fmlab.evaluation import Evaluator
from fmlab.metrics.distances import mmd_rbf, wasserstein2
from fmlab.module import FlowModule
from fmlab.objectives import VelocityObjective
from fmlab.paths import CondOT
from fmlab.paths.path import AffinePath
from fmlab.results import format_cell, mean_std
from fmlab.runs import lock_run_dir, optimized_value, write_metrics
from fmlab.samplers import ODESolver, SolverError
from tests.conftest import REPO_ROOT, cli_env, cli_error, config_choices, run_cli, start_cli

# 2 epochs of 100 steps; checkpoints at 100 and 200
RUN = [
    "trainer.max_steps=200",
    "data.batches_per_epoch=100",
    "data.num_eval_samples=300",
    "eval.num_draws=2",
    "eval.nll_samples=40",
    "trainer.deterministic=true",
    "logger=csv",
]


def tree_digest(directory: Path) -> dict[str, str]:
    """Every file below `directory` (but the lock file) and its SHA-256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".fmlab.lock"
    }


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def loss_history(run_dir: Path) -> list[tuple[int, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("fmlab.train", *RUN, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def corrupt_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"labels": [0]}))  # a pickle without b"data"
    return folder / "data_batch_1"


def corrupt_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNISTDataModule.files:
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"x")
    return raw / "train-images-idx3-ubyte"  # says 2 images of 28x28, holds 1 byte


def test_bad_inputs_end_in_one_line_and_leave_an_existing_run_dir_as_it_was(finished: Path, tmp_path: Path) -> None:
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()

    def new(name: str) -> str:  # a run dir of its own for each case that gets past the checks (they run at once)
        return f"hydra.run.dir={tmp_path / name}"

    cifar, mnist = corrupt_cifar10(tmp_path / "cifar"), corrupt_mnist(tmp_path / "mnist")
    resume = f"ckpt_path={finished}"
    # each a real process, as a user runs it (every other kind of bad value: the in-process cases below)
    cases = [  # (entry point, arguments, what the one line must name)
        ("train", [resume, "optimizer.lr=-1"], "optimizer.lr=-1 is invalid"),
        ("train", [resume, "trainer.max_steps=400"], "scheduler.T_max: 200 in the checkpoint, 400 now"),
        ("train", [f"hydra.run.dir={finished}", *RUN], f"hydra.run.dir={finished} already holds a run"),
        ("train", ["data=cifar10", f"data.data_dir={tmp_path / 'cifar'}", new("c")], f"{cifar} is not a valid file"),
        ("train", ["data=mnist", f"data.data_dir={tmp_path / 'mnist'}", new("m")], f"{mnist} is not a valid file"),
        (
            "evaluate",
            [f"ckpt_path={empty_run}", new("e1")],
            f"ckpt_path={empty_run} is a directory without checkpoints",
        ),
        ("table", [f"sweep_dir={tmp_path / 'table'}"], f"table is required; choose one of: {config_choices('table')}"),
    ]
    before = tree_digest(finished)

    def run(case: tuple[str, list[str], str]) -> subprocess.CompletedProcess:
        return run_cli(f"fmlab.{case[0]}", *case[1], cwd=tmp_path)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, cases))
    for (entry, args, expected), result in zip(cases, results, strict=True):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (entry, args, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("fmlab: error: "), (entry, args, result.stderr[-2000:])
        assert expected in lines[0], (entry, args, lines[0])
        assert "Traceback" not in result.stdout + result.stderr
    assert tree_digest(finished) == before


def test_resuming_a_finished_run_only_evaluates_and_keeps_its_results(finished: Path, tmp_path: Path) -> None:
    before, history = metrics_of(finished), loss_history(finished)
    result = run_cli("fmlab.train", f"ckpt_path={finished}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished training (step 200); evaluating it" in result.stdout
    after = metrics_of(finished)
    assert after.keys() >= before.keys() and after["steps"] == 200
    for key in ("w2", "mmd", "nll", "nfe", "nll_nfe", "train_loss"):
        assert after[key] == pytest.approx(before[key], rel=1e-9), key
    assert after["config_digest"] == before["config_digest"]  # the same run
    assert loss_history(finished) == history  # the loss history stays; nothing trained, nothing logged again


def test_metrics_json_only_grows(tmp_path: Path) -> None:
    write_metrics(tmp_path, {"w2": 0.2, "steps": 100, "nll": 1.5})
    write_metrics(tmp_path, {"steps": 100, "eval_error": "cap"})
    assert metrics_of(tmp_path) == {"w2": 0.2, "steps": 100, "nll": 1.5, "eval_error": "cap"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


@pytest.mark.slow  # keeps make test inside its 10 minutes (19 s: a training run, a kill and a resume)
def test_sigterm_during_the_final_evaluation_exits_143_and_the_resumed_run_evaluates(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # a long final evaluation (16 draws of 2,000 dopri5 samples); the run signals itself 1 s after training
    slow_eval = ["data.num_eval_samples=2000", "eval.num_draws=16"]
    signal_late = "+callbacks.signal={_target_: tests.signals.SignalAfterTraining, delay: 1.0}"
    args = [*RUN, *slow_eval, "callbacks.sample_logger=null", f"hydra.run.dir={run_dir}"]
    killed = run_cli("fmlab.train", *args, signal_late, cwd=REPO_ROOT)
    # 143 and no metrics.json: it left during the evaluation (an ignored signal ends in 0 with metrics written)
    assert killed.returncode == 143, killed.stderr[-3000:]
    assert "fmlab: SIGTERM" in killed.stdout and "is kept; resume with ckpt_path=" in killed.stdout
    assert not (run_dir / "metrics.json").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 200
    resumed = run_cli("fmlab.train", f"ckpt_path={run_dir}", "eval.num_draws=1", cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = metrics_of(run_dir)
    assert metrics["steps"] == 200 and math.isfinite(metrics["w2"]) and not metrics["diverged"]


def test_a_second_run_in_a_held_run_dir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    forever = ["trainer.max_steps=100000", "logger=none"]
    first = start_cli("fmlab.train", *forever, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".hydra" / "config.yaml").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # the second run in this process: the lock is the kernel's, held by another process either way
        status, _, err = cli_error("train", ["trainer.max_steps=10", "logger=none", f"hydra.run.dir={run_dir}"], capsys)
        assert status == 2
        line = err.strip()
        assert line == (
            f"fmlab: error: hydra.run.dir={run_dir} is in use by another fmlab run (pid {first.pid}); "
            "wait for it to end or choose another run dir"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    lock_run_dir(run_dir)  # the kernel released the killed run's lock


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    full_disk = "+callbacks.full_disk={_target_: tests.signals.FileSizeLimitAt, step: 150, max_bytes: 100000}"
    result = run_cli(
        "fmlab.train", "trainer.max_steps=300", "data.batches_per_epoch=100", "logger=csv", "eval.nll_samples=0",
        f"hydra.run.dir={run_dir}", full_disk, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"fmlab: error: could not write the checkpoint {run_dir / 'checkpoints'}/step0000200.ckpt")
    assert "File too large" in line and "Traceback" not in result.stderr
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert files == ["last.ckpt", "step0000100.ckpt"]  # no truncated step0000200.ckpt, no temp file
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 100


def test_a_diverged_run_reports_nan_metrics_and_the_flag_never_a_perfect_score(tmp_path: Path) -> None:
    result = run_cli(
        "fmlab.train", "optimizer.lr=1000", "trainer.max_steps=100", "solver=euler", "solver.num_steps=5",
        "data.num_eval_samples=200", "eval.num_draws=2", "eval.nll_samples=20", "callbacks.sample_logger=null",
        "logger=none", f"hydra.run.dir={tmp_path}", cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(tmp_path)
    assert metrics["diverged"] is True and metrics["nonfinite_samples"] > 0
    for key in ("w2", "mmd", "nll"):
        assert math.isnan(metrics[key]), key
    # what a sweep optimises: the worst value for its direction, never the diverged run's look-alike score
    assert optimized_value(json_config("w2"), metrics, "minimize") == math.inf
    assert optimized_value(json_config("w2"), metrics, "maximize") == -math.inf
    assert math.isnan(optimized_value(json_config("w2"), metrics))
    assert optimized_value(json_config("w2"), {"w2": 0.3, "diverged": False}, "minimize") == 0.3
    assert format_cell([metrics, {"w2": 0.2}], "w2") == "NaN (1 of 2 runs diverged)"
    assert all(math.isnan(v) for v in mean_std([metrics["w2"], 0.2]))  # the table's CSV


def json_config(optimized_metric: str):
    from omegaconf import OmegaConf

    return OmegaConf.create({"optimized_metric": optimized_metric})


def test_one_non_finite_sample_makes_w2_and_mmd_nan() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(200, 2), torch.randn(200, 2)
    assert wasserstein2(x, y) > 0 and math.isfinite(mmd_rbf(x, y))
    for bad in (math.inf, math.nan):
        x_bad = x.clone()
        x_bad[17, 1] = bad
        assert math.isnan(wasserstein2(x_bad, y)) and math.isnan(mmd_rbf(x_bad, y))


class ExplodedNet(nn.Module):
    """A net whose output is infinite on a few rows: what a diverged model generates."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.scale * x
        out[:3] = math.inf
        return out


@pytest.mark.parametrize("data", ["moons", "digits"])
def test_evaluator_flags_non_finite_samples_for_points_and_images(data: str, tmp_path: Path) -> None:
    path = AffinePath(CondOT())
    module = FlowModule(ExplodedNet(), path, VelocityObjective())
    if data == "moons":
        datamodule, metrics, extra = Toy2DDataModule("moons", num_eval_samples=200), ["w2"], ()
    else:
        datamodule, extra = DigitsDataModule(num_eval_samples=200), ("isc", "kid", "prc")
        metrics = ["fid", "inception_score", "kid", "precision", "recall"]
    evaluator = Evaluator(ODESolver("euler", num_steps=2), 200, num_draws=2, nll_samples=0,
                          fid={"cache_dir": str(tmp_path)}, fidelity_metrics=extra)  # fmt: skip
    results = evaluator.evaluate(module.velocity_field(), datamodule)
    assert results["diverged"] is True and results["nonfinite_samples"] == 2 * 3
    for metric in metrics:  # the other images would score: a NaN image makes the whole draw NaN
        assert math.isnan(results[metric]) and all(math.isnan(v) for v in results[f"{metric}_draws"])


class HugeNet(nn.Module):
    """Finite samples so large (half the float32 maximum) that the digits classifier's features overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.full_like(x, torch.finfo(torch.float32).max / 2)


def broken_digits_weights(target: Path) -> Path:
    """The committed digits classifier with one NaN weight: every reference feature is NaN."""
    from fmlab.metrics.digits_classifier import WEIGHTS_PATH

    state = torch.load(WEIGHTS_PATH, weights_only=True)
    state["state_dict"]["head.weight"] = state["state_dict"]["head.weight"].clone()
    trunk = next(k for k in state["state_dict"] if k.startswith("trunk") and k.endswith("weight"))
    state["state_dict"][trunk] = state["state_dict"][trunk].clone()
    state["state_dict"][trunk][0, 0, 0, 0] = math.nan
    torch.save(state, target)
    return target


@pytest.mark.parametrize("case", ["features_overflow", "broken_extractor", "conditional_nan"])
def test_non_finite_features_give_nan_metrics_never_a_crash(case: str, tmp_path: Path) -> None:
    """Kinds of non-finite input the listed one (a NaN sample) did not cover: finite samples whose features
    overflow, a feature extractor whose reference statistics are NaN, and a class-conditional draw (class
    accuracy). Each must give NaN, and none may reach torch.linalg (which aborts the process under torch 2.14)."""
    from fmlab.nets import MLP

    fid: dict = {"cache_dir": str(tmp_path / "cache")}
    net: nn.Module = HugeNet() if case == "features_overflow" else ExplodedNet()
    labels = False
    if case == "broken_extractor":
        fid["weights_path"] = str(broken_digits_weights(tmp_path / "broken.pt"))
        net = MLP((1, 8, 8), width=16)  # finite samples: only the extractor is broken
    if case == "conditional_nan":
        net, labels = ExplodedConditionalNet(), True
    module = FlowModule(net, AffinePath(CondOT()), VelocityObjective())
    datamodule = DigitsDataModule(num_eval_samples=100, with_labels=labels)
    evaluator = Evaluator(ODESolver("euler", num_steps=2), 100, num_draws=2, nll_samples=0, fid=fid,
                          fidelity_metrics=("kid", "prc"))  # fmt: skip
    results = evaluator.evaluate(module.velocity_field(), datamodule)
    expected = ["fid", "kid", "precision", "recall"] + (["class_accuracy"] if labels else [])
    for metric in expected:
        assert math.isnan(results[metric]), (metric, results[metric])
    assert results["diverged"] is True
    if case == "broken_extractor":  # no NaN reference statistics cached for the next run
        assert not list((tmp_path / "cache").glob("*.pt"))


class ExplodedConditionalNet(ExplodedNet):
    num_classes = 10

    def forward(self, t: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(t, x)


def test_a_diverged_digits_run_through_the_cli_exits_normally_with_nan_fid_and_the_flag(tmp_path: Path) -> None:
    result = run_cli(
        "fmlab.train", "data=digits", "optimizer.lr=1000", "solver=euler", "solver.num_steps=5",
        "trainer.max_steps=60", "data.num_eval_samples=200", "eval.num_draws=2", "eval.nll_samples=0",
        "eval.fidelity_metrics=[kid,prc]", "logger=none", f"hydra.run.dir={tmp_path}", cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]  # not 139 (SIGSEGV) or 134 (abort) from LAPACK
    metrics = metrics_of(tmp_path)
    assert metrics["diverged"] is True and metrics["nonfinite_samples"] > 0
    for key in ("fid", "kid", "precision", "recall"):
        assert math.isnan(metrics[key]), key
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_adaptive_solvers_stop_at_max_nfe_with_one_line() -> None:
    solver = ODESolver("dopri5", atol=1e-9, rtol=1e-9, max_nfe=60)
    stiff = lambda t, x: -1e4 * (x - torch.cos(t))  # noqa: E731
    with pytest.raises(SolverError, match=r"solver.max_nfe=60 reached: ODESolver\(dopri5"):
        solver.integrate(stiff, torch.ones(4, 2), 0.0, 1.0)
    relaxed = ODESolver("dopri5", atol=1e-3, rtol=1e-3, max_nfe=10_000)
    assert relaxed.integrate(lambda t, x: -x, torch.ones(4, 2), 0.0, 1.0) == pytest.approx(math.exp(-1), rel=1e-2)
    with pytest.raises(UserError, match="solver.max_nfe=0 is invalid"):
        ODESolver("dopri5", max_nfe=0)


@pytest.mark.slow  # ~40 s: an exploded model trained for real, and dopri5 against the cap
def test_an_exploded_model_stops_at_the_cap_with_its_checkpoint_and_metrics(tmp_path: Path) -> None:
    result = run_cli(
        "fmlab.train", "optimizer.lr=10", "trainer.max_steps=300", "solver.max_nfe=2000", "logger=csv",
        "data.num_eval_samples=200", "eval.num_draws=1", "eval.nll_samples=20", f"hydra.run.dir={tmp_path}",
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    # how dopri5 gives up on the exploded field (the cap, or a step size that underflows on non-finite values)
    # depends on the torch build's arithmetic and thread count; that it stops in one line naming why does not
    stopped = ("solver.max_nfe=2000 reached", "max_nfe=2000) could not integrate")
    assert line.startswith("fmlab: error: ") and any(s in line for s in stopped) and "diverged" in line, line
    metrics = metrics_of(tmp_path)
    assert metrics["steps"] == 300 and metrics["diverged"] is True and "max_nfe=2000" in metrics["eval_error"]
    assert metrics["train_loss"] > 1e6
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 300


@pytest.mark.slow  # keeps `make test` inside its 10 minutes; `make test-all` runs it
def test_wandb_disabled_writes_no_run_and_a_rejected_key_falls_back_to_offline(tmp_path: Path) -> None:
    short = ["trainer.max_steps=20", "data.num_eval_samples=100", "eval.num_draws=1", "eval.nll_samples=0",
             "callbacks.sample_logger=null"]  # fmt: skip
    disabled = run_cli("fmlab.train", *short, "logger=many", f"hydra.run.dir={tmp_path / 'disabled'}",
                       cwd=REPO_ROOT, env=cli_env(WANDB_MODE="disabled"))  # fmt: skip
    assert disabled.returncode == 0, disabled.stderr[-3000:]
    assert not (tmp_path / "disabled" / "wandb").exists() and (tmp_path / "disabled" / "csv").is_dir()
    # a well-formed key the service rejects or cannot check: here a closed local port answers for the service
    online = cli_env(WANDB_MODE="online", WANDB_API_KEY="0123456789abcdef" * 2 + "01234567",
                     WANDB_BASE_URL="http://127.0.0.1:9")  # fmt: skip
    rejected = run_cli("fmlab.train", *short, "logger=wandb", "logger.wandb.init_timeout=5",
                       f"hydra.run.dir={tmp_path / 'rejected'}", cwd=REPO_ROOT, env=online)  # fmt: skip
    assert rejected.returncode == 0, rejected.stderr[-3000:]
    assert "fmlab: W&B could not start online" in rejected.stderr and "logging offline instead" in rejected.stderr
    assert list((tmp_path / "rejected").glob("wandb/offline-run-*/run-*.wandb"))


def test_a_checkpoint_from_before_an_option_existed_resumes_but_a_changed_setting_does_not(train_config) -> None:
    from omegaconf import OmegaConf

    from fmlab.runs import resume_conflicts

    cfg = train_config("method=otcfm")
    stored = OmegaConf.to_container(cfg, resolve=True)
    del stored["time_sampler"]  # written before the time_sampler group existed
    del stored["coupling"]["draw_from_plan"]  # and before the coupling had this option
    assert resume_conflicts(stored, cfg) == []
    stored["coupling"]["method"] = "sinkhorn"
    assert resume_conflicts(stored, cfg) == [("coupling.method", "sinkhorn", "exact")]
    changed = train_config("method=otcfm", "time_sampler=logit_normal")
    conflicts = resume_conflicts(OmegaConf.to_container(cfg, resolve=True), changed)
    prefix = "fmlab.paths.time_samplers."
    assert ("time_sampler._target_", f"{prefix}UniformTime", f"{prefix}LogitNormalTime") in conflicts


def test_a_checkpoint_written_before_classes_moved_resumes_and_rebuilds_its_run(train_config, tmp_path: Path) -> None:
    """Checkpoints store their config's `_target_`s; those that moved (fmlab.sampling, fmlab.stochastic,
    fmlab.paths' couplings, fmlab.utils.loggers) are read at their new homes, so an old checkpoint neither
    conflicts on resume nor fails to rebuild."""
    from omegaconf import OmegaConf

    from fmlab.runs import MOVED_TARGETS, resume_conflicts, upgrade_config

    cfg = train_config("method=otcfm", "solver=edm_heun")
    stored = OmegaConf.to_container(cfg, resolve=True)
    old_names = {new: old for old, new in MOVED_TARGETS.items()}  # the last old name of each class
    stored["coupling"]["_target_"] = "fmlab.paths.MinibatchOTCoupling"
    stored["solver"]["_target_"] = "fmlab.stochastic.EDMHeun"
    stored["logger"]["csv"]["_target_"] = old_names["fmlab.loggers.ResumableCSVLogger"]
    assert resume_conflicts(stored, cfg) != []  # read as written, the moved targets would conflict
    upgraded = upgrade_config(stored)
    assert resume_conflicts(upgraded, cfg) == []
    assert upgraded["solver"]["_target_"] == "fmlab.samplers.EDMHeun"
    assert upgraded["logger"]["csv"]["_target_"] == "fmlab.loggers.ResumableCSVLogger"
    from hydra.utils import instantiate

    for key in ("coupling", "solver"):  # and they build
        assert type(instantiate(OmegaConf.create(upgraded[key]))).__name__ in upgraded[key]["_target_"]


@pytest.fixture(scope="module")
def diverged_teacher(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of a finished run whose metrics.json says it diverged."""
    import shutil

    teacher = tmp_path_factory.mktemp("diverged") / "teacher"
    shutil.copytree(finished, teacher)
    write_metrics(teacher, {"diverged": True})
    return teacher


# (entry point, arguments, what the one line must name): a value of every kind the build checks, each failing
# before the config is printed and before a run dir exists
BUILD_CASES = [
    ("train", ["ckpt_path={finished}", "optimizer.lr=abc"], "optimizer.lr='abc' is invalid"),
    ("train", ["ckpt_path={finished}", "optimizer.lr=0"], "optimizer.lr=0 is invalid"),
    ("train", ["ckpt_path={finished}", "seed=abc"], "seed='abc' is invalid"),
    ("train", ["ckpt_path={finished}", "seed=-1"], "seed=-1 is invalid"),
    ("train", ["ckpt_path={finished}", "trainer.max_stepz=5"], "trainer.max_stepz is not a key"),
    ("train", ["ckpt_path={finished}", "method=ddpm"], "method.name: fm_ot in the checkpoint, ddpm now"),
    ("train", ["ckpt_path={finished}", "net.width=64"], "net.width: 128 in the checkpoint, 64 now"),
    ("train", ["ckpt_path={finished}", "optimizer.lr=1e-3"], "optimizer.lr: 0.002 in the checkpoint, 0.001 now"),
    ("train", ["ckpt_path={finished}", "trainer.max_steps=50"], "at step 200, beyond trainer.max_steps=50"),
    ("train", ["hydra.run.dir={finished}", "solver=ancestral"], "solver=ancestral does not fit"),
    ("train", ["hydra.run.dir=/proc/fmlab-test/run"], "hydra.run.dir=/proc/fmlab-test/run cannot be used"),
    ("evaluate", ["ckpt_path={finished}", "solver=ancestral"], "solver=ancestral does not fit"),
    ("train", ["trainer.precision=banana"], "trainer.precision='banana' is invalid"),
    ("train", ["trainer.accelerator=banana"], "trainer.accelerator='banana' is invalid"),
    ("train", ["data.batch_size=abc"], "data.batch_size='abc' is invalid; it must be a number"),
    ("train", ["eval.batch_size=abc"], "eval.batch_size='abc' is invalid; it must be a number"),
    ("train", ["+trainer.max_stepz=5"], "trainer.max_stepz is not a setting of lightning.pytorch.Trainer"),
    ("train", ["+net.widht=3"], "net.widht is not a setting of fmlab.nets.MLP"),
    ("train", ["+callbacks.ema.decey=0.5"], "callbacks.ema.decey is not a setting of fmlab.callbacks.EMA"),
    ("train", ["eval.num_draws=0"], "eval.num_draws=0"),
    ("train", ["data.num_workers=1000"], "data.num_workers=1000 is more than the"),
    ("train", ["conditioning=class", "conditioning.p_uncond=1.5"], "conditioning.p_uncond=1.5"),
    ("train", ["conditioning=class", "conditioning.p_uncond=0"], "eval.nll_samples=250 needs the unconditional model"),
    (
        "train",
        ["conditioning=class", "conditioning.p_uncond=0", "eval.nll_samples=0", "eval.guidance_scale=2"],
        "eval.guidance_scale=2.0 needs the unconditional model",
    ),  # fmt: skip
    (
        "train",
        ["time_sampler=lognormal_sigma", "time_sampler.p_mean=100", "time_sampler.loss_weight=density_ratio"],
        "puts 100% of training times at an end",
    ),  # fmt: skip
    ("train", ["time_sampler=logit_normal", "time_sampler.m=nan"], "time_sampler.m=nan is invalid"),
    (
        "train",
        ["time_sampler=logit_normal", "time_sampler.m=6", "time_sampler.loss_weight=density_ratio"],
        "degenerate loss weights",
    ),  # fmt: skip
    (
        "train",
        ["solver=edm_heun", "solver.s_churn=40", "solver.s_min=5", "solver.s_max=1"],
        "leave no noise level to churn",
    ),  # fmt: skip
    ("train", ["objective=mean_flow"], "time_sampler=mean_flow draws intervals for objective=mean_flow"),
    ("train", ["method=meanflow", "time_sampler=uniform"], "got UniformTime with MeanFlowObjective"),
    ("train", ["method=meanflow", "net.time_inputs=1"], "net.time_inputs=1; use method=meanflow"),
    ("train", ["net.time_inputs=3"], "net.time_inputs=3 is invalid"),
    ("train", ["solver=mean_flow"], "solver=mean_flow jumps with an average velocity: it needs method=meanflow"),
    ("train", ["coupling=reflow", "coupling.teacher=outputs/nope"], "coupling.teacher=outputs/nope does not exist"),
    (
        "train",
        ["coupling=reflow", "coupling.teacher={finished}", "data=digits", "coupling.init_from_teacher=false"],
        "was trained on data shaped [2]",
    ),  # fmt: skip
    ("train", ["coupling=reflow", "coupling.teacher={diverged}"], "coupling.teacher={diverged} diverged"),
    ("evaluate", ["ckpt_path={finished}", "sweep=nfe", "sweep.num_steps=[]"], "sweep.num_steps=[] leaves"),
    ("evaluate", ["ckpt_path={finished}", "sweep=guidance"], "sweep=guidance needs a class-conditional run"),
    (
        "evaluate",
        [
            "ckpt_path={finished}",
            "sweep=nfe",
            "sweep.fixed_step_methods=[]",
            "sweep.adaptive_methods=[]",
            "sweep.stochastic_methods=[]",
        ],
        "the sweep names no sampler",
    ),  # fmt: skip
    (
        "evaluate",
        ["ckpt_path={finished}", "sweep=nfe", "sweep.fixed_step_methods=[dopri5]"],
        "sweep.fixed_step_methods lists dopri5, an adaptive sampler",
    ),  # fmt: skip
    ("evaluate", ["ckpt_path={finished}", "hydra.run.dir=/proc/fmlab-test/eval"], "cannot be used"),
    ("table", ["table=cpu_small", "sweep_dir=/proc/fmlab-test/table"], "sweep_dir=/proc/fmlab-test/table cannot"),
]


@pytest.mark.parametrize("entry, args, expected", BUILD_CASES, ids=[" ".join(c[1]) for c in BUILD_CASES])
def test_every_bad_value_ends_in_one_line_naming_it_before_anything_is_written(
    entry: str, args: list[str], expected: str, finished: Path, diverged_teacher: Path, tmp_path: Path, capsys
) -> None:
    places = {"finished": finished, "diverged": diverged_teacher}
    args = [a.format(**places) for a in args]
    expected = expected.format(**places)
    run_dir = tmp_path / "run"
    if entry != "table" and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    before = tree_digest(finished)
    status, out, err = cli_error(entry, args, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("fmlab: error: "), err[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in out + err and "├──" not in out  # no traceback, no config tree printed
    assert not run_dir.exists() and tree_digest(finished) == before  # no new run dir, the old run untouched

"""Kill a run for real and resume it: the final metrics equal an unbroken run's; old and broken checkpoints."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fmlab.errors import UserError
from fmlab.runs import load_run
from tests.conftest import REPO_ROOT, cli_env, run_cli, start_cli
from tests.wandb_files import read_run, run_files

# 3 epochs of 200 steps; checkpoints at every epoch end
RUN = [
    "trainer.max_steps=600",
    "data.batches_per_epoch=200",
    "data.num_eval_samples=300",
    "eval.num_draws=1",
    "eval.nll_samples=40",
    "trainer.deterministic=true",
]


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("unbroken") / "run"
    result = run_cli("fmlab.train", *RUN, "logger=csv", f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def start_and_kill(run_dir: Path, sig: signal.Signals, *extra: str) -> subprocess.CompletedProcess:
    """Start a run, wait for its first checkpoint (step 200), let it go on a little, then send `sig` from outside."""
    process = start_cli("fmlab.train", *RUN, *extra, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    first = run_dir / "checkpoints" / "step0000200.ckpt"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(sig)
    return process.communicate(timeout=120)


@pytest.mark.parametrize(
    ("step", "when"),
    [pytest.param(300, "batch_end", marks=pytest.mark.slow), (200, "epoch_end")],
    ids=["mid_epoch", "during_epoch_end_checkpoint"],
)
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_like_an_unbroken_one(
    unbroken, tmp_path: Path, step: int, when: str
) -> None:
    run_dir = tmp_path / "run"
    # a real SIGTERM, sent by the run to itself at a fixed step so the test does not race the machine's speed
    killed = run_cli(
        "fmlab.train", *RUN, "logger=many", f"hydra.run.dir={run_dir}",
        f"+callbacks.signal={{_target_: tests.signals.SignalAt, step: {step}, when: {when}}}",
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert killed.returncode == 143, killed.stderr[-3000:]
    last = (run_dir / "checkpoints" / "last.ckpt").resolve()
    assert last.name == f"step{step:07d}.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli("fmlab.train", f"ckpt_path={run_dir}", cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir}" in resumed.stdout
    ours, reference = metrics_of(run_dir), metrics_of(unbroken)
    assert ours["steps"] == reference["steps"] == 600
    # deterministic mode on CPU: per-step seeds and an indexed data stream make the runs identical
    for key in ("w2", "mmd", "nll", "nfe"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
    logged = [read_run(f) for f in run_files(run_dir)]
    assert len({run.run["id"] for run in logged}) == 1  # one W&B run, continued
    assert sum(len(run.values("eval/w2")) for run in logged) == 1
    # the CSV history before the kill stays, and the resumed part continues it: the unbroken run's rows, once each
    assert loss_rows(run_dir) == loss_rows(unbroken)


def slurm_env(tmp_path: Path, restarts: int) -> dict[str, str]:
    """A SLURM batch job's environment as SLURM sets it (restarts: SLURM_RESTART_COUNT after a requeue), with a
    fake `scontrol` first on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "fmlab", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost"}  # fmt: skip
    if restarts:
        slurm["SLURM_RESTART_COUNT"] = str(restarts)
    return cli_env(**slurm, PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"))


def test_a_slurm_job_warned_by_sigusr1_checkpoints_is_requeued_once_and_resumes_by_itself(
    unbroken, tmp_path: Path
) -> None:
    """SIGUSR1 (sbatch --signal=USR1@<s>) at steps 250 and 450: each time the step is saved, `scontrol requeue 4242`
    is called exactly once (fmlab's, with Lightning's auto-requeue off), and the requeued job, started with the
    same command, finds its run dir by the job id and resumes; it ends like the unbroken run, one W&B run."""
    signal_at = "{_target_: tests.signals.SignalAt, step: [250, 450], signal_name: SIGUSR1}"
    command = [*RUN, "logger=many", f"paths.log_dir={tmp_path / 'outputs'}", f"+callbacks.signal={signal_at}"]
    log = tmp_path / "scontrol.log"
    for restarts, step in enumerate((250, 450)):
        stopped = run_cli("fmlab.train", *command, cwd=REPO_ROOT, env=slurm_env(tmp_path, restarts))
        assert stopped.returncode == 143, stopped.stderr[-3000:]
        assert log.read_text().splitlines() == ["requeue 4242"] * (restarts + 1)
        (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
        assert run_dir.name.startswith("slurm4242_") and (run_dir / "checkpoints" / "last.ckpt").resolve().name == (
            f"step{step:07d}.ckpt")  # fmt: skip
        assert ("was requeued: resuming" in stopped.stdout) == (restarts > 0)
    finished = run_cli("fmlab.train", *command, cwd=REPO_ROOT, env=slurm_env(tmp_path, 2))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(log.read_text().splitlines()) == 2 and f"resuming its run dir {run_dir}" in finished.stdout
    ours, reference = metrics_of(run_dir), metrics_of(unbroken)
    for key in ("w2", "mmd", "nll", "nfe", "train_loss"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
    assert len({read_run(f).run["id"] for f in run_files(run_dir)}) == 1  # the same W&B run, continued
    assert loss_rows(run_dir) == loss_rows(unbroken)  # one CSV log, each row once


# OT-CFM with pairs drawn from the plan: the coupling's random draws run in the loader workers
OT_RUN = [
    "method=otcfm",
    "coupling.draw_from_plan=true",
    "trainer.max_steps=150",
    "data.batches_per_epoch=50",
    "data.num_eval_samples=300",
    "eval.num_draws=1",
    "eval.nll_samples=0",
    "eval.path_energy=false",
    "trainer.deterministic=true",
    "logger=csv",
]


@pytest.fixture(scope="module")
def unbroken_without_workers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    unbroken = tmp_path_factory.mktemp("unbroken_without_workers")
    result = run_cli("fmlab.train", *OT_RUN, "data.num_workers=0", f"hydra.run.dir={unbroken}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return unbroken


# (signal, the step it lands after, the exit status): SIGTERM and Ctrl-C mid-epoch save the step in progress;
# SIGKILL after the epoch-end checkpoint of step 50 leaves only that one, whose resume makes a loader iterator
# that Lightning drops at once (the batches its workers made ahead must not shift the stream)
KILLS = [("SIGTERM", 75, 143), ("SIGINT", 75, 143), ("SIGKILL", 60, -signal.SIGKILL)]


@pytest.mark.parametrize("signal_name, step, status", KILLS)
def test_a_run_with_loader_workers_killed_and_resumed_ends_like_an_unbroken_run_without_workers(
    unbroken_without_workers: Path, tmp_path: Path, signal_name: str, step: int, status: int
) -> None:
    run_dir = tmp_path / "run"
    killed = run_cli(
        "fmlab.train", *OT_RUN, "data.num_workers=2", f"hydra.run.dir={run_dir}",
        f"+callbacks.signal={{_target_: tests.signals.SignalAt, step: {step}, signal_name: {signal_name}}}",
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert killed.returncode == status, killed.stderr[-3000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert saved == (["step0000050.ckpt"] if signal_name == "SIGKILL" else ["step0000050.ckpt", "step0000075.ckpt"])
    resumed = run_cli("fmlab.train", f"ckpt_path={run_dir}", "callbacks.signal=null", cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, reference = metrics_of(run_dir), metrics_of(unbroken_without_workers)
    assert ours["steps"] == reference["steps"] == 150
    assert "draw_from_plan=True" in ours["coupling"] and ours["loader_workers"] == 2
    for key in ("w2", "mmd", "nfe", "train_loss"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
    assert loss_rows(run_dir) == loss_rows(unbroken_without_workers)


def loss_rows(run_dir: Path) -> list[tuple[int, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.mark.slow
def test_sigkill_then_resume_from_the_last_epoch_checkpoint(unbroken, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = start_and_kill(run_dir, signal.SIGKILL, "logger=csv")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli("fmlab.train", f"ckpt_path={run_dir}", cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in ("w2", "mmd", "nll"):
        assert metrics_of(run_dir)[key] == pytest.approx(metrics_of(unbroken)[key], rel=1e-9), key


def test_checkpoints_without_the_stored_config_load_from_their_run_dir(unbroken, tmp_path: Path) -> None:
    checkpoint = torch.load(unbroken / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    del checkpoint["fmlab"]  # the format before checkpoints carried their config
    old_run = tmp_path / "old_run"
    (old_run / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, old_run / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match="carries no fmlab config and .*config.yaml does not exist"):
        load_run(old_run / "checkpoints" / "last.ckpt")
    (old_run / ".hydra").mkdir()
    (old_run / ".hydra" / "config.yaml").write_text((unbroken / ".hydra" / "config.yaml").read_text())
    run = load_run(old_run / "checkpoints" / "last.ckpt")
    assert run.step == 600
    assert sum(p.numel() for p in run.net.parameters()) == sum(p.numel() for p in run.module.net.parameters())


def test_incompatible_and_corrupt_checkpoints_fail_in_one_line(unbroken, tmp_path: Path) -> None:
    checkpoint = torch.load(unbroken / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    checkpoint["fmlab"]["config"]["net"]["width"] = 64
    wrong = tmp_path / "wrong.ckpt"
    torch.save(checkpoint, wrong)
    with pytest.raises(UserError, match="does not match the net its config builds"):
        load_run(wrong)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((unbroken / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        load_run(truncated)
    result = run_cli("fmlab.train", f"ckpt_path={tmp_path / 'no_run'}", cwd=REPO_ROOT)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_diverging_run_stops_in_one_line_naming_the_step(tmp_path: Path) -> None:
    result = run_cli(
        "fmlab.train",
        "logger=none",
        "trainer.max_steps=300",
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=1e12",
        f"hydra.run.dir={tmp_path}",
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]  # Lightning's start-up notes come before it
    # which non-finite value comes first (nan, inf or -inf) is the torch build's arithmetic, not fmlab's behaviour
    assert re.match(r"fmlab: error: the training loss became (nan|-?inf) at step \d+;", line), line
    assert "Traceback" not in result.stderr and "no checkpoint yet" in line
    assert not (tmp_path / "metrics.json").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_a_requeued_slurm_job_and_only_a_requeued_batch_job_resumes_its_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multirun job that submitit requeued resumes its own job dir; a first start, an salloc shell (job name
    bash) or a process outside SLURM starts afresh."""
    from fmlab.runs import requeued_checkpoint, run_stamp, slurm_resume_arguments

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step0000100.ckpt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "last.ckpt").symlink_to("step0000100.ckpt")
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert requeued_checkpoint(tmp_path) is None and not run_stamp().startswith("slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert requeued_checkpoint(tmp_path) is None and run_stamp() == "slurm9"  # the first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step0000100.ckpt"
    assert slurm_resume_arguments([f"hydra.run.dir={tmp_path}"])[-1] == f"ckpt_path={tmp_path}"
    assert slurm_resume_arguments(["-m", f"hydra.run.dir={tmp_path}"]) == ["-m", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_stamp() == "slurm8_3"  # an array task: its own dir, the id scontrol requeues
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")
    assert requeued_checkpoint(tmp_path) is None and not run_stamp().startswith("slurm")

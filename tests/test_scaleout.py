"""Scale-out from the CLI: 2-process DDP training (gloo), grid multiruns with a summary, Optuna, the SLURM launcher
config, and W&B offline runs read back from their run files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fmlab.cli import CONFIG_DIR
from tests.conftest import REPO_ROOT, cli_env, run_cli, start_cli
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


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_env(kind: str, node: int, port: int) -> dict[str, str]:
    """What a cluster launcher sets for node `node` of 2 (one process each): Lightning's variables, or SLURM's
    (then Lightning's SLURMEnvironment resolves the ranks)."""
    if kind == "lightning":
        return cli_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE="2")
    return cli_env(SLURM_JOB_ID="77", SLURM_JOB_NAME="fmlab", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                   SLURM_PROCID=str(node), SLURM_LOCALID="0", SLURM_NODEID=str(node), SLURM_NNODES="2",
                   SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip


@pytest.fixture(scope="module")
def one_node_of_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    result = run_cli("fmlab.train", "trainer=ddp_cpu", *TINY, "logger=csv", f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("kind", ["lightning", "slurm"])
def test_two_nodes_of_one_process_each_train_exactly_like_one_node_of_two(
    kind: str, one_node_of_two: Path, tmp_path: Path
) -> None:
    """Two `python -m fmlab.train ... trainer.num_nodes=2 trainer.devices=1` commands, started as a cluster
    launcher starts one per node: the same ranks, streams and DDP-exact evaluation as one node of two processes,
    to the last digit; one run dir, written by global rank 0 only; the card says 2 nodes × 1 × 256."""
    run_dir, port = tmp_path / "run", free_port()
    args = ["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1", *TINY, "logger=csv",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    nodes = [start_cli("fmlab.train", *args, cwd=REPO_ROOT, env=node_env(kind, node, port)) for node in (0, 1)]
    first, second = (node.communicate(timeout=300) for node in nodes)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr + second.stderr)[-3000:]
    ours, reference = metrics_of(run_dir), metrics_of(one_node_of_two)
    for key in ("w2", "mmd", "nll", "nfe", "train_loss"):
        assert ours[key] == reference[key], key
    assert ours["card"]["nodes"] == 2 and ours["card"]["global_batch_size"] == 512
    assert "2 nodes × 1×256 = 512 batch" in first.stdout and "fmlab: card:" not in second.stdout
    assert "GLOBAL_RANK: 1" in second.stderr + second.stdout  # the second command was rank 1
    # rank 1 wrote nothing into the run dir: one config copy, one job log (rank 0's), one CSV log
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert [p.name for p in run_dir.glob("*.log") if p.name != "config_tree.log"] == ["train.log"]
    assert "GLOBAL_RANK: 1" not in (run_dir / "train.log").read_text()
    assert len(list(run_dir.rglob("metrics.csv"))) == 1


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from the process table."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


FAULT_RUN = ["trainer=ddp_cpu", "trainer.max_steps=1000", "data.batches_per_epoch=100", "data.num_eval_samples=300",
             "eval.num_draws=1", "eval.nll_samples=0", "logger=csv"]  # fmt: skip


@pytest.fixture(scope="module")
def unbroken_ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("unbroken_ddp") / "run"
    result = run_cli("fmlab.train", *FAULT_RUN, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("lost", [0, 1])
def test_a_killed_rank_stops_the_other_in_one_line_and_the_rerun_resumes(
    lost: int, unbroken_ddp: Path, tmp_path: Path
) -> None:
    """SIGKILL of global rank 0 (the launching process) or of rank 1 (the process Lightning started) of a 2-process
    run: the survivor exits within seconds with one line naming the lost rank, no process is left, the newest
    checkpoint stays readable and the rerun resumes from it to the end."""
    import signal
    import time

    run_dir = tmp_path / "run"
    rank0 = start_cli("fmlab.train", *FAULT_RUN, f"hydra.run.dir={run_dir}", cwd=REPO_ROOT)
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "step0000100.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (rank1,) = [pid for pid in children_of(rank0.pid) if alive(pid)]
    victim, survivor = (rank0.pid, rank1) if lost == 0 else (rank1, rank0.pid)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    if lost == 1:
        result = rank0.communicate(timeout=60)
        lines = [line for line in result.stderr.splitlines() if line.startswith("fmlab: error: ")]
        assert result.returncode == 2 and lines, result.stderr[-3000:]
        assert lines[0].startswith("fmlab: error: rank 1 of this 2-process run ended") and "resume with" in lines[0]
    else:
        rank0.communicate(timeout=60)
    while alive(survivor) and time.monotonic() - killed_at < 60:
        time.sleep(0.1)
    assert not alive(survivor) and not alive(victim)  # no orphan, no hang
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] >= 100
    resumed = run_cli("fmlab.train", f"ckpt_path={run_dir}", cwd=REPO_ROOT, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir}" in resumed.stdout
    ours, reference = metrics_of(run_dir), metrics_of(unbroken_ddp)
    for key in ("steps", "w2", "mmd", "nfe"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-9), key

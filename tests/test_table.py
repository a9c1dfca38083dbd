"""Tables: mean ± std over seeds from metrics.json files, partial cells marked, missing cells never invented."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fmlab.cli import CONFIG_DIR
from fmlab.io import write_csv
from fmlab.launch import Jobs, cpu_slices, pending_launches, sweep_jobs, threads_per_worker
from fmlab.results import (
    aggregate,
    collect_metrics,
    column_value,
    one_step_markdown,
    render_markdown,
    table_rows,
    with_chain_costs,
)
from tests.conftest import run_cli


def write_run(root: Path, name: str, **metrics: object) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def fixture_sweep(root: Path) -> None:
    for seed, (w2, nfe) in enumerate([(0.20, 68), (0.22, 74), (0.18, 62)]):
        write_run(root, f"a/{seed}", method="fm_ot", source="gaussian", seed=seed, w2=w2, nfe=nfe, w2_floor=0.075)
    for seed, w2 in enumerate([0.30, 0.34]):
        write_run(root, f"b/{seed}", method="ddpm", source="gaussian", seed=seed, w2=w2, nfe=150, w2_floor=0.077)


def table_config(name: str = "methods2d"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("table", overrides=[f"table={name}"]).table


def test_cells_are_mean_and_std_over_seeds_and_missing_cells_say_not_run(tmp_path: Path) -> None:
    fixture_sweep(tmp_path)
    cells = aggregate(collect_metrics(tmp_path), "method", "source")
    markdown = render_markdown(table_config(), cells)
    fm_ot_row = next(line for line in markdown.splitlines() if line.startswith("| fm_ot |"))
    w2_cell = f"{statistics.fmean([0.20, 0.22, 0.18]):.3f} ± {statistics.stdev([0.20, 0.22, 0.18]):.3f}"
    assert fm_ot_row.split(" | ")[1] == w2_cell == "0.200 ± 0.020"
    assert fm_ot_row.split(" | ")[2] == "68 ± 6"
    assert "| not run | not run |" in fm_ot_row  # no 8gaussians runs
    ddpm_row = next(line for line in markdown.splitlines() if line.startswith("| ddpm |"))
    assert "0.320 ± 0.028 (n=2)" in ddpm_row
    otcfm_row = next(line for line in markdown.splitlines() if line.startswith("| otcfm |"))
    assert otcfm_row.count("not run") == 4
    assert "| floor (held-out vs held-out) | 0.076 ± 0.001 |  | not run |" in markdown  # all five runs of the column
    assert "(fixed sets)" not in markdown  # floors that differ between runs keep their spread


def test_table_cli_reads_a_finished_sweep_and_writes_markdown_and_csv(tmp_path: Path) -> None:
    fixture_sweep(tmp_path / "sweep")
    result = run_cli("fmlab.table", "table=methods2d", f"sweep_dir={tmp_path / 'sweep'}", "run=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| fm_ot | 0.200 ± 0.020 | 68 ± 6 |" in result.stdout
    rows = list(csv.DictReader((tmp_path / "sweep" / "methods2d.csv").open()))
    fm_ot = next(r for r in rows if r["method"] == "fm_ot" and r["source"] == "gaussian")
    assert float(fm_ot["w2_mean"]) == statistics.fmean([0.20, 0.22, 0.18]) and fm_ot["runs"] == "3"
    assert (tmp_path / "sweep" / "methods2d.md").read_text().strip() in result.stdout


def test_a_table_csv_that_fails_part_way_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    fixture_sweep(tmp_path / "sweep")
    table = table_config("methods2d")
    cells = aggregate(collect_metrics(tmp_path / "sweep"), table.rows, table.columns)
    target = tmp_path / "methods2d.csv"
    write_csv(target, table_rows(table, cells))
    before = target.read_bytes()
    calls = iter(range(1000))

    def failing_mean_std(values: list[float]) -> tuple[float, float]:
        if next(calls) == 3:  # a few cells written, then the disk fills (or a bad record raises)
            raise OSError("No space left on device")
        return statistics.fmean(values), 0.0

    monkeypatch.setattr("fmlab.results.mean_std", failing_mean_std)
    with pytest.raises(OSError, match="No space left"):
        write_csv(target, table_rows(table, cells))
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_table_cli_without_a_sweep_says_what_to_do(tmp_path: Path) -> None:
    result = run_cli("fmlab.table", "table=methods2d", f"sweep_dir={tmp_path / 'missing'}", "run=false", cwd=tmp_path)
    assert result.returncode == 2 and "holds no metrics.json; run the table first" in result.stderr


def test_published_numbers_sit_beside_the_measured_ones_and_missing_runs_stay_missing(tmp_path: Path) -> None:
    for seed, (bpd, fid, nfe) in enumerate([(3.01, 6.1, 140), (3.03, 6.5, 150)]):
        write_run(tmp_path, f"ot/{seed}", method="fm_ot", data="cifar10", seed=seed, bpd=bpd, fid=fid, nfe=nfe)
    table = table_config("lipman_table1")
    cells = aggregate(collect_metrics(tmp_path), table.rows, table.columns)
    markdown = render_markdown(table, cells)
    write_csv(tmp_path / "table.csv", table_rows(table, cells))
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    cifar = next(r for r in rows if r["method"] == "fm_ot" and r["data"] == "cifar10")
    assert (cifar["runs"], cifar["bpd_paper"], cifar["fid_paper"], cifar["nfe_paper"]) == ("2", "2.99", "6.35", "142")
    assert float(cifar["bpd_mean"]) == pytest.approx(3.02)
    lines = markdown.splitlines()
    assert lines[2].startswith("| method | CIFAR-10: bpd | CIFAR-10: fid | CIFAR-10: nfe | ImageNet 32×32: bpd")
    fm_ot = next(line for line in lines if line.startswith("| FM w/ OT |")).split(" | ")
    assert fm_ot[1] == f"3.020 ± {statistics.stdev([3.01, 3.03]):.3f} (n=2) (paper 2.99)"
    assert fm_ot[3] == "145 ± 7 (n=2) (paper 142)"
    assert fm_ot[4] == "not run (paper 3.53)"  # ImageNet 32 BPD: no run, the paper's number only
    ddpm = next(line for line in lines if line.startswith("| DDPM |"))
    assert ddpm.count("not run") == 9 and "(paper 7.48)" in ddpm and "(paper 17.36)" in ddpm
    assert "Published numbers in parentheses: Lipman et al. 2023, Table 1." in markdown


def test_columns_can_join_fields_and_show_their_own_metrics(tmp_path: Path) -> None:
    pair = {"source": "tong_pair_moons", "data": "tong_pair_8gaussians", "seed": 42, "w2_floor": 1.5}
    write_run(tmp_path, "a", method="otcfm", w2=0.5, normalized_path_energy=0.1, **pair)
    write_run(tmp_path, "b", method="fm_ot", w2=0.6, **pair)
    tong = table_config("tong2d")
    lines = render_markdown(tong, aggregate(collect_metrics(tmp_path), tong.rows, tong.columns)).splitlines()
    ot_cfm = next(line for line in lines if line.startswith("| OT-CFM |")).split(" | ")
    assert ot_cfm[3:5] == ["0.500 (n=1) (paper 0.601)", "0.100 (n=1)"]  # the paper's NPE is not transcribed
    assert next(line for line in lines if line.startswith("| FM |")).split(" | ")[3] == "0.600 (n=1)"
    # both runs measured the floor on the same fixed split: one value, not a "± 0.000" spread
    assert next(line for line in lines if line.startswith("| floor")).split(" | ")[3] == "1.500 (fixed sets)"
    assert any(line.startswith("A floor marked (fixed sets)") for line in lines)
    write_run(tmp_path, "c", method="ddpm", source="gaussian", data="digits", seed=0, fid=9.0, bpd=2.0, nfe=200)
    small = table_config("cpu_small")
    header = render_markdown(small, aggregate(collect_metrics(tmp_path), small.rows, small.columns)).splitlines()[2]
    assert header == "| method | digits: fid | digits: bpd | digits: nfe | moons: w2 | moons: nll | moons: nfe |"


@pytest.mark.parametrize("name", ["methods2d", "digits", "cpu_small", "tutorial2d", "tong2d", "lipman_table1"])
def test_every_table_sweep_runs_into_its_own_cells_and_covers_every_published_number(name: str) -> None:
    table = table_config(name)
    covered = set()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        jobs = {
            tuple(o for o in job if not o.startswith("seed="))  # seeds share their cell
            for overrides in table.sweeps.values()
            for job in sweep_jobs([*table.common, *overrides])
        }
        for job in sorted(jobs):
            cfg = compose("train", overrides=list(job))
            record = {
                "method": cfg.method.name,
                "data": cfg.data.target,
                "source": cfg.data.get("source", "gaussian"),
            }
            cell = (str(record[table.rows]), column_value(record, table.columns))
            assert cell[0] in table.row_order and cell[1] in table.column_order, (job, cell)
            covered.add(cell)
    published = {(row, column) for row, columns in (table.get("reference") or {}).items() for column in columns}
    assert published <= covered
    empty = {tuple(cell) for cell in table.get("empty_cells", [])}
    assert covered == {(r, c) for r in table.row_order for c in table.column_order} - empty


def test_concurrent_runs_get_disjoint_cpu_slices_of_their_thread_count() -> None:
    assert cpu_slices(2, [0, 1]) == [[0], [1]]
    sixteen = cpu_slices(3, list(range(16)))
    assert [len(s) for s in sixteen] == [5, 5, 5] and len({c for s in sixteen for c in s}) == 15
    assert cpu_slices(3, [4, 7]) == [[4], [7], [4]]  # more runs than CPUs: they take turns, from this process's set
    assert cpu_slices(1, [2, 3, 5]) == [[2, 3, 5]]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="the OS has no CPU affinity")
def test_a_pinned_run_sees_only_its_slice_and_auto_starts_no_loader_worker_on_one_cpu(tmp_path: Path) -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    probe = (
        "import os, json\n"
        "from fmlab.couplings import MinibatchOTCoupling\n"
        "from fmlab.data.toy2d import loader_workers\n"
        "print(json.dumps([sorted(os.sched_getaffinity(0)), loader_workers('auto', MinibatchOTCoupling())]))"
    )
    out = tmp_path / "probe.json"
    with out.open("w") as stream:
        assert Jobs().run([sys.executable, "-c", probe], [cpu], stdout=stream) == 0
    assert json.loads(out.read_text()) == [[cpu], 0]


@pytest.mark.slow  # keeps `make test` inside its 10 minutes; `make test-all` runs it
def test_concurrent_sweeps_run_every_job_with_split_threads_and_a_rerun_adds_only_missing_jobs(
    tmp_path: Path,
) -> None:
    sweep_dir = tmp_path / "sweep"
    tiny = ["logger=none", "trainer.max_steps=20", "eval.num_samples=64", "eval.num_draws=1", "eval.nll_samples=0"]
    quoted = ",".join(f"'{o}'" for o in tiny)  # list items holding '=' are quoted

    def table(seeds: str) -> subprocess.CompletedProcess:
        return run_cli(
            "fmlab.table",
            "table=methods2d",
            f"sweep_dir={sweep_dir}",
            "workers=2",
            f"table.common=[{quoted},'seed={seeds}']",
            "~table.sweeps",
            "+table.sweeps={fm:['method=fm_ot'],icfm:['method=icfm']}",
            cwd=tmp_path,
        )

    result = table("0")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = {r["method"]: r for r in collect_metrics(sweep_dir)}
    assert set(runs) == {"fm_ot", "icfm"} and all(r["steps"] == 20 for r in runs.values())
    assert all(r["torch_threads"] == threads_per_worker(2) for r in runs.values())
    assert all("fmlab: net MLP" in (sweep_dir / "logs" / f"{name}_0.log").read_text() for name in ("fm", "icfm"))
    assert "| fm_ot | " in result.stdout and "| icfm | " in result.stdout
    first = (sweep_dir / "fm" / "0_fm_ot_moons_seed0" / "metrics.json").stat().st_mtime_ns

    again = table("0,1")  # seed 1 is new: only its jobs run, into the dirs the whole multirun would name
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("has 1 of 2 runs; running the other 1") == 2
    assert sorted(p.name for p in (sweep_dir / "fm").glob("*/")) == ["0_fm_ot_moons_seed0", "1_fm_ot_moons_seed1"]
    assert (sweep_dir / "fm" / "0_fm_ot_moons_seed0" / "metrics.json").stat().st_mtime_ns == first
    assert sorted((r["method"], r["seed"]) for r in collect_metrics(sweep_dir)) == [
        ("fm_ot", 0),
        ("fm_ot", 1),
        ("icfm", 0),
        ("icfm", 1),
    ]


def test_workers_must_be_a_positive_count(tmp_path: Path) -> None:
    result = run_cli("fmlab.table", "table=methods2d", f"sweep_dir={tmp_path}", "workers=0", cwd=tmp_path)
    assert result.returncode == 2 and "workers=0 is not valid" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_launches_skip_finished_sweeps_fill_in_partial_ones_and_run_fresh_ones_whole(tmp_path: Path) -> None:
    table = OmegaConf.create(
        {
            "common": ["logger=csv", "seed=0,1"],
            "sweeps": {"done": ["method=fm_ot"], "half": ["method=icfm"], "new": ["method=ddpm"]},
        }
    )
    for sweep, method, seeds in (("done", "fm_ot", (0, 1)), ("half", "icfm", (1,))):
        for seed in seeds:
            run_dir = tmp_path / sweep / f"run{seed}"
            write_run(tmp_path / sweep, f"run{seed}", method=method, seed=seed)
            (run_dir / ".hydra").mkdir()
            OmegaConf.save(
                OmegaConf.create(["logger=csv", f"seed={seed}", f"method={method}"]),
                run_dir / ".hydra" / "overrides.yaml",
            )
    # half's seed-0 job was killed after its first checkpoint: it resumes instead of starting over its files
    killed = tmp_path / "half" / "run0"
    (killed / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["logger=csv", "seed=0", "method=icfm"]), killed / ".hydra" / "overrides.yaml")
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / "last.ckpt").write_bytes(b"")
    launches = {launch.label: launch.args for launch in pending_launches(table, tmp_path)}
    assert set(launches) == {"half_0", "new"}
    assert launches["half_0"] == [
        "logger=csv",
        "seed=0",
        "method=icfm",
        f"ckpt_path={(killed / 'checkpoints' / 'last.ckpt').resolve()}",
        f"hydra.sweep.dir={tmp_path / 'half'}",
        "hydra.sweep.subdir='0_${method.name}_${data.target}_seed${seed}'",
    ]
    assert launches["new"] == ["logger=csv", "seed=0,1", "method=ddpm", f"hydra.sweep.dir={tmp_path / 'new'}"]
    per_job = [launch.label for launch in pending_launches(table, tmp_path, whole_sweeps=False)]
    assert per_job == ["half_0", "new_0", "new_1"]


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_sigterm_to_a_table_stops_every_job_with_its_checkpoint_and_the_rerun_resumes_them(tmp_path: Path) -> None:
    import signal
    import time

    sweep_dir = tmp_path / "sweep"
    steps = ["logger=csv", "trainer.max_steps=1500", "data.batches_per_epoch=100", "eval.num_samples=64",
             "eval.num_draws=1", "eval.nll_samples=0", "callbacks.sample_logger=null",
             "extras.print_config=false"]  # fmt: skip
    quoted = ",".join(f"'{o}'" for o in steps)
    args = ["table=methods2d", f"sweep_dir={sweep_dir}", "workers=2", f"table.common=[{quoted},'seed=0']",
            "~table.sweeps", "+table.sweeps={fm:['method=fm_ot'],icfm:['method=icfm']}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    table = subprocess.Popen([sys.executable, "-m", "fmlab.table", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    logs = [sweep_dir / "logs" / f"{name}_0.log" for name in ("fm", "icfm")]
    deadline = time.monotonic() + 120
    while not all(log.is_file() and "Epoch 2" in log.read_text() for log in logs):
        assert table.poll() is None and time.monotonic() < deadline, table.stdout.read() if table.poll() else "slow"
        time.sleep(0.2)
    table.send_signal(signal.SIGTERM)  # the table's pid only, as a scheduler preempting it would
    output, _ = table.communicate(timeout=120)
    assert table.returncode == 143, output[-3000:]
    assert processes_mentioning(str(sweep_dir)) == []  # no job left running
    for name in ("fm", "icfm"):
        (job,) = (sweep_dir / name).glob("0_*")
        step = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        assert 200 <= step < 1500 and not (job / "metrics.json").exists()  # checkpointed where it was stopped
    rerun = run_cli("fmlab.table", *args, cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert rerun.stdout.count("ckpt_path=") == 2  # both jobs resumed from their checkpoints, not restarted
    runs = collect_metrics(sweep_dir)
    assert sorted(r["method"] for r in runs) == ["fm_ot", "icfm"] and all(r["steps"] == 1500 for r in runs)


def test_the_one_step_table_charges_each_stage_the_training_it_starts_from() -> None:
    def row(stage: str, seed: int, steps: int, seconds: float, w2: float) -> dict:
        few = {f"w2_steps{k}": w2 / k for k in (1, 2, 4)}
        return {"task": "moons", "stage": stage, "seed": seed, "sampler": "euler", **few, "w2_dopri5": w2 / 8,
                "nfe_dopri5": 100, "straightness": 0.1, "train_steps": steps, "train_seconds": seconds}  # fmt: skip

    rows = [row("teacher", s, 12000, 100.0 + s, 2.0) for s in (0, 1)]
    rows += [row("2-rectified", s, 4000, 50.0, 0.4) for s in (0, 1)] + [row("MeanFlow", 0, 12000, 300.0, 0.5)]
    rows.append(row("2-rectified + distilled (k = 1)", 0, 2000, 20.0, 0.3))
    chained = {(r["stage"], r["seed"]): r for r in with_chain_costs(rows)}
    assert chained[("2-rectified", 1)]["chain_steps"] == 16000 and chained[("2-rectified", 1)]["chain_seconds"] == 151
    assert chained[("2-rectified + distilled (k = 1)", 0)]["chain_seconds"] == 100 + 50 + 20
    assert chained[("MeanFlow", 0)]["chain_steps"] == 12000  # from scratch: its own training only
    markdown = one_step_markdown("moons", "w2", rows)
    lines = {line.split(" (")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "0.400 ± 0.000" in lines["2-rectified"] and "16,000" in lines["2-rectified"]
    assert "MeanFlow, p = 1" not in lines and "(1 seed) | jumps ū" in lines["MeanFlow"]
    # a distilled run whose teacher row is gone cannot be charged: its chain is NaN, not its own cost
    orphan = with_chain_costs([row("2-rectified + distilled (k = 1)", 3, 2000, 20.0, 0.3)])[0]
    assert orphan["chain_steps"] != orphan["chain_steps"]

"""Few-step generation measured on one harness: reflow (teacher, 2-rectified, 2-rectified + 1-step distilled) against
MeanFlow trained from scratch, per seed, on 2D data (from 8 Gaussians and from N(0, I)) and digits.

Each stage is an ordinary `python -m fmlab.train` run (the student: `coupling=reflow coupling.teacher=<teacher>`, the
distilled model: `coupling=reflow` on the 2-rectified flow with `time_sampler=grid time_sampler.k=1`, MeanFlow:
`method=meanflow`), then `python -m fmlab.evaluate` at 1, 2 and 4 steps of the stage's sampler (Euler for reflow,
`solver=mean_flow` jumps for MeanFlow). Finished runs are skipped, so a stopped table resumes; a task's CSV keeps
the rows of stages not measured this time.

    python scripts/one_step_table.py --task moons_gaussian --seeds 0 1 2 --out outputs/one_step
    python scripts/one_step_table.py --task digits --stages MeanFlow --seeds 0 1 2 --out outputs/one_step
    python scripts/one_step_table.py --render > docs/tables/one_step.md
    python scripts/one_step_table.py --grid docs/figures --out outputs/one_step
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from fmlab.io import write_csv
from fmlab.results import FEW_STEPS, ONE_STEP_STAGES, one_step_markdown, one_step_row

TABLES = Path("docs/tables")
# the teacher, and what every stage of a task shares (2D: TorchCFM's 8 Gaussians -> moons pair, or N(0, I) -> moons,
# with I-CFM; digits: experiment=digits_fm_ot); the students train on the linear path (FM-OT, sigma_min 1e-4), as
# Liu et al.; MeanFlow at the teacher's budget (the default 2D 12,000 steps; experiment=digits_meanflow's 2,500)
TASKS = {
    "moons": {
        "teacher": ["method=icfm", "data.source=8gaussians"],
        "student": ["method=fm_ot", "data.source=8gaussians", "trainer.max_steps=4000", "coupling.num_pairs=10000"],
        "distill": ["trainer.max_steps=2000"],
        "meanflow": ["method=meanflow", "data.source=8gaussians"],
        "common": ["eval.num_draws=4", "eval.nll_samples=0"],
        "few_step": [],
        "metric": "w2",
    },
    "moons_gaussian": {
        "teacher": ["method=icfm"],
        "student": ["method=fm_ot", "trainer.max_steps=4000", "coupling.num_pairs=10000"],
        "distill": ["trainer.max_steps=2000"],
        "meanflow": ["method=meanflow"],
        "common": ["eval.num_draws=4", "eval.nll_samples=0"],
        "few_step": [],
        "metric": "w2",
    },
    "digits": {
        "teacher": ["experiment=digits_fm_ot"],
        "student": ["experiment=digits_fm_ot", "trainer.max_steps=1500", "coupling.num_pairs=5000"],
        "distill": ["trainer.max_steps=1000"],
        "meanflow": ["experiment=digits_meanflow"],
        "common": ["eval.num_draws=1", "eval.nll_samples=0", "eval.path_energy=true"],
        "few_step": ["eval.fidelity_metrics=[kid,prc]"],  # at one step: FID alone misjudges a blurry mean image
        "metric": "fid",
    },
}
TAGS = dict(zip(ONE_STEP_STAGES, ("teacher", "rectified", "distilled", "meanflow", "meanflow_p1"), strict=True))


def run(module: str, *args: str, log: Path) -> None:
    with log.open("w") as stream:
        code = subprocess.run([sys.executable, "-m", module, *args], stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed with status {code}; see {log}")


def stage_args(task: dict, stage: str, seed: int, out: Path, prefix: str) -> list[str]:
    """The command line of one stage (reflow's students name the run they start from)."""
    if stage == "teacher":
        return task["teacher"]
    if stage == "2-rectified":
        return [*task["student"], "coupling=reflow", f"coupling.teacher={out / f'{prefix}_teacher_s{seed}'}"]
    if stage == "2-rectified + distilled (k = 1)":
        return [*task["student"], *task["distill"], "coupling=reflow", "time_sampler=grid", "time_sampler.k=1",
                f"coupling.teacher={out / f'{prefix}_rectified_s{seed}'}"]  # fmt: skip
    return [*task["meanflow"], *(["objective.p=1.0"] if stage == "MeanFlow, p = 1" else [])]


def train_stage(task: dict, stage: str, seed: int, out: Path, name: str) -> Path:
    run_dir = out / name
    if (run_dir / "metrics.json").exists():
        return run_dir
    prefix = name.rsplit("_", 2)[0]
    args = [*stage_args(task, stage, seed, out, prefix), *task["common"], f"seed={seed}", "logger=csv",
            "extras.print_config=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run("fmlab.train", *args, log=out / f"{name}.log")
    return run_dir


def few_step_metrics(run_dir: Path, sampler: str, steps: int, task: dict) -> dict:
    """The metrics.json of `fmlab.evaluate` with `steps` steps of `sampler` (run once, then read back)."""
    target = run_dir.parent / f"{run_dir.name}_{sampler}{steps}"
    if not (target / "metrics.json").exists():
        args = [f"ckpt_path={run_dir}", f"solver={sampler}", f"solver.num_steps={steps}", *task["common"]]
        args += task["few_step"] if steps == 1 else []
        args = [a for a in args if not a.startswith("eval.path_energy")] + [f"hydra.run.dir={target}"]
        run("fmlab.evaluate", *args, log=run_dir.parent / f"{target.name}.log")
    return json.loads((target / "metrics.json").read_text())


def measure(task_name: str, seeds: list[int], stages: list[str], out: Path) -> None:
    task = TASKS[task_name]
    table = TABLES / f"one_step_{task_name}.csv"
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    for seed in seeds:
        for stage in stages:
            run_dir = train_stage(task, stage, seed, out, f"{task_name}_{TAGS[stage]}_s{seed}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            few = {k: few_step_metrics(run_dir, ONE_STEP_STAGES[stage], k, task) for k in FEW_STEPS}
            row = one_step_row(task_name, stage, seed, task["metric"], metrics, few)
            rows = [r for r in rows if (r["stage"], str(r["seed"])) != (stage, str(seed))] + [row]
            write_csv(table, sorted(rows, key=lambda r: (list(ONE_STEP_STAGES).index(r["stage"]), int(r["seed"]))))
            print(json.dumps(row), flush=True)


def render() -> str:
    tables = []
    for task_name, task in TASKS.items():
        path = TABLES / f"one_step_{task_name}.csv"
        if path.exists():
            tables.append(one_step_markdown(task_name, task["metric"], list(csv.DictReader(path.open()))))
    return "\n".join(tables)


def sample_pictures(out: Path, target_dir: Path, seed: int = 0, count: int = 64) -> None:
    """One panel per stage of one step of its sampler from the same source noise (seed 0): image grids on digits,
    scatters against held-out data on the 2D tasks."""
    from fmlab.plotting import plot_2d_sample_panels, plot_image_grids
    from fmlab.runs import load_run
    from fmlab.samplers import MeanFlowSampler, ODESolver, sample

    for task_name in TASKS:
        panels, data = [], None
        for stage, sampler in ONE_STEP_STAGES.items():
            run_dir = out / f"{task_name}_{TAGS[stage]}_s{seed}"
            if not (run_dir / "metrics.json").exists():
                continue
            run = load_run(run_dir)
            one = MeanFlowSampler(num_steps=1) if sampler == "mean_flow" else ODESolver("euler", num_steps=1)
            n = count if task_name == "digits" else 2000
            result = sample(run.velocity_field(), run.datamodule.eval_source(n), one)
            panels.append((f"{stage}: 1 {'Euler step' if sampler == 'euler' else 'jump'}", result.samples))
            data = run.datamodule.held_out(n)
        if not panels:
            continue
        target = target_dir / f"one_step_{task_name}_1step.png"
        if task_name == "digits":
            plot_image_grids(panels, target)
        else:
            plot_2d_sample_panels(data, panels, target)
        print(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", nargs="+", choices=list(ONE_STEP_STAGES), default=list(ONE_STEP_STAGES)[:4])
    parser.add_argument("--out", type=Path, default=Path("outputs/one_step"))
    parser.add_argument("--render", action="store_true", help="print the markdown tables of the measured tasks")
    parser.add_argument("--grid", type=Path, help="write each task's 1-step sample pictures (seed 0) into this folder")
    args = parser.parse_args()
    if args.grid:
        sample_pictures(args.out, args.grid)
    elif args.render:
        print(render())
    elif args.task:
        measure(args.task, args.seeds, args.stages, args.out)
    else:
        parser.error("give --task, --render or --grid")


if __name__ == "__main__":
    main()

"""Reflow measured: teacher vs 2-rectified flow vs 2-rectified + 1-step distilled, per seed, on 2D data and digits.

Each stage is an ordinary `python -m fmlab.train` run (the student: `coupling=reflow coupling.teacher=<teacher>`, the
distilled model: `coupling=reflow` on the 2-rectified flow with `time_sampler=grid time_sampler.k=1`), then
`python -m fmlab.evaluate` at 1, 2 and 4 Euler steps. Finished runs are skipped, so a stopped table resumes.

    python scripts/reflow_table.py --task moons --seeds 0 1 2 --out outputs/reflow
    python scripts/reflow_table.py --task digits --seeds 0 1 2 --out outputs/reflow
    python scripts/reflow_table.py --render --out outputs/reflow > docs/tables/reflow.md
    python scripts/reflow_table.py --grid docs/figures/reflow_digits_1step.png --out outputs/reflow
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from fmlab.io import write_csv
from fmlab.results import REFLOW_EULER_STEPS, REFLOW_STAGES, reflow_markdown, reflow_row

# the teacher, and what every stage of a task shares (2D: TorchCFM's 8 Gaussians -> moons pair with I-CFM;
# digits: experiment=digits_fm_ot); the students train on the linear path (FM-OT, sigma_min 1e-4), as Liu et al.
TASKS = {
    "moons": {
        "teacher": ["method=icfm", "data.source=8gaussians"],
        "student": ["method=fm_ot", "data.source=8gaussians", "trainer.max_steps=4000", "coupling.num_pairs=10000"],
        "distill": ["trainer.max_steps=2000"],
        "common": ["eval.num_draws=4", "eval.nll_samples=0"],
        "metric": "w2",
    },
    "digits": {
        "teacher": ["experiment=digits_fm_ot"],
        "student": ["experiment=digits_fm_ot", "trainer.max_steps=1500", "coupling.num_pairs=5000"],
        "distill": ["trainer.max_steps=1000"],
        "common": ["eval.num_draws=1", "eval.nll_samples=0", "eval.path_energy=true"],
        "metric": "fid",
    },
}


def run(module: str, *args: str, log: Path) -> None:
    with log.open("w") as stream:
        code = subprocess.run([sys.executable, "-m", module, *args], stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed with status {code}; see {log}")


def train_stage(task: dict, stage: str, seed: int, out: Path, name: str) -> Path:
    run_dir = out / name
    if (run_dir / "metrics.json").exists():
        return run_dir
    args = [*task["common"], f"seed={seed}", "logger=csv", "extras.print_config=false", f"hydra.run.dir={run_dir}"]
    prefix = name.rsplit("_", 2)[0]
    if stage == REFLOW_STAGES[0]:
        args = [*task["teacher"], *args]
    elif stage == REFLOW_STAGES[1]:
        args = [*task["student"], "coupling=reflow", f"coupling.teacher={out / f'{prefix}_teacher_s{seed}'}", *args]
    else:
        args = [*task["student"], *task["distill"], "coupling=reflow", "time_sampler=grid", "time_sampler.k=1",
                f"coupling.teacher={out / f'{prefix}_rectified_s{seed}'}", *args]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run("fmlab.train", *args, log=out / f"{name}.log")
    return run_dir


def euler_metric(run_dir: Path, steps: int, task: dict) -> float:
    target = run_dir.parent / f"{run_dir.name}_euler{steps}"
    if not (target / "metrics.json").exists():
        args = [f"ckpt_path={run_dir}", "solver=euler", f"solver.num_steps={steps}", *task["common"]]
        args = [a for a in args if not a.startswith("eval.path_energy")] + [f"hydra.run.dir={target}"]
        run("fmlab.evaluate", *args, log=run_dir.parent / f"{target.name}.log")
    return json.loads((target / "metrics.json").read_text())[task["metric"]]


def measure(task_name: str, seeds: list[int], out: Path) -> None:
    task = TASKS[task_name]
    rows = []
    for seed in seeds:
        for stage, tag in zip(REFLOW_STAGES, ("teacher", "rectified", "distilled"), strict=True):
            run_dir = train_stage(task, stage, seed, out, f"{task_name}_{tag}_s{seed}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            euler = {k: euler_metric(run_dir, k, task) for k in REFLOW_EULER_STEPS}
            rows.append(reflow_row(task_name, stage, seed, task["metric"], metrics, euler))
            print(json.dumps(rows[-1]), flush=True)
    write_csv(out / f"{task_name}.csv", rows)


def render(out: Path) -> str:
    tables = []
    for task_name, task in TASKS.items():
        path = out / f"{task_name}.csv"
        if path.exists():
            tables.append(reflow_markdown(task_name, task["metric"], list(csv.DictReader(path.open()))))
    return "\n".join(tables)


def sample_grids(out: Path, target: Path, seed: int = 0, steps: int = 1, count: int = 64) -> None:
    """One image grid per digits stage: `count` samples of `steps` Euler steps from the same source noise."""
    from fmlab.plotting import plot_image_grids
    from fmlab.runs import load_run
    from fmlab.samplers import ODESolver, sample

    panels = []
    for stage, tag in zip(REFLOW_STAGES, ("teacher", "rectified", "distilled"), strict=True):
        run = load_run(out / f"digits_{tag}_s{seed}")
        images = sample(run.velocity_field(), run.datamodule.eval_source(count), ODESolver("euler", num_steps=steps))
        panels.append((f"{stage}: {steps} Euler step{'s' if steps > 1 else ''}", images.samples))
    plot_image_grids(panels, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/reflow"))
    parser.add_argument("--render", action="store_true", help="print the markdown table of the measured tasks")
    parser.add_argument("--grid", type=Path, help="write 1-step digits sample grids of each stage (seed 0) here")
    args = parser.parse_args()
    if args.grid:
        sample_grids(args.out, args.grid)
    elif args.render:
        print(render(args.out))
    elif args.task:
        measure(args.task, args.seeds, args.out)
    else:
        parser.error("give --task or --render")


if __name__ == "__main__":
    main()

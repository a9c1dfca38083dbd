"""fmlab against TorchCFM's own 2D tutorial loop, whole job against whole job: 8 Gaussians -> moons, OT-CFM and
I-CFM, the same number of steps, several seeds.

Each side runs as its own process and is timed from start to exit (interpreter, imports, training and, for fmlab,
its end-of-run evaluation):
- fmlab: `python -m fmlab.train method=<otcfm|icfm> data.source=8gaussians net.width=64 trainer.max_steps=<steps>`
  (batch 256 and Adam's defaults are fmlab's 2D defaults);
- TorchCFM: `TorchCFMLoop` of benchmarks/bench.py (its tutorial loop, torchcfm 1.0.7) in a child process of this
  script, which saves the trained MLP.
Both models are then scored twice, the same way: fmlab's evaluation (its Evaluator and run config: 2,000 points from
the source's fixed evaluation draw through dopri5, W2 against its held-out moons) and TorchCFM's own data (2,000
points of its `sample_8gaussians` through the same dopri5, W2 against 2,000 points of its `sample_moons`, exact OT,
seeded). fmlab is scored with the weights its evaluation uses (EMA); TorchCFM's loop keeps no EMA.

    python scripts/torchcfm_compare.py --seeds 0 1 2 --steps 20000 --out outputs/torchcfm_compare
    python scripts/torchcfm_compare.py --render --out outputs/torchcfm_compare > docs/tables/torchcfm_compare.md

Finished jobs are skipped, so a stopped comparison resumes. Needs the bench extra (`make bench` installs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
METHODS = ("otcfm", "icfm")
# TorchCFM's scoring draws (fixed, the same for every model)
SCORING_SEED = 1234
SCORING_POINTS = 2000


class TorchCFMVelocity(nn.Module):
    """TorchCFM's MLP, which reads [x, t], as the v(t, x) fmlab's samplers call."""

    num_classes = 0

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        times = t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)
        return self.model(torch.cat([x, times], dim=-1))


def fmlab_args(method: str, seed: int, steps: int, run_dir: Path) -> list[str]:
    return [
        f"method={method}",
        "data.source=8gaussians",
        "net.width=64",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        "logger=csv",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
    ]


def timed(command: list[str], log: Path) -> float:
    """Wall seconds of `command`, run to completion with its output in `log`."""
    started = time.perf_counter()
    with log.open("w") as stream:
        code = subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {code}; see {log}")
    return time.perf_counter() - started


def torchcfm_job(method: str, seed: int, steps: int, out: Path) -> None:
    """The child process: TorchCFM's loop for `steps` steps, its MLP saved to `out`."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench import TorchCFMLoop

    loop = TorchCFMLoop(exact_ot=method == "otcfm", seed=seed)
    seconds = loop.run(steps)
    torch.save({"state_dict": loop.model.state_dict(), "train_seconds": seconds}, out)


def torchcfm_scoring_sets() -> tuple[Tensor, Tensor]:
    """2,000 source and 2,000 target points from TorchCFM's own samplers, fixed by SCORING_SEED."""
    from torchcfm.utils import sample_8gaussians, sample_moons

    torch.manual_seed(SCORING_SEED)
    source = sample_8gaussians(SCORING_POINTS)
    np.random.seed(SCORING_SEED)  # torchdyn's moons draw their noise from numpy
    return source, sample_moons(SCORING_POINTS)


def score(run_dir: Path, torchcfm_file: Path) -> dict[str, float]:
    """W2 of both models under fmlab's evaluation and against TorchCFM's own samplers."""
    from hydra.utils import instantiate
    from torchcfm.models.models import MLP

    from fmlab.metrics.distances import wasserstein2
    from fmlab.objectives import VelocityField
    from fmlab.runs import load_run
    from fmlab.samplers import sample

    run = load_run(run_dir)
    saved = torch.load(torchcfm_file, map_location="cpu")
    model = MLP(dim=2, w=64, time_varying=True)
    model.load_state_dict(saved["state_dict"])
    fields = {
        "fmlab": run.velocity_field(),
        "torchcfm": VelocityField(TorchCFMVelocity(model), run.module.objective, run.module.path),
    }
    evaluator = instantiate(run.config.eval, nll_samples=0, path_energy=False)
    solver = instantiate(run.config.solver)
    source, target = torchcfm_scoring_sets()
    scores: dict[str, float] = {"torchcfm_train_seconds": float(saved["train_seconds"])}
    for side, field in fields.items():
        field.net.eval()
        with torch.no_grad():
            scores[f"{side}_w2_fmlab_eval"] = float(evaluator.evaluate(field, run.datamodule)["w2"])
            scores[f"{side}_w2_torchcfm_data"] = wasserstein2(sample(field, source, solver).samples, target)
    return scores


def compare(seeds: list[int], steps: int, out: Path) -> None:
    from fmlab.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for method in METHODS:
            result_file = out / f"{method}_s{seed}.json"
            if result_file.exists():
                continue
            run_dir, torchcfm_file = out / f"fmlab_{method}_s{seed}", out / f"torchcfm_{method}_s{seed}.pt"
            fmlab_wall = timed(
                [sys.executable, "-m", "fmlab.train", *fmlab_args(method, seed, steps, run_dir)],
                out / f"fmlab_{method}_s{seed}.log",
            )
            child = [sys.executable, __file__, "--torchcfm-job", method, str(seed), str(steps), str(torchcfm_file)]
            torchcfm_wall = timed(child, out / f"torchcfm_{method}_s{seed}.log")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            result = {
                "method": method,
                "seed": seed,
                "steps": steps,
                "fmlab_wall_seconds": fmlab_wall,
                "fmlab_train_seconds": metrics["train_seconds"],
                "fmlab_w2_metrics_json": metrics["w2"],
                "torchcfm_wall_seconds": torchcfm_wall,
                **score(run_dir, torchcfm_file),
            }
            write_json(result_file, result)
            print(json.dumps(result), flush=True)


def render(out: Path) -> str:
    """Markdown: mean ± std over seeds of every measured column, per method."""
    rows = [json.loads(path.read_text()) for path in sorted(out.glob("*_s*.json"))]
    columns = [
        ("wall s", "fmlab_wall_seconds", "torchcfm_wall_seconds", 0),
        ("training s", "fmlab_train_seconds", "torchcfm_train_seconds", 0),
        ("W2, fmlab's evaluation", "fmlab_w2_fmlab_eval", "torchcfm_w2_fmlab_eval", 3),
        ("W2 vs TorchCFM's sample_moons", "fmlab_w2_torchcfm_data", "torchcfm_w2_torchcfm_data", 3),
    ]
    lines = [
        "| method | side | " + " | ".join(name for name, *_ in columns) + " | seeds |",
        "|---|---|" + "---|" * (len(columns) + 1),
    ]
    for method in METHODS:
        chosen = [row for row in rows if row["method"] == method]
        if not chosen:
            continue
        for side, index in (("fmlab", 1), ("TorchCFM", 2)):
            cells = []
            for column in columns:
                values = [row[column[index]] for row in chosen]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.{column[3]}f} ± {spread:.{column[3]}f}")
            seeds = ", ".join(str(row["seed"]) for row in chosen)
            label = "OT-CFM" if method == "otcfm" else "I-CFM"
            lines.append(f"| {label} | {side} | " + " | ".join(cells) + f" | {seeds} |")
    steps = {row["steps"] for row in rows}
    lines.append("")
    lines.append(f"{', '.join(map(str, sorted(steps)))} steps of batch 256; mean ± std over seeds.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("outputs/torchcfm_compare"))
    parser.add_argument("--render", action="store_true", help="print the markdown table of the finished jobs")
    parser.add_argument("--torchcfm-job", nargs=4, metavar=("METHOD", "SEED", "STEPS", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchcfm_job:
        method, seed, steps, file = args.torchcfm_job
        torchcfm_job(method, int(seed), int(steps), Path(file))
    elif args.render:
        print(render(args.out))
    else:
        compare(args.seeds, args.steps, args.out)


if __name__ == "__main__":
    main()

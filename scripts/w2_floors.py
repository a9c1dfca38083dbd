"""The W2 floor of 2D datasets: W2 between the held-out set and `--draws` independent draws of the same size.

What a perfect sampler scores, with its spread: a published W2 below this range cannot come from this evaluation.

    python scripts/w2_floors.py data=tong_8gaussians data=tong_moons_8gaussians data=tong_moons data=tong_scurve
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from hydra.utils import instantiate

from fmlab.cli import compose_train_config
from fmlab.metrics.distances import wasserstein2


def floors(data_override: str, draws: int, num_samples: int | None) -> list[float]:
    overrides = [data_override] + ([f"data.num_eval_samples={num_samples}"] if num_samples else [])
    data = instantiate(compose_train_config(overrides, tempfile.mkdtemp()).data)
    held_out = data.held_out()
    return [wasserstein2(data.held_out(index=k), held_out) for k in range(1, draws + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="data=<option> overrides, one per dataset")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=None, help="default: the dataset's num_eval_samples")
    args = parser.parse_args()
    print("| data | W2 floor (mean ± std) | min | max | draws |\n|---|---|---|---|---|")
    for override in args.data:
        values = floors(override, args.draws, args.num_samples)
        mean, std = statistics.fmean(values), statistics.stdev(values)
        print(f"| {override} | {mean:.3f} ± {std:.3f} | {min(values):.3f} | {max(values):.3f} | {len(values)} |")


if __name__ == "__main__":
    main()

"""Cheng & Schwing 2025's 2D experiment as their released code runs it, written out on its own, to cross-check
fmlab's `experiment=c2ot_moons_<fm|ot|c2ot>` and to bisect between the two.

The protocol of hkchengrex/C2OT at commit 26253f2 (`moons.py`, `c2ot/ot.py`, `c2ot/utils/playground_utils.py`):
- data: 8 Gaussians (centres 5 × the 8 unit directions, covariance √0.1 I, torch's global RNG) → torchdyn's moons
  (evenly spaced angles, one U(0, 0.2) offset per point from NumPy's global RNG, × 3 − 1, not shuffled); the condition
  is the class as ±1 (`cls`) or the point's x or y coordinate;
- coupling, per draw of 1,024 points: none (`fm`), SciPy's `linear_sum_assignment` on ‖x0 − x1‖² (`ot`), or on
  ‖x0 − x1‖² + w C(y, y) (`c2ot`: cosine C and w = 1e6 for classes; squared C for x/y with w searched per batch for
  the ratio r = 0.05, starting from the w the previous batch found); the condition follows x1;
- the draw cut into 4 training batches of 256 in order; t ~ U(0, 1); x_t = t x1 + (1 − t) x0; MSE to x1 − x0;
- the net: x, t and the condition each through a linear map to width 128 and added, 3 residual blocks
  Linear(128, 512) GELU Linear(512, 128), a linear map back (PyTorch's default init); Adam, lr 3e-4, 20,000 steps;
- evaluation after re-seeding torch and NumPy with the run's seed: 10,000 fresh source points conditioned on the
  conditions of 10,000 fresh data points; dopri5 at atol = rtol = 1e-4 in batches of 256 (torchdyn there, torchdiffeq
  here) and one Euler step on all of them; POT's emd2 (numItermax 1e8) on the squared Euclidean cost: W2².

`--fmlab PART[,PART]` swaps one part for fmlab's (its own config: `experiment=c2ot_moons_<type> conditioning=...`,
built by `fmlab.build.build_parts`), so a number that jumps names the part:
  data       the training batches of fmlab's datamodule, coupled by fmlab's coupling (its samplers and its pairing)
  coupling   fmlab's coupling applied to the reference's draws
  net        fmlab's net (its init, its condition embedding)
  loss       fmlab's loss: its time sampler, path and objective (FlowModule._loss)
  optimizer  fmlab's optimiser as the run configures it (FlowModule.configure_optimizers)
  stepseed   torch's generator reseeded before every step from (seed, step), as fmlab's StepSeed callback does
  eval       fmlab's Evaluator instead of the reference's evaluation
`--score-run DIR` scores a finished fmlab run's last checkpoint with the reference's evaluation (and no training).

    python scripts/c2ot_reference.py ot x --seeds 0 1 2                 # the paper's protocol, full budget
    python scripts/c2ot_reference.py ot x --seeds 0 1 2 --short         # 2,000 steps, 2,000 evaluation points
    python scripts/c2ot_reference.py ot x --seeds 0 --fmlab net         # bisect: fmlab's net, the rest theirs
    python scripts/c2ot_reference.py ot x --seeds 0 --score-run outputs/train/runs/<run>

Each result is one JSON line on stdout (and appended to `--out` when given).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchdiffeq import odeint

TOTAL_STEPS = 20_000
BATCH = 256
OT_BATCH = 1024
EVAL_POINTS = 10_000
WIDTH, DEPTH = 128, 3
SWAPPABLE = ("data", "coupling", "net", "loss", "optimizer", "stepseed", "eval")
# fmlab's name of each condition of moons.py
FMLAB_CONDITIONING = {"unc": "conditioning=none", "x": "conditioning=x",
                      "y": "conditioning=continuous conditioning.condition=y",
                      "cls": "conditioning=continuous conditioning.condition=class_sign"}  # fmt: skip


# ---- the reference's data --------------------------------------------------------------------------------------
def eight_gaussians(n: int) -> Tensor:
    """Centres 5 (±1, 0), 5 (0, ±1), 5 (±1/√2, ±1/√2); noise N(0, √0.1 I) (their `var` passed as a covariance)."""
    noise = torch.distributions.MultivariateNormal(torch.zeros(2), math.sqrt(0.1) * torch.eye(2)).sample((n,))
    modes = torch.multinomial(torch.ones(8), n, replacement=True)
    s = 1 / math.sqrt(2)
    centres = 5 * torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    return (centres[modes] + noise).float()


def moons(n: int) -> tuple[Tensor, Tensor]:
    """torchdyn's `generate_moons(n, noise=0.2)` × 3 − 1: evenly spaced angles, outer half first, one U(0, 0.2) offset
    (NumPy's global RNG) added to both coordinates of a point; and each point's moon (0 outer, 1 inner)."""
    outer, inner = n // 2, n - n // 2
    a, b = np.linspace(0, np.pi, outer), np.linspace(0, np.pi, inner)
    points = np.stack([np.concatenate([np.cos(a), 1 - np.cos(b)]), np.concatenate([np.sin(a), 0.5 - np.sin(b)])], 1)
    points = points + np.random.rand(n, 1) * 0.2
    labels = np.concatenate([np.zeros(outer), np.ones(inner)])
    return torch.tensor(points, dtype=torch.float32) * 3 - 1, torch.tensor(labels, dtype=torch.long)


def condition_of(points: Tensor, labels: Tensor, kind: str) -> Tensor | None:
    if kind == "cls":
        return labels[:, None].float() * 2 - 1
    return {"x": points[:, 0:1], "y": points[:, 1:2]}.get(kind)


# ---- the reference's coupling ----------------------------------------------------------------------------------
def ratio_below_diagonal(distance: Tensor, condition: Tensor, weight: float) -> float:
    return float(((distance + weight * condition) <= torch.diag(distance)).float().mean())


def searched_weight(distance: Tensor, condition: Tensor, target: float, start: float, steps: int = 10,
                    tolerance: float = 1e-3, largest: float = 1e8) -> float:  # fmt: skip
    """c2ot/ot.py's search: w = 0 if r(0) < target, else double from `start` until r(w) ≤ target, then bisect."""
    if ratio_below_diagonal(distance, condition, 0.0) < target:
        return 0.0
    low, high = 0.0, start
    for _ in range(steps):
        if ratio_below_diagonal(distance, condition, high) <= target:
            break
        low, high = high, high * 2
        if high > largest:
            return largest
    middle = high
    for _ in range(steps):
        middle = (low + high) / 2
        ratio = ratio_below_diagonal(distance, condition, middle)
        low, high = (low, middle) if ratio < target else (middle, high)
        if abs(ratio - target) < tolerance:
            break
    return middle


class ReferenceCoupling:
    """The pairing of their `OTConditionalPlanSampler` for moons.py's three types (stateful, as theirs: `c2ot` with a
    continuous condition starts each search from the weight the previous batch found)."""

    def __init__(self, kind: str, condition: str) -> None:
        self.kind, self.condition = kind, condition
        self.weight: float | None = None
        if kind == "c2ot":
            self.weight = 1e6 if condition == "cls" else 100.0
        self.search = kind == "c2ot" and condition != "cls"

    def __call__(self, x0: Tensor, x1: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.kind == "fm":
            return x0, x1, y
        cost = torch.cdist(x0, x1) ** 2
        if self.weight:  # their `if self.condition_weight:`: a weight that became 0 stays plain OT
            if self.condition == "cls":
                unit = y / y.norm(dim=1, keepdim=True)
                condition = 1 - unit @ unit.T
            else:
                condition = torch.cdist(y, y) ** 2
            if self.search:
                self.weight = searched_weight(cost, condition, 0.05, self.weight)
            cost = cost + self.weight * condition
        i, j = linear_sum_assignment(cost.numpy())
        return x0[i], x1[j], (y[j] if y is not None else None)


# ---- the reference's net ---------------------------------------------------------------------------------------
class ReferenceNet(nn.Module):
    """v(x, c, t) = out(blocks(P x + Q c + T t)), blocks h + W2 GELU(W1 h) (their `ConditionalNet` / `SimpleNet`)."""

    def __init__(self, conditional: bool) -> None:
        super().__init__()
        self.input_proj = nn.Linear(2, WIDTH)
        self.cond_proj = nn.Linear(1, WIDTH) if conditional else None
        self.time_emb = nn.Linear(1, WIDTH)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)) for _ in range(DEPTH)
        )
        self.output_proj = nn.Linear(WIDTH, 2)

    def forward(self, x: Tensor, c: Tensor | None, t: Tensor) -> Tensor:
        h = self.input_proj(x) + self.time_emb(t)
        if self.cond_proj is not None:
            h = h + self.cond_proj(c)
        for block in self.blocks:
            h = block(h) + h
        return self.output_proj(h)


class FmlabNet(nn.Module):
    """fmlab's net called as the reference calls its own: model(x, c, t)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, c: Tensor | None, t: Tensor) -> Tensor:
        return self.net(t.reshape(-1), x, labels=c) if c is not None else self.net(t.reshape(-1), x)


class AsFmlabNet(nn.Module):
    """A reference-layout model called as fmlab calls a net: net(t, x, labels=c)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.condition_dim = 1 if getattr(inner, "cond_proj", None) is not None else 0

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.inner(x, labels, t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1))


# ---- training --------------------------------------------------------------------------------------------------
def reference_batches(kind: str, condition: str, coupling: Callable) -> Iterator[tuple[Tensor, ...]]:
    """Endless training batches: each draw of 1,024 coupled as one and cut into 4 batches of 256 in order."""
    while True:
        x0 = eight_gaussians(OT_BATCH)
        x1, labels = moons(OT_BATCH)
        x0, x1, y = coupling(x0, x1, condition_of(x1, labels, condition))
        for start in range(0, OT_BATCH, BATCH):
            rows = slice(start, start + BATCH)
            yield x0[rows], x1[rows], (y[rows] if y is not None else None)


def fmlab_coupling(parts: Any) -> Callable:
    """fmlab's coupling of the run (float conditions ride along as its labels)."""

    def couple(x0: Tensor, x1: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        coupled = parts.coupling(x0, x1, y) if y is not None else parts.coupling(x0, x1)
        return coupled[0], coupled[1], (coupled[2] if y is not None else None)

    return couple


def fmlab_batches(parts: Any) -> Iterator[tuple[Tensor, ...]]:
    """The training batches fmlab's datamodule makes (batch i of its stream, coupled there)."""
    index = 0
    while True:
        batch = parts.datamodule._stream.batch(index)
        index += 1
        yield batch[0], batch[1], (batch[2].float() if len(batch) > 2 else None)


def reference_loss(model: nn.Module, x0: Tensor, x1: Tensor, y: Tensor | None) -> Tensor:
    t = torch.rand(x0.shape[0])
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    return torch.nn.functional.mse_loss(model(x_t, y, t[:, None]), x1 - x0)


def train(args: argparse.Namespace, seed: int, swaps: set[str], parts: Any) -> nn.Module:
    torch.manual_seed(seed)
    np.random.seed(seed)
    conditional = args.condition != "unc"
    model: nn.Module = FmlabNet(parts.module.net) if "net" in swaps else ReferenceNet(conditional)
    scheduler = None
    if "optimizer" in swaps:  # fmlab's optimiser and schedule as the run configures them, on this model's weights
        optimizer = parts.module.optimizer_factory(params=model.parameters())
        if parts.module.scheduler_factory is not None:
            scheduler = parts.module.scheduler_factory(optimizer=optimizer)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    if "data" in swaps:
        batches = fmlab_batches(parts)
    else:
        coupling = fmlab_coupling(parts) if "coupling" in swaps else ReferenceCoupling(args.type, args.condition)
        batches = reference_batches(args.type, args.condition, coupling)
    if "loss" in swaps:  # fmlab's loss of this model: its time draw, path and objective
        parts.module.net = model.net if isinstance(model, FmlabNet) else AsFmlabNet(model)

        def loss_of(m: nn.Module, x0: Tensor, x1: Tensor, y: Tensor | None) -> Tensor:
            return parts.module._loss(x0, x1, y, drop_labels=True)
    else:
        loss_of = reference_loss
    model.train()
    recent: list[float] = []
    for step in range(args.steps):
        if "stepseed" in swaps:
            from fmlab.seeding import stream_seed

            torch.default_generator.manual_seed(stream_seed(seed, "step", 0, step))
        x0, x1, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, x0, x1, y)
        loss.backward()
        optimizer.step()
        recent = [*recent[-49:], float(loss.detach())]
        if scheduler is not None:
            scheduler.step()
    model.train_loss = sum(recent) / len(recent)  # the mean of the last 50 steps, as fmlab logs it
    return model


# ---- evaluation ------------------------------------------------------------------------------------------------
class Counted(nn.Module):
    """dx/dt = model(x, c, t) for torchdiffeq, counting calls."""

    def __init__(self, model: nn.Module, c: Tensor | None) -> None:
        super().__init__()
        self.model, self.c, self.nfe = model, c, 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return self.model(x, self.c, t.reshape(1, 1).expand(x.shape[0], 1))


def squared_w2(x: Tensor, y: Tensor) -> tuple[float, int]:
    """POT's emd2 on the squared Euclidean cost with their iteration cap, and POT's result code (1: optimal)."""
    value, log = ot.emd2([], [], ot.dist(x.double(), y.double()), numItermax=int(1e8), log=True)
    return float(value), int(log["result_code"])


@torch.inference_mode()
def reference_evaluation(model: nn.Module, condition: str, seed: int, points: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.eval()
    x0 = eight_gaussians(points)
    x1, labels = moons(points)
    y = condition_of(x1, labels, condition)
    generated, nfe = [], []
    for start in range(0, points, BATCH):
        field = Counted(model, y[start : start + BATCH] if y is not None else None)
        end = odeint(field, x0[start : start + BATCH], torch.tensor([0.0, 1.0]), method="dopri5", atol=1e-4,
                     rtol=1e-4)[-1]  # fmt: skip
        generated.append(end)
        nfe.append(field.nfe)
    one_step = x0 + Counted(model, y)(torch.zeros(()), x0)
    w2_squared, code = squared_w2(x1, torch.cat(generated))
    w2_squared_euler1, code_euler1 = squared_w2(x1, one_step)
    return {"w2_squared": w2_squared, "w2_squared_euler1": w2_squared_euler1, "nfe": float(np.mean(nfe)),
            "emd_result_codes": [code, code_euler1]}  # fmt: skip


def fmlab_evaluation(model: nn.Module, parts: Any) -> dict[str, Any]:
    from fmlab.objectives import VelocityField

    net = model.net if isinstance(model, FmlabNet) else AsFmlabNet(model)
    metrics = parts.evaluator.evaluate(VelocityField(net, parts.module.objective, parts.module.path, False),
                                       parts.datamodule)  # fmt: skip
    return {key: metrics[key] for key in ("w2_squared", "w2_squared_euler1", "nfe")}


def build_fmlab(args: argparse.Namespace, seed: int, out: Path) -> Any:
    from fmlab.build import build_parts, quiet_lightning
    from fmlab.cli import compose_train_config

    overrides = [f"experiment=c2ot_moons_{args.type}", *FMLAB_CONDITIONING[args.condition].split(), f"seed={seed}",
                 f"trainer.max_steps={args.steps}", f"data.num_eval_samples={args.eval_points}",
                 "logger=none"]  # fmt: skip
    with quiet_lightning():
        return build_parts(compose_train_config(overrides, out / f"fmlab_{args.type}_{args.condition}_{seed}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("type", choices=["fm", "ot", "c2ot"])
    parser.add_argument("condition", choices=["unc", "cls", "x", "y"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=TOTAL_STEPS)
    parser.add_argument("--eval-points", type=int, default=EVAL_POINTS)
    parser.add_argument("--short", action="store_true", help="2,000 steps and 2,000 evaluation points")
    parser.add_argument("--fmlab", default="", help=f"parts to take from fmlab: comma-separated of {SWAPPABLE}")
    parser.add_argument("--score-run", type=Path, help="score this fmlab run with the reference's evaluation")
    parser.add_argument("--out", type=Path, help="append each result as a JSON line to this file")
    args = parser.parse_args()
    if args.short:
        args.steps, args.eval_points = 2000, 2000
    swaps = {part for part in args.fmlab.split(",") if part}
    if not swaps <= set(SWAPPABLE):
        parser.error(f"--fmlab {args.fmlab}: choose from {', '.join(SWAPPABLE)}")
    torch.set_num_threads(1)
    scratch = Path(args.out).parent if args.out else Path("outputs/c2ot_reference")
    for seed in args.seeds:
        started = time.perf_counter()
        if args.score_run is not None:
            from fmlab.runs import load_run

            run = load_run(args.score_run, use_ema=False)
            result = reference_evaluation(FmlabNet(run.net), args.condition, seed, args.eval_points)
            result["scored_run"] = str(args.score_run)
        else:
            parts = build_fmlab(args, seed, scratch) if swaps else None
            model = train(args, seed, swaps, parts)
            evaluated = fmlab_evaluation(model, parts) if "eval" in swaps else None
            result = evaluated or reference_evaluation(model, args.condition, seed, args.eval_points)
            result["train_loss"] = model.train_loss
        result.update(type=args.type, condition=args.condition, seed=seed, steps=args.steps,
                      eval_points=args.eval_points, fmlab_parts=sorted(swaps),
                      seconds=round(time.perf_counter() - started, 1))  # fmt: skip
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as file:
                file.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())

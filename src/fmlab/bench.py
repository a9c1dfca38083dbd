"""`make bench`: fmlab's costs as ratios to bare loops doing the same work, measured side by side in one run.

Each row alternates the two sides for several rounds and reports the ratio of their best times (as `timeit`
does: on a shared machine the fastest round is the least disturbed one), with every round's own ratio beside it.
Rows:
- train step: `python -m fmlab.train`'s training loop (Lightning, FlowModule, the default per-step callbacks and
  CSV logging) against a hand-written PyTorch loop with the same net, data stream, optimiser, LR schedule and EMA.
- minibatch OT: the same comparison for `method=otcfm` (exact OT pairing each step on both sides).
- U-Net: the same comparison for FM-OT on 8×8 digits with `net=unet_small` (1/20 of the steps: each costs more).
- sampler: `fmlab.sampling.sample` (the Evaluator's path: objective → velocity, NFE count, t-range guard) against
  a bare `torchdiffeq.odeint` call on the same net, source batch, method and tolerance.
- evaluation throughput: samples/s of generation + W2/MMD (moons) or + FID (digits features), and held-out
  points/s of the PF-ODE likelihood (exact divergence on moons, Hutchinson on digits); absolute rates, no ratio.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from fmlab.distributed import Ranks
from fmlab.utils.config import compose_train_config, instantiate_each


class StepClock(L.Callback):
    """Seconds per training step after `warmup` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.steps = warmup, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps = trainer.global_step - self.warmup
        self.seconds_per_step = (time.perf_counter() - self.started) / self.steps


def fmlab_step_seconds(overrides: list[str], steps: int, warmup: int) -> float:
    """Per-step seconds of fmlab's training loop as `python -m fmlab.train` runs it, minus end-of-fit evaluation."""
    from fmlab.train import build_callbacks, build_module

    with TemporaryDirectory() as tmp:
        cfg = compose_train_config(
            [
                *overrides,
                "logger=csv",
                f"trainer.max_steps={steps}",
                "~callbacks.evaluator",
                "~callbacks.sample_logger",
            ],
            Path(tmp),
        )
        L.seed_everything(cfg.seed, verbose=False)
        clock = StepClock(warmup)
        callbacks = [*build_callbacks(cfg), clock]
        loggers = instantiate_each(cfg.logger)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, enable_progress_bar=True)
        trainer.fit(build_module(cfg), datamodule=instantiate(cfg.data))
    return clock.seconds_per_step


def bare_step_seconds(overrides: list[str], steps: int, warmup: int) -> float:
    """The same work in a plain PyTorch loop: same net, data stream, optimiser, schedule, coupling and EMA decay."""
    with TemporaryDirectory() as tmp:
        cfg = compose_train_config(overrides, Path(tmp))
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.net)
    ema = copy.deepcopy(net).requires_grad_(False)
    coupling = instantiate(cfg.coupling)
    schedule = instantiate(cfg.schedule)
    smoothing = float(cfg.path.smoothing_sigma) if cfg.path.smoothing == "constant" else 0.0
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer) if cfg.get("scheduler") else None
    decay = float(cfg.callbacks.ema.decay)
    batches = iter(datamodule.train_dataloader())
    started = 0.0
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        try:
            x0, x1 = next(batches)
        except StopIteration:
            batches = iter(datamodule.train_dataloader())
            x0, x1 = next(batches)
        x0, x1 = coupling(x0, x1)
        t = torch.rand(x1.shape[0]).view(-1, *[1] * (x1.dim() - 1))
        x_t = schedule.alpha(t) * x1 + schedule.sigma(t) * x0
        u_t = schedule.d_alpha(t) * x1 + schedule.d_sigma(t) * x0
        if smoothing:
            x_t = x_t + smoothing * torch.randn_like(x1)
        loss = (net(t.reshape(-1), x_t) - u_t).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
    return (time.perf_counter() - started) / (steps - warmup)


def compare(name: str, overrides: list[str], steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    ours, bare = [], []
    for _ in range(rounds):
        bare.append(bare_step_seconds(overrides, steps, warmup))
        ours.append(fmlab_step_seconds(overrides, steps, warmup))
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    return {
        "name": name,
        "fmlab_ms": 1e3 * min(ours),
        "bare_ms": 1e3 * min(bare),
        "ratio": min(ours) / min(bare),
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def sampler_seconds(num_samples: int, repeats: int) -> tuple[float, float, int]:
    """Best-of-`repeats` seconds of one dopri5 (1e-5) generation of `num_samples` 2D points: fmlab, bare, NFE."""
    from torchdiffeq import odeint

    from fmlab.sampling import VelocityField, sample

    with TemporaryDirectory() as tmp:
        cfg = compose_train_config([], Path(tmp))
    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.net).eval()
    field = VelocityField(net, instantiate(cfg.objective), instantiate(cfg.path))
    solver = instantiate(cfg.solver)
    x0 = torch.randn(num_samples, 2)

    def bare_field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return net(t.expand(x.shape[0]), x)

    ours, bare = [], []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            result = sample(field, x0, solver)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            odeint(bare_field, x0, torch.tensor([0.0, 1.0]), method="dopri5", atol=solver.atol, rtol=solver.rtol)
            bare.append(time.perf_counter() - started)
    return min(ours), min(bare), result.nfe


def evaluation_throughput(data: str, num_samples: int, nll_samples: int) -> dict[str, float]:
    """Samples/s of the Evaluator's generation + metrics and points/s of its likelihood, on an untrained net."""
    from fmlab.train import build_module

    with TemporaryDirectory() as tmp:
        cfg = compose_train_config([f"data={data}", f"eval.fid.cache_dir={tmp}"], Path(tmp))
        torch.manual_seed(cfg.seed)
        module, datamodule = build_module(cfg), instantiate(cfg.data)
        sampling = instantiate(cfg.eval, num_samples=num_samples, num_draws=1, nll_samples=0)
        sampling.evaluate(module, datamodule)  # builds the FID reference once, outside the timing
        started = time.perf_counter()
        generated = sampling.evaluate(module, datamodule)
        generation_seconds = time.perf_counter() - started
        likelihood = instantiate(cfg.eval, num_samples=2, num_draws=1, nll_samples=nll_samples)
        started = time.perf_counter()
        scored = likelihood.negative_log_likelihood(module.velocity_field(), datamodule, Ranks())
        nll_seconds = time.perf_counter() - started
    return {
        "samples_per_second": num_samples / generation_seconds,
        "nfe": generated["nfe"],
        "nll_points_per_second": nll_samples / nll_seconds,
        "nll_nfe": scored["nll_nfe"],
        "divergence": scored["nll_divergence"],
        "metric": "fid" if "fid" in generated else "w2",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, default=200, help="steps left out of each measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per row")
    args = parser.parse_args()
    rows = [
        compare("train step, FM-OT 2D MLP (default job)", [], args.steps, args.warmup, args.rounds),
        compare(
            "train step, OT-CFM 2D MLP (exact minibatch OT)", ["method=otcfm"], args.steps, args.warmup, args.rounds
        ),
    ]
    unet_steps, unet_warmup = max(args.steps // 20, 10), max(args.warmup // 20, 3)
    rows.append(
        compare(
            "train step, FM-OT digits unet_small",
            ["data=digits", "net=unet_small"],
            unet_steps,
            unet_warmup,
            args.rounds,
        )
    )
    ours, bare, nfe = sampler_seconds(num_samples=2000, repeats=10 * args.rounds)
    rows.append(
        {
            "name": f"sampler, dopri5 1e-5, 2000 points ({nfe} NFE)",
            "fmlab_ms": 1e3 * ours,
            "bare_ms": 1e3 * bare,
            "ratio": ours / bare,
            "ratios": [],
        }
    )
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{'measurement (best of each side)':52s} {'fmlab ms':>9s} {'bare ms':>8s} {'ratio':>6s}  per-round ratios")
    for row in rows:
        rounds = " ".join(f"{r:.2f}" for r in row["ratios"])
        print(f"{row['name']:52s} {row['fmlab_ms']:9.3f} {row['bare_ms']:8.3f} {row['ratio']:6.2f}  {rounds}")
    print(f"\n{'evaluation throughput (untrained net, dopri5 1e-5)':52s} {'samples/s':>9s} {'NLL pts/s':>10s}")
    for data, samples, nll_points in (("moons", 2000, 250), ("digits", 2000, 100)):
        rate = evaluation_throughput(data, samples, nll_points)
        name = f"{data}: generation + {rate['metric']} (NFE {rate['nfe']:.0f}), NLL {rate['divergence']}"
        print(f"{name:52s} {rate['samples_per_second']:9.0f} {rate['nll_points_per_second']:10.1f}")


if __name__ == "__main__":
    main()

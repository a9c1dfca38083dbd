"""`make bench`: fmlab's costs as ratios to bare loops doing the same work, measured side by side in one run.

Each row interleaves the two sides in short chunks inside one process (training: the bare loop runs `chunk` steps
after every `chunk` steps of fmlab's loop, from a callback, and its time is left out of fmlab's), so the machine's
drift in speed hits both sides of a pair alike. It reports total time over total time, with the quartiles of the
per-pair ratios beside it.
Rows:
- train step: `python -m fmlab.train`'s training loop (Lightning, FlowModule, every callback of the default job,
  CSV logging) against a hand-written PyTorch loop with the same net, data stream, optimiser, LR schedule and EMA.
- minibatch OT: the same comparison for `method=otcfm` (exact OT pairing each step on both sides; fmlab's runs in
  its loader worker, the bare loop's on its own thread).
- TorchCFM: TorchCFM's published 2D tutorial loop (PyPI torchcfm 1.0.7, `make bench` installs it) against fmlab's
  equivalent run (`method=otcfm|icfm data.source=8gaussians net.width=64`, batch 256), for OT-CFM and I-CFM; and
  fmlab's OT-CFM step over its I-CFM step, from those two rows.
- U-Net: the same comparison for FM-OT on 8×8 digits with `net=unet_small` (1/20 of the steps: each costs more).
- sampler: `fmlab.sampling.sample` (the Evaluator's path: objective → velocity, NFE count, t-range guard) against
  a bare `torchdiffeq.odeint` call on the same net, source batch, method and tolerance.
- Lightning's own cost: an empty step (one scalar parameter, SGD) in `Trainer.fit` with no callbacks, with 10
  no-op callbacks, and in a bare loop: the loop's fixed cost per step and each callback's, and what they predict
  for the default job's overhead beside the measured one.
- evaluation throughput: samples/s of generation + W2/MMD (moons) or + FID (digits features), and held-out
  points/s of the PF-ODE likelihood (exact divergence on moons, Hutchinson on digits); absolute rates, no ratio.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from fmlab.cli import compose_train_config
from fmlab.distributed import Ranks


def synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock mark times what was asked, not what was queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BareLoop:
    """fmlab's training step written as a plain PyTorch loop: the same net, data stream, optimiser, LR schedule,
    coupling and EMA decay as the run `overrides` configure, with no Lightning, callbacks or logging; on the device
    of the run's `trainer.accelerator`, with its `trainer.precision` (bf16-mixed: autocast to bfloat16) and its
    `performance` switches (TF32, compile) and the net's own `channels_last`."""

    def __init__(self, overrides: list[str]) -> None:
        from fmlab.nets.performance import configure_throughput

        with TemporaryDirectory() as tmp:
            cfg = compose_train_config(overrides, Path(tmp))
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
        precision = str(cfg.trainer.get("precision", "32-true"))
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise ValueError(f"the bare loop runs 32-true and bf16-mixed, not trainer.precision={precision}")
        self.autocast = precision == "bf16-mixed"
        self.datamodule = instantiate(cfg.data)
        self.net = configure_throughput(instantiate(cfg.net), **(cfg.get("performance") or {})).to(self.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.coupling = instantiate(cfg.coupling)
        self.schedule = instantiate(cfg.schedule)
        self.smoothing = float(cfg.path.smoothing_sigma) if cfg.path.smoothing == "constant" else 0.0
        self.optimizer = instantiate(cfg.optimizer)(params=self.net.parameters())
        self.scheduler = instantiate(cfg.scheduler)(optimizer=self.optimizer) if cfg.get("scheduler") else None
        self.decay = float(cfg.callbacks.ema.decay)
        self.batches = iter(self.datamodule.train_dataloader())
        self.steps_done = 0

    def run(self, steps: int) -> float:
        """Seconds taken by `steps` training steps."""
        started = time.perf_counter()
        for _ in range(steps):
            try:
                x0, x1 = next(self.batches)
            except StopIteration:
                self.batches = iter(self.datamodule.train_dataloader())
                x0, x1 = next(self.batches)
            x0, x1 = self.coupling(x0, x1)
            x0, x1 = x0.to(self.device, non_blocking=True), x1.to(self.device, non_blocking=True)
            t = torch.rand(x1.shape[0], device=self.device).view(-1, *[1] * (x1.dim() - 1))
            x_t = self.schedule.alpha(t) * x1 + self.schedule.sigma(t) * x0
            u_t = self.schedule.d_alpha(t) * x1 + self.schedule.d_sigma(t) * x0
            if self.smoothing:
                x_t = x_t + self.smoothing * torch.randn_like(x1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                prediction = self.net(t.reshape(-1), x_t)
            loss = (prediction.float() - u_t).pow(2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - self.decay)
        synchronize()
        self.steps_done += steps
        return time.perf_counter() - started


class InterleavedBareLoop(L.Callback):
    """Runs the bare loop inside fmlab's run, `chunk` steps after every `chunk` steps of fmlab's loop, and times
    both: each pair of chunks sees the same machine state, so drift in the machine's speed cancels in their ratio.
    The time spent in the bare chunk is left out of fmlab's chunk."""

    def __init__(self, bare: BareLoop, chunk: int, warmup: int) -> None:
        self.bare, self.chunk, self.warmup = bare, chunk, warmup
        self.ours: list[float] = []
        self.bare_seconds: list[float] = []
        self.mark: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step < self.warmup or step % self.chunk:
            return
        synchronize()
        if self.mark is None:
            self.bare.run(self.warmup)  # the bare loop's own warm-up, untimed
        else:
            self.ours.append(time.perf_counter() - self.mark)
            self.bare_seconds.append(self.bare.run(self.chunk))
        self.mark = time.perf_counter()


def paired_row(name: str, ours: list[float], bare: list[float], per: int) -> dict[str, Any]:
    """Total-time ratio of paired measurements, with the quartiles of the per-pair ratios as their spread."""
    quartiles = statistics.quantiles([o / b for o, b in zip(ours, bare, strict=True)], n=4)
    return {
        "name": name,
        "fmlab_ms": 1e3 * sum(ours) / (per * len(ours)),
        "bare_ms": 1e3 * sum(bare) / (per * len(bare)),
        "ratio": sum(ours) / sum(bare),
        "spread": f"{quartiles[0]:.2f}–{quartiles[2]:.2f} over {len(ours)} pairs",
    }


class TorchCFMLoop:
    """TorchCFM's 2D tutorial loop as its repository publishes it (atong01/conditional-flow-matching, README and
    examples/2D_tutorials/Flow_matching_tutorial.ipynb, torchcfm 1.0.7): `MLP(dim=2, w=64, time_varying=True)`,
    Adam with its defaults, batches of 256 from `sample_8gaussians` and `sample_moons`, and
    `ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)` (OT-CFM) or `ConditionalFlowMatcher(sigma=0.1)`
    (I-CFM); the loss is the mean squared error of v(x_t, t) against u_t. The same `run(steps)` as `BareLoop`."""

    def __init__(self, exact_ot: bool, seed: int = 0, batch_size: int = 256, width: int = 64) -> None:
        from torchcfm.conditional_flow_matching import (
            ConditionalFlowMatcher,
            ExactOptimalTransportConditionalFlowMatcher,
        )
        from torchcfm.models.models import MLP
        from torchcfm.utils import sample_8gaussians, sample_moons

        torch.manual_seed(seed)
        self.model = MLP(dim=2, w=width, time_varying=True)
        self.optimizer = torch.optim.Adam(self.model.parameters())
        matcher = ExactOptimalTransportConditionalFlowMatcher if exact_ot else ConditionalFlowMatcher
        self.matcher = matcher(sigma=0.1)
        self.source, self.target, self.batch_size = sample_8gaussians, sample_moons, batch_size
        self.steps_done = 0

    def run(self, steps: int) -> float:
        """Seconds taken by `steps` training steps."""
        started = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad()
            x0, x1 = self.source(self.batch_size), self.target(self.batch_size)
            t, x_t, u_t = self.matcher.sample_location_and_conditional_flow(x0, x1)
            loss = torch.mean((self.model(torch.cat([x_t, t[:, None]], dim=-1)) - u_t) ** 2)
            loss.backward()
            self.optimizer.step()
        self.steps_done += steps
        return time.perf_counter() - started


# fmlab's run equivalent to TorchCFM's tutorial loop (batch 256 and Adam's defaults are fmlab's 2D defaults too)
TUTORIAL_OVERRIDES = ["data.source=8gaussians", "net.width=64"]


def compare(
    name: str, overrides: list[str], steps: int, warmup: int, chunk: int, bare: BareLoop | TorchCFMLoop | None = None
) -> dict[str, Any]:
    """fmlab's training loop as `python -m fmlab.train` runs it against the bare loop (or `bare`, another loop with
    its `run(steps)`), interleaved chunk by chunk in one process. The Evaluator and SampleLogger are swapped for
    no-op callbacks: Lightning still dispatches every per-step hook to as many callbacks as in a real run, but the
    end-of-fit evaluation, which is not a step cost, is left out. fmlab's loader workers keep running during the
    other side's chunk, so each fmlab chunk starts with up to 2 batches per worker made ahead (DataLoader's
    prefetch): at most 2 of its `chunk` steps' coupling, as in any run where the step is the slower side."""
    from fmlab.build import build_training
    from fmlab.callbacks import PeriodicEvaluation, SampleLogger

    bare = bare if bare is not None else BareLoop(overrides)
    with TemporaryDirectory() as tmp:
        cfg = compose_train_config([*overrides, "logger=csv", f"trainer.max_steps={steps}"], Path(tmp))
        run = build_training(cfg)  # seeded and built as `python -m fmlab.train` builds it
        interleaved = InterleavedBareLoop(bare, chunk, warmup)
        callbacks = [
            L.Callback() if isinstance(callback, PeriodicEvaluation | SampleLogger) else callback
            for callback in run.callbacks
        ]
        trainer = instantiate(
            cfg.trainer, callbacks=[*callbacks, interleaved], logger=run.loggers or False, enable_progress_bar=True
        )
        trainer.fit(run.module, datamodule=run.datamodule)
    row = paired_row(name, interleaved.ours, interleaved.bare_seconds, chunk)
    row["bare_steps"], row["fmlab_steps"] = bare.steps_done, trainer.global_step
    row["callbacks"] = len(trainer.callbacks)
    return row


class TimedBatches(IterableDataset):
    """`steps` empty batches; notes the clock when batch `warmup` and the last batch are fetched. Lightning fetches
    one batch ahead, which shifts both marks alike, so their difference times steps warmup..steps-1 with no timing
    callback of its own."""

    def __init__(self, steps: int, warmup: int) -> None:
        self.steps, self.warmup = steps, warmup
        self.marks: list[float] = []

    def __iter__(self) -> Iterator[Tensor]:
        self.marks = []
        batch = torch.zeros(1)
        for index in range(self.steps):
            if index in (self.warmup, self.steps - 1):
                self.marks.append(time.perf_counter())
            yield batch

    def seconds_per_step(self) -> float:
        if len(self.marks) != 2:
            raise RuntimeError(f"the loop fetched {len(self.marks)} of the 2 timed batches: it stopped early")
        return (self.marks[1] - self.marks[0]) / (self.steps - 1 - self.warmup)


class ScalarStep(L.LightningModule):
    """The emptiest training step: loss = p² for one scalar parameter p, plain SGD. Whatever Lightning adds to it
    is the cost of Lightning's loop itself."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.p * self.p

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def scalar_step_seconds(steps: int, warmup: int, callbacks: int | None) -> float:
    """Seconds per empty step: in `Trainer.fit` with `callbacks` no-op callbacks (and no logger, checkpoint or
    progress bar), or, for `callbacks=None`, in a bare loop with the same loss, optimiser and data."""
    batches = TimedBatches(steps, warmup)
    if callbacks is None:
        p = torch.nn.Parameter(torch.ones(()))
        optimizer = torch.optim.SGD([p], lr=1e-3)
        for _batch in DataLoader(batches, batch_size=None):
            loss = p * p
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            callbacks=[L.Callback() for _ in range(callbacks)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(ScalarStep(), DataLoader(batches, batch_size=None))
    return batches.seconds_per_step()


def loop_overhead(steps: int, warmup: int, callbacks: int, repeats: int) -> dict[str, float]:
    """Lightning's own cost per step, from the empty step: the loop's fixed cost (Trainer.fit with no callbacks over
    the bare loop) and the cost of each callback (Lightning calls every per-step hook of every callback, overridden
    or not). The three sides alternate `repeats` times; medians, in milliseconds."""
    times: dict[str, list[float]] = {"bare": [], "empty": [], "callbacks": []}
    for _ in range(repeats):
        times["bare"].append(scalar_step_seconds(steps, warmup, None))
        times["empty"].append(scalar_step_seconds(steps, warmup, 0))
        times["callbacks"].append(scalar_step_seconds(steps, warmup, callbacks))
    bare, empty, with_callbacks = (1e3 * statistics.median(times[key]) for key in ("bare", "empty", "callbacks"))
    return {
        "bare_ms": bare,
        "empty_ms": empty,
        "callbacks_ms": with_callbacks,
        "loop_ms": empty - bare,
        "per_callback_ms": (with_callbacks - empty) / callbacks,
        "callbacks": callbacks,
    }


def sampler_row(num_samples: int, repeats: int) -> dict[str, Any]:
    """One dopri5 (1e-5) generation of `num_samples` 2D points by fmlab and by bare torchdiffeq, alternated."""
    from torchdiffeq import odeint

    from fmlab.objectives import VelocityField
    from fmlab.samplers import sample

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
    return paired_row(f"sampler, dopri5 1e-5, {num_samples} points ({result.nfe} NFE)", ours, bare, 1)


def evaluation_throughput(data: str, num_samples: int, nll_samples: int) -> dict[str, float]:
    """Samples/s of the Evaluator's generation + metrics and points/s of its likelihood, on an untrained net."""
    from fmlab.module import FlowModule

    with TemporaryDirectory() as tmp:
        cfg = compose_train_config([f"data={data}", f"eval.fid.cache_dir={tmp}"], Path(tmp))
        torch.manual_seed(cfg.seed)
        field, datamodule = FlowModule.from_config(cfg).velocity_field(), instantiate(cfg.data)
        sampling = instantiate(cfg.eval, num_samples=num_samples, num_draws=1, nll_samples=0)
        sampling.evaluate(field, datamodule)  # builds the FID reference once, outside the timing
        started = time.perf_counter()
        generated = sampling.evaluate(field, datamodule)
        generation_seconds = time.perf_counter() - started
        likelihood = instantiate(cfg.eval, num_samples=2, num_draws=1, nll_samples=nll_samples)
        started = time.perf_counter()
        scored = likelihood.negative_log_likelihood(field, datamodule, Ranks())
        nll_seconds = time.perf_counter() - started
    return {
        "samples_per_second": num_samples / generation_seconds,
        "nfe": generated["nfe"],
        "nll_points_per_second": nll_samples / nll_seconds,
        "nll_nfe": scored["nll_nfe"],
        "divergence": scored["nll_divergence"],
        "metric": "fid" if "fid" in generated else "w2",
    }


def torchcfm_rows(steps: int, warmup: int, chunk: int) -> list[dict[str, Any]]:
    """fmlab against TorchCFM's tutorial loop for OT-CFM and I-CFM; none when torchcfm is not installed."""
    try:
        import torchcfm  # noqa: F401
    except ImportError:
        print("bench: torchcfm is not installed (make bench installs it), so the TorchCFM rows are skipped")
        return []
    rows = []
    for method, exact_ot in (("otcfm", True), ("icfm", False)):
        name = f"train step, {'OT-CFM' if exact_ot else 'I-CFM'} tutorial job vs TorchCFM"
        loop = TorchCFMLoop(exact_ot)
        rows.append(compare(name, [f"method={method}", *TUTORIAL_OVERRIDES], steps, warmup, chunk, bare=loop))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000, help="training steps per 2D row (U-Net: 1/20)")
    parser.add_argument("--warmup", type=int, default=200, help="steps before the first timed chunk")
    parser.add_argument("--chunk", type=int, default=100, help="steps per timed chunk of each side (U-Net: 1/20)")
    parser.add_argument("--only", choices=["torchcfm"], help="run only these rows (torchcfm: the TorchCFM ones)")
    args = parser.parse_args()
    from fmlab.cli import quiet_third_party_output

    quiet_third_party_output()  # as the entry points: no tips or third-party deprecations between the rows
    small = max(args.chunk // 20, 1)
    rows = []
    if args.only is None:
        rows = [
            compare("train step, FM-OT 2D MLP (default job)", [], args.steps, args.warmup, args.chunk),
            compare(
                "train step, OT-CFM 2D MLP (exact minibatch OT)",
                ["method=otcfm"],
                args.steps // 3,
                args.warmup,
                small * 5,
            ),
            compare(
                "train step, FM-OT digits unet_small",
                ["data=digits", "net=unet_small"],
                args.steps // 20,
                max(args.warmup // 20, small),
                small,
            ),
            sampler_row(num_samples=2000, repeats=40),
        ]
    tutorial = torchcfm_rows(args.steps // 2, args.warmup, args.chunk)
    rows += tutorial
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    header = f"{'measurement (mean of paired runs)':52s} {'fmlab ms':>9s} {'other ms':>8s} {'ratio':>6s}"
    print(f"{header}  quartiles of the pairs' ratios (other: the bare loop, or TorchCFM's where named)")
    for row in rows:
        print(f"{row['name']:52s} {row['fmlab_ms']:9.3f} {row['bare_ms']:8.3f} {row['ratio']:6.2f}  {row['spread']}")
    if tutorial:
        ot_row, independent_row = tutorial
        print(
            "  fmlab OT-CFM step / fmlab I-CFM step on the tutorial job (the two rows above): "
            f"{ot_row['fmlab_ms'] / independent_row['fmlab_ms']:.2f}"
        )
    if args.only is not None:
        return
    overhead = loop_overhead(steps=args.steps // 2, warmup=args.warmup, callbacks=10, repeats=3)
    default = rows[0]  # the default job's row
    print("\nLightning's own cost per step, from an empty step (one scalar parameter, SGD), median of 3 runs:")
    print(
        f"  bare loop {overhead['bare_ms']:.3f} ms; Trainer.fit {overhead['empty_ms']:.3f} ms with no callbacks and "
        f"{overhead['callbacks_ms']:.3f} ms with {overhead['callbacks']} no-op ones"
    )
    print(
        f"  the loop adds {overhead['loop_ms']:.3f} ms per step and each callback {overhead['per_callback_ms']:.3f} ms"
    )
    predicted = overhead["loop_ms"] + overhead["per_callback_ms"] * default["callbacks"]
    print(
        f"  default job: {default['callbacks']} callbacks (the bench's pacing one included) predict "
        f"{predicted:.3f} ms of the {default['fmlab_ms'] - default['bare_ms']:.3f} ms measured above"
    )
    print(f"\n{'evaluation throughput (untrained net, dopri5 1e-5)':52s} {'samples/s':>9s} {'NLL pts/s':>10s}")
    for data, samples, nll_points in (("moons", 2000, 250), ("digits", 2000, 100)):
        rate = evaluation_throughput(data, samples, nll_points)
        name = f"{data}: generation + {rate['metric']} (NFE {rate['nfe']:.0f}), NLL {rate['divergence']}"
        print(f"{name:52s} {rate['samples_per_second']:9.0f} {rate['nll_points_per_second']:10.1f}")


if __name__ == "__main__":
    main()

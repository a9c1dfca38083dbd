"""Evaluator: generate through the PF-ODE with the EMA weights and measure the samples, the same under any number of
processes.

Work is cut into fixed chunks (generation: `batch_size` source samples seeded per (draw, chunk); likelihood: held-out
points), chunk i runs on rank i mod world, and results are gathered in chunk order. An adaptive solver's steps
depend only on the chunk, so W2, MMD, NLL and NFE equal a one-process run; FID sums features exactly in float64.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from fmlab.callbacks.ema import sampling_net
from fmlab.distributed import Ranks, chunk_sizes, gather_chunks
from fmlab.likelihood import DIVERGENCES, bits_per_dim, log_likelihood
from fmlab.metrics.distances import DEFAULT_BANDWIDTHS, mmd_rbf, wasserstein2
from fmlab.sampling import AncestralSampler, ODESolver, VelocityField, sample
from fmlab.utils.errors import UserError, choices_error

# the ancestral sampler has no likelihood: NLL goes through the PF-ODE with the papers' dopri5 at 1e-5
LIKELIHOOD_SOLVER = ODESolver("dopri5", atol=1e-5, rtol=1e-5)


def generate(
    field: VelocityField,
    datamodule: Any,
    solver: ODESolver | AncestralSampler,
    num_samples: int,
    batch_size: int,
    draw: int,
    ranks: Ranks,
    on_chunk: Any = None,
    tick: Any = None,
) -> tuple[Tensor, list[int]]:
    """`num_samples` samples from the fixed source chunks of `draw`, on every rank, and the NFE of each chunk.

    `on_chunk(samples)` sees each of this rank's chunks before the gather (FID's per-rank update); `tick()` is
    called after each chunk (progress).
    """
    sizes = chunk_sizes(num_samples, batch_size)
    device = next(field.parameters()).device
    mine: dict[int, Tensor] = {}
    nfe = torch.zeros(len(sizes), device=device)
    for chunk in ranks.chunks(len(sizes)):
        x0 = datamodule.eval_source(sizes[chunk], draw=draw, chunk=chunk).to(device)
        result = sample(field, x0, solver)
        mine[chunk], nfe[chunk] = result.samples, result.nfe
        if on_chunk is not None:
            on_chunk(result.samples)
        if tick is not None:
            tick()
    like = torch.empty(0, *datamodule.data_shape, device=device)
    samples = gather_chunks(mine, sizes, ranks, like)
    nfe = ranks.gather(nfe).sum(0)  # each chunk's count is non-zero on its own rank only
    return samples, [int(n) for n in nfe.tolist()]


def over_draws(name: str, values: list[float]) -> dict[str, Any]:
    """A metric's mean over the generated draws, with its std and the draws themselves."""
    if not all(math.isfinite(v) for v in values):  # a diverged draw: no mean, no spread
        return {name: math.nan, f"{name}_std": math.nan, f"{name}_draws": values}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {name: statistics.fmean(values), f"{name}_std": spread, f"{name}_draws": values}


def nfe_stats(per_batch: list[int]) -> dict[str, float]:
    return {"nfe": statistics.fmean(per_batch), "nfe_max": max(per_batch)}


def count_nonfinite(samples: Tensor) -> int:
    """How many samples hold a NaN or an infinite value."""
    return int((~torch.isfinite(samples.flatten(1))).any(1).sum())


# the quality metrics a diverged evaluation makes non-finite
QUALITY_METRICS = ("w2", "mmd", "fid", "nll", "bpd")


def divergence_flags(results: dict[str, Any], nonfinite_samples: int) -> dict[str, Any]:
    """`diverged` is true when any generated sample or any quality metric is not finite; metrics.json, tables and
    sweepers read it (and the metrics are NaN, never a perfect score)."""
    bad = [k for k in QUALITY_METRICS if isinstance(results.get(k), float) and not math.isfinite(results[k])]
    return {"diverged": bool(nonfinite_samples or bad), "nonfinite_samples": nonfinite_samples}


class Evaluator(L.Callback):
    """Every `every_n_steps` optimiser steps (0: never) and at the end of training, generates `num_draws` fixed,
    independent sets of `num_samples` points (the datamodule's evaluation source, EMA weights when an `EMA` callback
    runs) and reports, under `eval/` in every logger and in `self.results` (→ metrics.json):

    - point data: `w2` (exact W2 to a held-out set of the same size, mean over draws; `w2_std`, `w2_draws`) and
      `w2_floor` (W2 between independent held-out sets of that size: what an exact sampler reaches), `mmd` (unbiased
      RBF MMD² over `mmd_bandwidths`). One 2,000-point W2 on moons varies by about ±0.03 with the noise alone.
    - images: `fid` against the training set (features from `fid.feature`: `inception`, or `digits`; statistics of
      the reference set cached in `fid.cache_dir`).
    - `nfe`, `nfe_max`: net calls of the solver per batch of `batch_size` (mean, max).
    - `nll` (nats) and, for images, `bpd` of `nll_samples` held-out points through the PF-ODE (`nll_nfe`), when the
      source is N(0, I); divergence exact for point data, Hutchinson (`num_probes` Rademacher probes) for images.
    - `diverged`, `nonfinite_samples`: a draw with a NaN or infinite sample has NaN W2, MMD and FID (POT would
      return 0 and FID would clamp the pixels), and the run is flagged.

    `progress=True` shows a progress bar over the evaluation's chunks (rank 0).
    """

    def __init__(
        self,
        solver: ODESolver | AncestralSampler,
        num_samples: int = 2000,
        num_draws: int = 4,
        batch_size: int = 500,
        nll_samples: int = 250,
        divergence: str | None = None,
        num_probes: int = 1,
        every_n_steps: int = 0,
        mmd_bandwidths: tuple[float, ...] | list[float] = DEFAULT_BANDWIDTHS,
        fid: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        if num_samples < 2 or num_draws < 1 or batch_size < 1 or nll_samples < 0 or every_n_steps < 0:
            raise UserError(
                f"eval.num_samples={num_samples} must be >= 2, eval.num_draws={num_draws} and "
                f"eval.batch_size={batch_size} >= 1, eval.nll_samples={nll_samples} and "
                f"eval.every_n_steps={every_n_steps} >= 0"
            )
        if divergence is not None and divergence not in DIVERGENCES:
            raise choices_error("eval.divergence", divergence, DIVERGENCES)
        self.solver = solver
        self.num_samples, self.num_draws, self.batch_size = num_samples, num_draws, batch_size
        self.nll_samples, self.divergence, self.num_probes = nll_samples, divergence, num_probes
        self.every_n_steps = every_n_steps
        self.mmd_bandwidths = tuple(mmd_bandwidths)
        self.fid_options = dict(fid or {})
        self.progress = progress
        self._tick: Any = None
        self.results: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._fid: tuple[Any, Any, Any] | None = None  # (metric, prepare, reference states), built once

    # -- evaluation, on every rank ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, module: Any, datamodule: Any, net: torch.nn.Module | None = None, ranks: Ranks | None = None):
        """All metrics of `module` (its `net`, or `net`) on `datamodule`; every rank must call this together."""
        ranks = ranks or Ranks()
        started = time.perf_counter()
        field = module.velocity_field(net)
        was_training = field.training
        field.eval()
        bar = self._progress_bar(datamodule, ranks)
        self._tick = bar.update if bar is not None else None
        try:
            if getattr(datamodule, "is_image", False):
                results = self._image_metrics(field, datamodule, ranks)
            else:
                results = self._point_metrics(field, datamodule, ranks)
            results.update(self.negative_log_likelihood(field, datamodule, ranks))
        finally:
            field.train(was_training)
            if bar is not None:
                bar.close()
        results.update(divergence_flags(results, results.pop("nonfinite_samples")))
        results.update(
            num_eval_samples=self.num_samples,
            num_eval_draws=self.num_draws,
            solver=repr(self.solver),
            eval_world_size=ranks.world_size,
            eval_seconds=time.perf_counter() - started,
        )
        return results

    def _progress_bar(self, datamodule: Any, ranks: Ranks):
        """A bar over this evaluation's chunks (generation, then likelihood), on rank 0 when `progress` is set."""
        if not self.progress or ranks.rank != 0:
            return None
        from tqdm.auto import tqdm

        chunks = self.num_draws * len(chunk_sizes(self.num_samples, self.batch_size))
        if self.nll_samples and getattr(datamodule, "source", "gaussian") == "gaussian":
            chunks += len(chunk_sizes(self.nll_samples, self.batch_size))
        return tqdm(total=-(-chunks // ranks.world_size), desc=f"evaluating ({self.solver!r})", unit="chunk")

    def _generate_draws(self, field, datamodule, ranks: Ranks, on_chunk=None):
        for draw in range(self.num_draws):
            yield (
                draw,
                *generate(
                    field, datamodule, self.solver, self.num_samples, self.batch_size, draw, ranks, on_chunk, self._tick
                ),
            )

    def _point_metrics(self, field: VelocityField, datamodule: Any, ranks: Ranks) -> dict[str, Any]:
        held_out = datamodule.held_out(self.num_samples)
        w2, mmd, floor, nfe, nonfinite = [], [], [], [], 0
        for draw, samples, chunk_nfe in self._generate_draws(field, datamodule, ranks):
            w2.append(wasserstein2(samples, held_out))  # NaN when a sample is not finite
            mmd.append(mmd_rbf(samples, held_out, self.mmd_bandwidths))
            floor.append(wasserstein2(datamodule.held_out(self.num_samples, index=1 + draw), held_out))
            nfe += chunk_nfe
            nonfinite += count_nonfinite(samples)
        floor_and_mmd = {"w2_floor": statistics.fmean(floor), "mmd": statistics.fmean(mmd)}
        return {**over_draws("w2", w2), **floor_and_mmd, **nfe_stats(nfe), "nonfinite_samples": nonfinite}

    def fid_metric(self, datamodule: Any, device: torch.device, ranks: Ranks):
        """The FID metric with the reference statistics loaded on rank 0 (computed once per process, cached)."""
        from fmlab.metrics.fid import build_fid, load_reference, reference_statistics

        if self._fid is None:
            options = self.fid_options
            feature = options.get("feature") or getattr(datamodule, "fid_feature", "inception")
            metric, prepare = build_fid(feature, options.get("weights_path"), options.get("inception_dims", 2048))
            metric = metric.to(device)
            reference = None  # held by rank 0 alone, so other ranks neither compute nor read it
            if ranks.rank == 0:
                images, cache_dir = datamodule.reference_images(), options.get("cache_dir")
                reference = reference_statistics(metric, prepare, images, cache_dir, datamodule.name)
            self._fid = (metric, prepare, reference)
        metric, prepare, reference = self._fid
        metric.reset()
        load_reference(metric, reference)
        return metric, prepare

    def _image_metrics(self, field: VelocityField, datamodule: Any, ranks: Ranks) -> dict[str, Any]:
        device = next(field.parameters()).device
        metric, prepare = self.fid_metric(datamodule, device, ranks)
        fid, nfe, nonfinite = [], [], 0
        for _, samples, chunk_nfe in self._generate_draws(
            field, datamodule, ranks, on_chunk=lambda x: metric.update(prepare(x), real=False)
        ):
            value = float(metric.compute())  # sums every rank's features: a collective
            metric.reset()  # keeps the reference (reset_real_features=False)
            bad = count_nonfinite(samples)
            fid.append(math.nan if bad else value)  # prepare() clamps pixels: a NaN image would still score
            nfe += chunk_nfe
            nonfinite += bad
        return {**over_draws("fid", fid), **nfe_stats(nfe), "nonfinite_samples": nonfinite}

    def negative_log_likelihood(self, field: VelocityField, datamodule: Any, ranks: Ranks) -> dict[str, Any]:
        """Mean NLL of the held-out set through the PF-ODE, chunked over ranks like generation."""
        if not self.nll_samples or getattr(datamodule, "source", "gaussian") != "gaussian":
            return {}
        is_image = getattr(datamodule, "is_image", False)
        divergence = self.divergence or ("hutchinson" if is_image else "exact")
        solver = self.solver if isinstance(self.solver, ODESolver) else LIKELIHOOD_SOLVER
        held_out = datamodule.held_out(self.nll_samples, index=self.num_draws + 1)
        sizes = chunk_sizes(len(held_out), self.batch_size)
        device = next(field.parameters()).device
        mine, nfe = {}, torch.zeros(len(sizes), device=device)
        for chunk in ranks.chunks(len(sizes)):
            start = sum(sizes[:chunk])
            probes = torch.Generator().manual_seed(chunk)  # Hutchinson probes fixed per chunk
            result = log_likelihood(
                field,
                held_out[start : start + sizes[chunk]].to(device),
                solver,
                divergence=divergence,
                num_probes=self.num_probes,
                generator=probes,
            )
            mine[chunk], nfe[chunk] = result.log_prob.unsqueeze(1), result.nfe
            if self._tick is not None:
                self._tick()
        log_prob = gather_chunks(mine, sizes, ranks, torch.empty(0, 1, device=device)).squeeze(1)
        results = {
            "nll": -log_prob.mean().item(),
            "nll_nfe": statistics.fmean(ranks.gather(nfe).sum(0).tolist()),
            "nll_divergence": divergence,
        }
        if is_image:
            num_dims = held_out[0].numel()
            bpd = bits_per_dim(log_prob, num_dims, data_scale=datamodule.num_levels / 2.0)
            results["bpd"] = bpd.mean().item()
        return results

    # -- Lightning hooks --------------------------------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        results = self.evaluate(
            pl_module, trainer.datamodule, sampling_net(trainer, pl_module), Ranks.of_trainer(trainer)
        )
        results["step"] = trainer.global_step
        numeric = {f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, int | float)}
        for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
            logger.log_metrics(numeric, step=trainer.global_step)
            logger.save()  # the final evaluation runs after fit, when Lightning no longer saves the loggers
        self.history = [row for row in self.history if row["step"] != trainer.global_step]
        self.history.append({k: v for k, v in results.items() if isinstance(v, int | float)})
        return results

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < (trainer.max_steps or 0):
            self.run(trainer, pl_module)

    def final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The evaluation of the trained run, after `trainer.fit` (also when a resumed run had nothing left to
        train): in `self.results`, with the periodic evaluations in `eval_history`."""
        pl_module.to(trainer.strategy.root_device)  # fit's teardown moved it to the CPU
        self.results = self.run(trainer, pl_module)
        if len(self.history) > 1:
            self.results["eval_history"] = self.history
        return self.results

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}  # a resumed run keeps the periodic evaluations before the kill

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

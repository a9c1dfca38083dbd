"""The Evaluator: generate through the PF-ODE and measure the samples, the same under any number of processes. No
Lightning here: a notebook, `fmlab.evaluate` and the training callback all call it with a velocity field.

Work is cut into fixed chunks (generation: `batch_size` source samples seeded per (draw, chunk); likelihood: held-out
points), chunk i runs on rank i mod world, and results are gathered in chunk order. An adaptive solver's steps
depend only on the chunk, so W2, MMD, NLL and NFE equal a one-process run; FID sums features exactly in float64.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fmlab.conditioning import asked_conditions, class_labels
from fmlab.data.interface import EvaluationData
from fmlab.distributed import Ranks, chunk_sizes, gather_chunks
from fmlab.errors import UserError, choices_error
from fmlab.likelihood import DIVERGENCES, bits_per_dim, importance_weighted_log_prob, log_likelihood
from fmlab.metrics.distances import (
    DEFAULT_BANDWIDTHS,
    mmd_rbf,
    normalized_path_energy,
    straightness,
    wasserstein2,
)
from fmlab.metrics.fidelity import check_metrics, unmeasured
from fmlab.objectives import VelocityField
from fmlab.samplers import ODESolver, Sampler, path_energy, sample
from fmlab.seeding import stream_seed

# the PF-ODE likelihood when the evaluation solver has none (the ancestral sampler): the papers' dopri5 at 1e-5
DEFAULT_LIKELIHOOD_SOLVER = ODESolver("dopri5", atol=1e-5, rtol=1e-5)


def run_chunks(
    sizes: list[int],
    ranks: Ranks,
    compute: Callable[[int, int, int], tuple[Tensor, int]],
    like: Tensor,
    tick: Callable[[], Any] | None = None,
) -> tuple[Tensor, list[int]]:
    """Run `compute(chunk, start, size) -> (rows, nfe)` for this rank's chunks and gather every chunk's rows in chunk
    order on every rank (shaped like `like[0]`), with the NFE of each chunk."""
    nfe = torch.zeros(len(sizes), device=like.device)
    mine: dict[int, Tensor] = {}
    for chunk in ranks.chunks(len(sizes)):
        mine[chunk], nfe[chunk] = compute(chunk, sum(sizes[:chunk]), sizes[chunk])
        if tick is not None:
            tick()
    rows = gather_chunks(mine, sizes, ranks, like)
    per_chunk = ranks.gather(nfe).sum(0)  # each chunk's count is non-zero on its own rank only
    return rows, [int(n) for n in per_chunk.tolist()]


def generate(
    field: VelocityField,
    datamodule: EvaluationData,
    solver: Sampler,
    num_samples: int,
    batch_size: int,
    draw: int,
    ranks: Ranks,
    on_chunk: Callable[[Tensor], Any] | None = None,
    tick: Callable[[], Any] | None = None,
    labels: str | list[int] = "uniform",
    guidance_scale: float = 0.0,
) -> tuple[Tensor, list[int]]:
    """`num_samples` samples from the fixed source chunks of `draw`, on every rank, and the NFE of each chunk.

    A conditional field generates the conditions `asked_conditions(labels, ...)` gives each row, guided with
    `guidance_scale`. `on_chunk(samples)` sees each of this rank's chunks before the gather (FID's per-rank update).
    """
    device = field.device

    def compute(chunk: int, start: int, size: int) -> tuple[Tensor, int]:
        x0 = datamodule.eval_source(size, draw=draw, chunk=chunk, start=start).to(device)
        asked = asked_conditions(labels, field, datamodule, num_samples, start, size)
        asked = asked.to(device) if asked is not None else None
        # a stochastic sampler's noise, fixed per (draw, chunk) like the source: the same samples on any world size
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            field.conditioned_on(asked, guidance_scale),
        ):
            torch.manual_seed(stream_seed(datamodule.seed, "sampler_noise", draw, chunk))
            result = sample(field, x0, solver)
        if on_chunk is not None:
            on_chunk(result.samples)
        return result.samples, result.nfe

    like = torch.empty(0, *datamodule.data_shape, device=device)
    return run_chunks(chunk_sizes(num_samples, batch_size), ranks, compute, like, tick)


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


class Evaluator:
    """Generates `num_draws` fixed, independent sets of `num_samples` points from a velocity field (the datamodule's
    evaluation source) and reports:

    - point data: `w2` (exact W2 to a held-out set of the same size, mean over draws; `w2_std`, `w2_draws`) and
      `w2_floor` (W2 between independent held-out sets of that size: what an exact sampler reaches), `mmd` (unbiased
      RBF MMD² over `mmd_bandwidths`). One 2,000-point W2 on moons varies by about ±0.03 with the noise alone.
    - images: `fid` against the training set (features from `fid.feature`: `inception`, or `digits`; statistics of
      the reference set cached in `fid.cache_dir`).
    - `nfe`, `nfe_max`: net calls of the solver per batch of `batch_size` (mean, max).
    - `nll` (nats) and, for images, `bpd` of `nll_samples` held-out points (images: the test split) through the
      PF-ODE (`nll_nfe`) with `likelihood_solver` (default: `solver` when it is an ODE solver, else dopri5 at 1e-5),
      when the source is N(0, I); divergence exact for point data, Hutchinson (`num_probes` Rademacher probes) for
      images. Images take the importance-weighted bound over `dequantization_samples` = K uniform dequantisations
      of each image (`likelihood.importance_weighted_log_prob`; K = 1: the plain dequantised estimate).
    - `path_energy` (null: on for point data evaluated with an ODE solver; true also for images): PE =
      E ∫ ‖v_t(x_t)‖² dt over the first draw's source points (`sampling.path_energy`, same solver), `straightness`
      S = E ∫ ‖(x_end − x_start) − v_t(x_t)‖² dt along the same trajectories (Liu et al. 2023; 0 for straight
      constant-speed paths), `transport_cost` W2²(x0, held-out) between those source points and the held-out set,
      and `normalized_path_energy` |PE − W2²| / W2² (Tong et al. 2024, §5.1).
    - `diverged`, `nonfinite_samples`: a draw with a NaN or infinite sample has NaN W2, MMD and FID (POT would
      return 0 and FID would clamp the pixels), and the run is flagged.
    - class-conditional runs: samples of the classes `labels` asks for (`uniform`: every class equally often, by
      row index), guided with `guidance_scale` w; on digits `class_accuracy`, how often the digits classifier
      reads a sample as the class it was asked for. NLL and path energy are the unconditional model's (∅).

    `progress=True` shows a progress bar over the evaluation's chunks (rank 0).
    """

    def __init__(
        self,
        solver: Sampler,
        num_samples: int = 2000,
        num_draws: int = 4,
        batch_size: int = 500,
        nll_samples: int = 250,
        divergence: str | None = None,
        num_probes: int = 1,
        mmd_bandwidths: tuple[float, ...] | list[float] = DEFAULT_BANDWIDTHS,
        fid: Mapping[str, Any] | None = None,
        likelihood_solver: ODESolver | None = None,
        dequantization_samples: int = 1,
        progress: bool = False,
        path_energy: bool | None = None,
        fidelity_metrics: list[str] | tuple[str, ...] = (),
        guidance_scale: float = 0.0,
        labels: str | list[int] = "uniform",
        extra_solvers: Mapping[str, Sampler] | None = None,
    ) -> None:
        if num_samples < 2 or num_draws < 1 or batch_size < 1 or nll_samples < 0:
            raise UserError(
                f"eval.num_samples={num_samples} must be >= 2, eval.num_draws={num_draws} and "
                f"eval.batch_size={batch_size} >= 1, eval.nll_samples={nll_samples} >= 0"
            )
        if divergence is not None and divergence not in DIVERGENCES:
            raise choices_error("eval.divergence", divergence, DIVERGENCES)
        if (
            isinstance(dequantization_samples, bool)
            or not isinstance(dequantization_samples, int)
            or (dequantization_samples < 1)
        ):
            raise UserError(f"eval.dequantization_samples={dequantization_samples!r} must be a whole number >= 1")
        if path_energy and not isinstance(solver, ODESolver):
            raise UserError(f"eval.path_energy=true needs an ODE solver; the evaluation solver is {solver!r}")
        if likelihood_solver is not None and not isinstance(likelihood_solver, ODESolver):
            raise UserError(f"eval.likelihood_solver={likelihood_solver!r} must be an ODE solver (the PF-ODE)")
        self.solver = solver
        self.num_samples, self.num_draws, self.batch_size = num_samples, num_draws, batch_size
        self.nll_samples, self.divergence, self.num_probes = nll_samples, divergence, num_probes
        self.mmd_bandwidths = tuple(mmd_bandwidths)
        self.fid_options = dict(fid or {})
        self.likelihood_solver = likelihood_solver
        self.dequantization_samples = dequantization_samples
        self.progress = progress
        self.path_energy = path_energy
        self.fidelity_metrics = check_metrics(fidelity_metrics)
        self.guidance_scale = float(guidance_scale)
        self.labels = labels if isinstance(labels, str) else [int(label) for label in labels]
        self.extra_solvers = dict(extra_solvers or {})
        self._classifier: Any = None  # the digits classifier of `class_accuracy`, built once
        self._fidelity: tuple[Any, Tensor] | None = None  # (extractor, reference features), built once
        self._tick: Callable[[], Any] | None = None
        self._fid: tuple[Any, Any, Any] | None = None  # (metric, prepare, reference states), built once
        self._fid_reference: dict[str, Any] = {}  # what the FID compares with, for the result card

    def check_field(self, field: VelocityField, datamodule: EvaluationData | None = None) -> None:
        """One line, before any sampling, for an evaluation this field cannot give: guidance without classes, a
        bad eval.labels, and guidance or the (unconditional) likelihood of a class-conditional net that never
        learned the null class (conditioning.p_uncond=0: its ∅ outputs are untrained weights, not a model)."""
        if self.guidance_scale and not field.is_conditional:
            raise UserError(
                f"eval.guidance_scale={self.guidance_scale} needs a conditional run (conditioning=class or x); "
                "this one is unconditional"
            )
        if not field.is_conditional:
            return
        if self.labels == "data":
            if datamodule is not None and not hasattr(datamodule, "held_out_conditions"):
                raise UserError(f"eval.labels=data needs held-out conditions; data={datamodule.name} has none")
        elif field.condition_dim:
            raise UserError(f"eval.labels={self.labels!r}: a continuous condition is asked as the data's; use data")
        else:
            class_labels(self.labels, field.num_classes, 0, 1)
        needs_null = {"eval.guidance_scale": self.guidance_scale}
        if datamodule is None or datamodule.source == "gaussian":
            needs_null["eval.nll_samples"] = self.nll_samples
        asked = [f"{key}={value}" for key, value in needs_null.items() if value]
        if asked and not field.learned_null:
            verb = "needs" if len(asked) == 1 else "need"
            raise UserError(
                f"{' and '.join(asked)} {verb} the unconditional model, which conditioning.p_uncond=0 never trained; "
                "set them to 0, or train with conditioning.p_uncond > 0 (0.2 by default)"
            )

    @torch.no_grad()
    def evaluate(self, field: VelocityField, datamodule: EvaluationData, ranks: Ranks | None = None) -> dict[str, Any]:
        """All metrics of `field` (e.g. `module.velocity_field(ema_net)`) on `datamodule`; every rank must call this
        together."""
        ranks = ranks or Ranks()
        self.check_field(field, datamodule)
        started = time.perf_counter()
        was_training = field.training
        field.eval()
        bar = self._progress_bar(datamodule, ranks)
        self._tick = bar.update if bar is not None else None
        try:
            measure = self._image_metrics if datamodule.is_image else self._point_metrics
            results = measure(field, datamodule, ranks)
            results.update(self.negative_log_likelihood(field, datamodule, ranks))
            for name, solver in self.extra_solvers.items():
                results.update(self._with_solver(name, solver, measure, field, datamodule, ranks))
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
        if field.is_conditional:
            results.update(guidance_scale=self.guidance_scale, labels=self.labels)
        results["card"] = self.card(field, datamodule, ranks, "nll" in results)
        return results

    # what an extra solver reports, each key suffixed with the solver's name (w2_euler1, fid_euler1, ...)
    EXTRA_KEYS = ("w2", "w2_std", "w2_draws", "w2_squared", "w2_squared_std", "mmd", "fid", "fid_std", "nfe",
                  "nfe_max", "nonfinite_samples")  # fmt: skip

    def _with_solver(self, name: str, solver: Sampler, measure: Callable, field: VelocityField,
                     datamodule: EvaluationData, ranks: Ranks) -> dict[str, Any]:  # fmt: skip
        """The sample metrics of the same draws again with `solver` (C²OT's Euler-1 beside its adaptive solver),
        no path energy: `eval.extra_solvers: {name: <solver>}` gives `<metric>_<name>` keys."""
        solver.check_path(field.path)
        saved = self.solver, self.path_energy
        self.solver, self.path_energy = solver, False
        try:
            extra = measure(field, datamodule, ranks)
        finally:
            self.solver, self.path_energy = saved
        return {f"{key}_{name}": extra[key] for key in self.EXTRA_KEYS if key in extra}

    def card(self, field: VelocityField, datamodule: EvaluationData, ranks: Ranks, with_nll: bool) -> dict[str, Any]:
        """The evaluation half of a result card: everything that decides these numbers besides the weights (the
        sampler and how NFE is counted, the draws, what the metric compares with, the likelihood's settings)."""
        card: dict[str, Any] = {
            "solver": self.solver.describe(),
            **(
                {"extra_solvers": {k: s.describe() for k, s in self.extra_solvers.items()}}
                if self.extra_solvers
                else {}
            ),
            "nfe": f"net calls per batch of {self.batch_size} samples, mean over batches (a guided call counts 2)",
            "samples": f"{self.num_draws} draws of {self.num_samples}",
            "eval_world_size": ranks.world_size,
            "data": {"name": datamodule.name, "variant": datamodule.variant, "seed": datamodule.seed},
        }
        if datamodule.is_image:
            card["reference"] = {"metric": "fid", **self._fid_reference}
        else:
            card["reference"] = {
                "metric": "w2 (exact EMD, POT) and mmd",
                "against": f"held-out draw 0 of data={datamodule.name} (seed {datamodule.seed}), never trained on",
                "size": self.num_samples,
                "floor": f"held-out draws 1..{self.num_draws} against draw 0",
            }
        if field.is_conditional:
            card["guidance"] = {"scale": self.guidance_scale, "labels": self.labels}
        if with_nll:
            solver = self.likelihood_solver or (
                self.solver if isinstance(self.solver, ODESolver) else DEFAULT_LIKELIHOOD_SOLVER
            )
            card["likelihood"] = {
                "solver": solver.describe(),
                "divergence": self.divergence or ("hutchinson" if datamodule.is_image else "exact"),
                "probes": self.num_probes,
                "split": "test" if datamodule.is_image else f"held-out draw {self.num_draws + 1}",
                "size": self.nll_samples,
                "dequantization_samples": self.dequantization_samples if datamodule.is_image else None,
            }
        return card

    def _progress_bar(self, datamodule: EvaluationData, ranks: Ranks):
        """A bar over this evaluation's chunks (generation, then likelihood), on rank 0 when `progress` is set."""
        if not self.progress or ranks.rank != 0:
            return None
        from tqdm.auto import tqdm

        chunks = self.num_draws * len(chunk_sizes(self.num_samples, self.batch_size))
        if self._measures_path_energy(datamodule):
            chunks += len(chunk_sizes(self.num_samples, self.batch_size))
        if self.nll_samples and datamodule.source == "gaussian":
            draws = self.dequantization_samples if datamodule.is_image else 1
            chunks += draws * len(chunk_sizes(self.nll_samples, self.batch_size))
        return tqdm(total=-(-chunks // ranks.world_size), desc=f"evaluating ({self.solver!r})", unit="chunk")

    def _generate_draws(self, field: VelocityField, datamodule: EvaluationData, ranks: Ranks, on_chunk=None):
        for draw in range(self.num_draws):
            samples, nfe = generate(
                field,
                datamodule,
                self.solver,
                self.num_samples,
                self.batch_size,
                draw,
                ranks,
                on_chunk,
                self._tick,
                self.labels,
                self.guidance_scale,
            )
            yield draw, samples, nfe

    def _point_metrics(self, field: VelocityField, datamodule: EvaluationData, ranks: Ranks) -> dict[str, Any]:
        held_out = datamodule.held_out(self.num_samples)
        w2, mmd, floor, nfe, nonfinite = [], [], [], [], 0
        for draw, samples, chunk_nfe in self._generate_draws(field, datamodule, ranks):
            w2.append(wasserstein2(samples, held_out))  # NaN when a sample is not finite
            mmd.append(mmd_rbf(samples, held_out, self.mmd_bandwidths))
            floor.append(wasserstein2(datamodule.held_out(self.num_samples, index=1 + draw), held_out))
            nfe += chunk_nfe
            nonfinite += count_nonfinite(samples)
        floor_and_mmd = {"w2_floor": statistics.fmean(floor), "mmd": statistics.fmean(mmd),
                         "w2_floor_squared": statistics.fmean(f**2 for f in floor)}  # fmt: skip
        results = {**over_draws("w2", w2), **over_draws("w2_squared", [w**2 for w in w2]), **floor_and_mmd,
                   **nfe_stats(nfe), "nonfinite_samples": nonfinite}  # fmt: skip
        if self._measures_path_energy(datamodule):
            results.update(self._path_energy(field, datamodule, ranks, held_out))
        return results

    def _measures_path_energy(self, datamodule: EvaluationData) -> bool:
        if self.path_energy is None:
            return not datamodule.is_image and isinstance(self.solver, ODESolver)
        return bool(self.path_energy)

    def _path_energy(
        self, field: VelocityField, datamodule: EvaluationData, ranks: Ranks, held_out: Tensor
    ) -> dict[str, float]:
        """PE and straightness over the source points of draw 0 (chunked like generation), W2² from them to
        `held_out`, and NPE."""
        device = field.device

        def compute(chunk: int, start: int, size: int) -> tuple[Tensor, int]:
            x0 = datamodule.eval_source(size, draw=0, chunk=chunk, start=start).to(device)
            result = path_energy(field, x0, self.solver)
            displacement = (result.samples - result.start).flatten(1).pow(2).sum(1)
            rows = [result.start.flatten(1), result.energy[:, None], displacement[:, None]]
            return torch.cat(rows, dim=1), result.nfe

        width = math.prod(datamodule.data_shape) + 2
        rows, _ = run_chunks(
            chunk_sizes(self.num_samples, self.batch_size),
            ranks,
            compute,
            torch.empty(0, width, device=device),
            self._tick,
        )
        energy = float(rows[:, -2].double().mean())
        duration = field.path.t_max - field.path.t_min
        cost = wasserstein2(rows[:, :-2], held_out.flatten(1)) ** 2
        return {
            "path_energy": energy,
            "straightness": straightness(rows[:, -2].double(), rows[:, -1].double(), duration),
            "transport_cost": cost,
            "normalized_path_energy": normalized_path_energy(energy, cost),
        }

    def fid_metric(self, datamodule: Any, device: torch.device, ranks: Ranks):
        """The FID metric with the reference statistics loaded on rank 0 (computed once per process, cached)."""
        from fmlab.metrics.fid import (
            build_fid,
            extractor_digest,
            load_reference,
            reference_cache_file,
            reference_statistics,
        )

        if self._fid is None:
            options = self.fid_options
            feature = options.get("feature") or datamodule.fid_feature
            metric, prepare = build_fid(feature, options.get("weights_path"), options.get("inception_dims", 2048))
            metric = metric.to(device)
            reference = None  # held by rank 0 alone, so other ranks neither compute nor read it
            images, cache_dir = datamodule.reference_images(), options.get("cache_dir")
            if ranks.rank == 0:
                reference = reference_statistics(metric, prepare, images, cache_dir, datamodule.name)
            self._fid = (metric, prepare, reference)
            cache = reference_cache_file(metric, cache_dir, datamodule.name, len(images))
            self._fid_reference = {
                "against": "the training set, each image at its bin centre (Lipman et al. 2023, ADM)",
                "size": len(images),
                "feature_extractor": feature,
                "inception_dims": options.get("inception_dims", 2048) if feature == "inception" else None,
                "weights_file": options.get("weights_path"),
                "extractor_sha256": extractor_digest(metric),  # of the weights actually loaded
                "statistics_file": str(cache) if cache is not None else None,
            }
        metric, prepare, reference = self._fid
        metric.reset()
        load_reference(metric, reference)
        return metric, prepare

    def _image_metrics(self, field: VelocityField, datamodule: Any, ranks: Ranks) -> dict[str, Any]:
        from fmlab.metrics.fid import states_are_finite

        device = field.device
        metric, prepare = self.fid_metric(datamodule, device, ranks)
        fid, nfe, nonfinite = [], [], 0
        per_draw: dict[str, list[float]] = {}
        feature = self.fid_options.get("feature") or datamodule.fid_feature
        for _, samples, chunk_nfe in self._generate_draws(
            field, datamodule, ranks, on_chunk=lambda x: metric.update(prepare(x), real=False)
        ):
            # decided before any metric is computed, the same on every rank (the samples are gathered; the feature
            # sums are checked on every rank together): a draw with a non-finite sample gets NaN for every metric,
            # never a score of its clamped pixels and never a non-finite matrix handed to LAPACK
            bad = count_nonfinite(samples)
            measurable = ranks.all_true(not bad and states_are_finite(metric), device)
            fid.append(float(metric.compute()) if measurable else math.nan)  # compute() sums every rank's features
            metric.reset()  # keeps the reference (reset_real_features=False)
            if self.fidelity_metrics:
                scores = self._fidelity_of(samples, datamodule) if measurable else unmeasured(self.fidelity_metrics)
                for name, score in scores.items():
                    per_draw.setdefault(name, []).append(score)
            if field.num_classes and feature == "digits" and self.labels != "data":
                accuracy = self._class_accuracy(samples, field.num_classes) if measurable else math.nan
                per_draw.setdefault("class_accuracy", []).append(accuracy)
            nfe += chunk_nfe
            nonfinite += bad
        # Lipman et al. 2023 and ADM take FID against the training set's statistics
        fid_meta = {"fid_reference": "train", "fid_feature": self.fid_options.get("feature") or datamodule.fid_feature}
        results = {**over_draws("fid", fid), **fid_meta, **nfe_stats(nfe), "nonfinite_samples": nonfinite}
        if self._measures_path_energy(datamodule):
            results.update(self._path_energy(field, datamodule, ranks, datamodule.held_out(self.num_samples)))
        for name, values in per_draw.items():
            results.update(over_draws(name, values))
        return results

    def _class_accuracy(self, samples: Tensor, num_classes: int) -> float:
        """The fraction of a draw's samples the digits classifier assigns to the class they were generated for."""
        from fmlab.metrics.digits_classifier import DigitsFeatures

        if self._classifier is None:
            self._classifier = DigitsFeatures(self.fid_options.get("weights_path")).classifier.to(samples.device)
        asked = class_labels(self.labels, num_classes, 0, len(samples)).to(samples.device)
        predicted = self._classifier(samples.clamp(-1, 1).float()).argmax(1)
        return float((predicted == asked).float().mean())

    def _fidelity_of(self, samples: Tensor, datamodule: Any) -> dict[str, float]:
        """IS, KID, precision/recall of one draw's gathered samples (every rank computes the same numbers) against
        a fixed, seeded subset of the reference (training) images as large as the draw, in FID's feature space."""
        from fmlab.metrics.fidelity import build_extractor, extract, fidelity_metrics

        if self._fidelity is None:
            options = self.fid_options
            extractor = build_extractor(
                options.get("feature") or datamodule.fid_feature,
                options.get("weights_path"),
                options.get("inception_dims", 2048),
            )
            images = datamodule.reference_images()
            chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: self.num_samples]
            device = samples.device
            reference, _ = extract(extractor, images[chosen].to(device), self.batch_size)
            self._fidelity = (extractor, reference)
        extractor, reference = self._fidelity
        generated = extract(extractor, samples, self.batch_size)
        return fidelity_metrics(self.fidelity_metrics, generated, reference)

    def negative_log_likelihood(self, field: VelocityField, datamodule: Any, ranks: Ranks) -> dict[str, Any]:
        """Mean NLL of the held-out set through the PF-ODE, chunked over ranks like generation."""
        if not self.nll_samples or datamodule.source != "gaussian":
            return {}
        divergence = self.divergence or ("hutchinson" if datamodule.is_image else "exact")
        solver = self.likelihood_solver or (
            self.solver if isinstance(self.solver, ODESolver) else DEFAULT_LIKELIHOOD_SOLVER
        )
        device = field.device
        draws = self.dequantization_samples if datamodule.is_image else 1
        log_probs, nfe = [], []
        for k in range(draws):  # k = 0: the dequantisation every earlier evaluation used
            if datamodule.is_image:
                held_out = datamodule.held_out(self.nll_samples, index=self.num_draws + 1, dequantization=k)
            else:
                held_out = datamodule.held_out(self.nll_samples, index=self.num_draws + 1)

            def compute(chunk: int, start: int, size: int, points: Tensor = held_out) -> tuple[Tensor, int]:
                result = log_likelihood(
                    field,
                    points[start : start + size].to(device),
                    solver,
                    divergence=divergence,
                    num_probes=self.num_probes,
                    generator=torch.Generator().manual_seed(chunk),  # Hutchinson probes fixed per chunk
                )
                return result.log_prob.unsqueeze(1), result.nfe

            sizes = chunk_sizes(len(held_out), self.batch_size)
            log_prob, chunk_nfe = run_chunks(sizes, ranks, compute, torch.empty(0, 1, device=device), self._tick)
            log_probs.append(log_prob.squeeze(1))
            nfe += chunk_nfe
        log_prob = importance_weighted_log_prob(torch.stack(log_probs))
        results = {"nll": -log_prob.mean().item(), "nll_nfe": statistics.fmean(nfe), "nll_divergence": divergence}
        if datamodule.is_image:
            bpd = bits_per_dim(log_prob, held_out[0].numel(), data_scale=datamodule.num_levels / 2.0)
            results.update(bpd=bpd.mean().item(), bpd_split="test", dequantization_samples=draws)
        return results

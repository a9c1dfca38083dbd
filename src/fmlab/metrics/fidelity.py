"""Inception Score, KID and precision/recall of generated images, beside FID and in the same feature space.

The metrics are torch-fidelity's own functions on per-image features (`isc_features_to_metric`,
`kid_features_to_metric`, `prc_features_to_metric`), so they equal `torch_fidelity.calculate_metrics` on the same
images and weights; only the feature extraction is fmlab's (to feed it generated tensors rather than files).
Features: torch-fidelity's InceptionV3 (pool features of `inception_dims` and its 1008 unbiased logits, uint8 input
resized by torch-fidelity itself) or the digits classifier (64 features and its 10 logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fmlab.errors import UserError, choices_error

# isc: Inception Score (Salimans et al. 2016); kid: Kernel Inception Distance (Bińkowski et al. 2018); prc: precision
# and recall of the k-NN manifolds (Kynkäänniemi et al. 2019)
FIDELITY_METRICS = ("isc", "kid", "prc")
# the numbers each metric reports
SCORES = {"isc": ("inception_score",), "kid": ("kid",), "prc": ("precision", "recall")}

Extractor = Callable[[Tensor], tuple[Tensor, Tensor]]


def check_metrics(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        if name not in FIDELITY_METRICS:
            raise choices_error("eval.fidelity_metrics", name, FIDELITY_METRICS)
    return tuple(names)


def build_extractor(feature: str, weights_path: str | None = None, inception_dims: int = 2048) -> Extractor:
    """images in [-1, 1] → (features, logits), in the feature space `eval.fid.feature` names."""
    from fmlab.metrics.fid import INCEPTION_DIMS, INCEPTION_FILE, inception_cache_path, to_inception_input

    if feature == "digits":
        from fmlab.metrics.digits_classifier import DigitsFeatures

        classifier = DigitsFeatures(weights_path).classifier

        def digits(images: Tensor) -> tuple[Tensor, Tensor]:
            features = classifier.features(images.float())
            return features, classifier.head(features)

        return digits
    if feature != "inception":
        raise choices_error("eval.fid.feature", feature, ("digits", "inception"))
    if inception_dims not in INCEPTION_DIMS:
        raise choices_error("eval.fid.inception_dims", inception_dims, INCEPTION_DIMS)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    cached = inception_cache_path()
    path = weights_path or (str(cached) if cached.is_file() else None)
    if path is not None and not Path(path).is_file():
        raise UserError(f"eval.fid.weights_path={path} does not exist; give the path of {INCEPTION_FILE}")
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(inception_dims), "logits_unbiased"], feature_extractor_weights_path=path
        ).eval()
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"IS/KID/precision-recall need the InceptionV3 weights ({type(error).__name__}: {error}); pass "
            f"eval.fid.weights_path=<{INCEPTION_FILE}>"
        ) from None

    def inception(images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = net.to(images.device)(to_inception_input(images))
        return features, logits

    return inception


@torch.no_grad()
def extract(extractor: Extractor, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """(features, logits) of `images`, in batches, on the CPU in float64 rows."""
    parts = [extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([p[0].cpu() for p in parts]), torch.cat([p[1].cpu() for p in parts])


def unmeasured(names: tuple[str, ...]) -> dict[str, float]:
    """NaN for every score of `names`: what a draw holding a non-finite sample or feature gets."""
    return {score: math.nan for name in names for score in SCORES[name]}


def fidelity_metrics(
    names: tuple[str, ...],
    generated: tuple[Tensor, Tensor],
    reference: Tensor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
) -> dict[str, float]:
    """The metrics `names` of generated (features, logits) against reference features, with torch-fidelity's
    settings: IS over 10 splits of the logits' softmax, KID as the mean unbiased MMD² (cubic polynomial kernel) over
    `kid_subsets` random subsets of min(`kid_subset_size`, n) features of each set (rng seed 2020), precision and
    recall with `prc_neighborhood`-NN balls (generated first, reference second, as torch-fidelity's input1/input2)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    features, logits = generated
    if not all(bool(torch.isfinite(t).all()) for t in (features, logits, reference)):
        return unmeasured(names)  # torch-fidelity's kernels and k-NN radii are meaningless (or worse) on NaN
    results: dict[str, float] = {}
    if "isc" in names:
        results["inception_score"] = isc_features_to_metric(logits)["inception_score_mean"]
    if "kid" in names:
        size = min(kid_subset_size, len(features), len(reference))
        kid = kid_features_to_metric(
            features, reference, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=2020, verbose=False
        )
        results["kid"] = kid["kernel_inception_distance_mean"]
    if "prc" in names:
        prc = prc_features_to_metric(
            features, reference, prc_neighborhood=prc_neighborhood, save_cpu_ram=False, verbose=False
        )
        results.update(precision=prc["precision"], recall=prc["recall"])
    return results

"""Fréchet distance between generated and reference images: torchmetrics' FID, with torch-fidelity's InceptionV3 or
the digits classifier as the feature extractor, and the reference statistics cached on disk.

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)

torchmetrics keeps the feature sums Σf, Σffᵀ and the count in float64 with `dist_reduce_fx="sum"`, so under DDP each
rank adds the features of its own images and `compute()` sums the states exactly. The reference statistics are held
by rank 0 only (zeros elsewhere), so that sum counts them once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from fmlab.errors import UserError, choices_error

FEATURES = ("inception", "digits")
INCEPTION_DIMS = (64, 192, 768, 2048)
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
FAKE_STATES = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


def inception_cache_path() -> Path:
    """Where torch-fidelity looks for (and downloads) the InceptionV3 weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def to_inception_input(images: Tensor) -> Tensor:
    """[-1, 1] images → uint8 RGB in [0, 255], the input torch-fidelity's InceptionV3 expects (grey → 3 channels)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def build_fid(feature: str = "inception", weights_path: str | None = None, inception_dims: int = 2048):
    """A torchmetrics `FrechetInceptionDistance` and the function that turns [-1, 1] images into its input.

    `feature="inception"`: torch-fidelity's InceptionV3 (`inception_dims` features, 2048 for the papers' FID), weights
    from `weights_path`, else from the torch hub cache, else downloaded. `feature="digits"`: the committed digits
    classifier's 64 features (`weights_path` overrides its weights file).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature not in FEATURES:
        raise choices_error("eval.fid.feature", feature, FEATURES)
    if feature == "digits":
        from fmlab.metrics.digits_classifier import DigitsFeatures

        metric = FrechetInceptionDistance(feature=DigitsFeatures(weights_path), reset_real_features=False)
        return metric, lambda images: images.float()
    if inception_dims not in INCEPTION_DIMS:
        raise choices_error("eval.fid.inception_dims", inception_dims, INCEPTION_DIMS)
    if weights_path is not None and not Path(weights_path).is_file():
        raise UserError(f"eval.fid.weights_path={weights_path} does not exist; give the path of {INCEPTION_FILE}")
    try:
        # antialias=False: resize to 299 as torch-fidelity and the original TF FID do (torchmetrics' default
        # antialiased resize changes the features, here by up to 14%, so its FID is not the papers' FID)
        metric = FrechetInceptionDistance(
            feature=inception_dims,
            reset_real_features=False,
            feature_extractor_weights_path=weights_path,
            antialias=False,
        )
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        if weights_path is not None:
            raise UserError(f"eval.fid.weights_path={weights_path} could not be loaded: {error}") from None
        raise UserError(
            f"FID needs the InceptionV3 weights and could not download them ({type(error).__name__}); download "
            f"{URL_INCEPTION_V3} to {inception_cache_path()} or pass eval.fid.weights_path=<file>"
        ) from None
    return metric, to_inception_input


def extractor_digest(metric: nn.Module) -> str:
    """A short hash of the feature extractor's weights and resize mode: the cache key that tells extractors apart."""
    digest = hashlib.sha256()
    digest.update(f"antialias={getattr(metric.inception, 'use_antialias', None)}".encode())
    for name, tensor in sorted(metric.inception.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def reference_cache_file(metric: nn.Module, cache_dir: str | Path | None, name: str, size: int) -> Path | None:
    """Where the reference statistics of `size` images of `name` in this extractor's features are cached."""
    return None if cache_dir is None else Path(cache_dir) / f"{name}-{extractor_digest(metric)}-{size}.pt"


def reference_statistics(
    metric: nn.Module,
    prepare: Callable[[Tensor], Tensor],
    images: Tensor,
    cache_dir: str | Path | None,
    name: str,
    batch_size: int = 256,
) -> dict[str, Tensor]:
    """The reference (real) feature sums of `images`, read from `<cache_dir>/<name>-<extractor>-<n>.pt` when present,
    else computed and written there. Leaves `metric`'s real states holding them."""
    cache = reference_cache_file(metric, cache_dir, name, len(images))
    if cache is not None and cache.is_file():
        states = torch.load(cache, map_location="cpu", weights_only=True)
        load_reference(metric, states)
        return states
    for state in REAL_STATES:
        getattr(metric, state).zero_()
    device = metric.real_features_sum.device
    for batch in images.split(batch_size):
        metric.update(prepare(batch.to(device)), real=True)
    states = {state: getattr(metric, state).detach().cpu().clone() for state in REAL_STATES}
    if cache is not None and states_are_finite(metric):  # a broken extractor's statistics are never kept
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")  # concurrent jobs may write the same cache
        torch.save(states, partial)
        partial.replace(cache)
    return states


def states_are_finite(metric: nn.Module) -> bool:
    """Whether every feature sum the metric holds (reference and generated) is finite. `compute()` takes the
    eigenvalues of Σ_r Σ_g; under torch 2.14.1 `torch.linalg.eigvals` of a non-finite matrix aborts the whole
    process (heap corruption, not an exception), so a non-finite state must never reach it."""
    return all(bool(torch.isfinite(getattr(metric, state)).all()) for state in (*REAL_STATES, *FAKE_STATES))


def load_reference(metric: nn.Module, states: dict[str, Tensor] | None) -> None:
    """Set the metric's real states (None: zeros, for ranks other than 0 under DDP)."""
    for state in REAL_STATES:
        target = getattr(metric, state)
        target.copy_(states[state].to(target.device) if states is not None else torch.zeros_like(target))

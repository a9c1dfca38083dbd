"""Distances between empirical distributions, on POT."""

from __future__ import annotations

import numpy as np
import ot
from torch import Tensor


def wasserstein2(x: Tensor, y: Tensor) -> float:
    """W2(μ̂, ν̂) = (min_π Σ_ij π_ij ‖x_i − y_j‖²)^½ between two empirical measures with uniform weights.

    Exact: POT's network-simplex EMD on the squared Euclidean cost, in float64.
    """
    a = x.detach().flatten(1).double().cpu().numpy()
    b = y.detach().flatten(1).double().cpu().numpy()
    cost = ot.dist(a, b, metric="sqeuclidean")
    weights_a, weights_b = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    return float(np.sqrt(ot.emd2(weights_a, weights_b, cost, numItermax=10_000_000)))

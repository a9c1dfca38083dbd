"""Distances between empirical distributions, on POT."""

from __future__ import annotations

import math

import numpy as np
import ot
import torch
from torch import Tensor


def wasserstein2(x: Tensor, y: Tensor) -> float:
    """W2(μ̂, ν̂) = (min_π Σ_ij π_ij ‖x_i − y_j‖²)^½ between two empirical measures with uniform weights.

    Exact: POT's network-simplex EMD on the squared Euclidean cost, in float64. NaN when either set holds a
    non-finite value: POT returns 0 for such an unbounded problem, which would read as a perfect score.
    """
    a = x.detach().flatten(1).double().cpu().numpy()
    b = y.detach().flatten(1).double().cpu().numpy()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    cost = ot.dist(a, b, metric="sqeuclidean")
    weights_a, weights_b = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    return float(np.sqrt(ot.emd2(weights_a, weights_b, cost, numItermax=10_000_000)))


DEFAULT_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] | list[float] = DEFAULT_BANDWIDTHS) -> float:
    """Unbiased squared MMD with the multi-bandwidth RBF kernel k(a, b) = Σ_h exp(−‖a − b‖² / (2h²)):

        MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/(nm) Σ_ij k(x_i, y_j)

    (Gretton et al. 2012, Lemma 6). Unbiased, so it can be slightly negative when the distributions are equal.
    Pairwise squared distances are POT's, in float64. NaN when either set holds a non-finite value.
    """
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"MMD bandwidths must be positive; got {list(bandwidths)}")
    a = x.detach().flatten(1).double().cpu().numpy()
    b = y.detach().flatten(1).double().cpu().numpy()
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 points per set; got {n} and {m}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")

    def kernel_sum(d2: np.ndarray) -> np.ndarray:
        return sum(np.exp(-d2 / (2.0 * h * h)) for h in bandwidths)

    k_xx, k_yy = kernel_sum(ot.dist(a, a)), kernel_sum(ot.dist(b, b))
    k_xy = kernel_sum(ot.dist(a, b))
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def normalized_path_energy(path_energy: float, transport_cost: float) -> float:
    """Tong et al. 2024's normalized path energy NPE = |PE − W2²(q0, q1)| / W2²(q0, q1): how far a flow's kinetic
    energy PE = E ∫ ‖v_t(x_t)‖² dt is from the least any flow between q0 and q1 can have (0 for the OT map's
    straight paths). NaN when either is not finite."""
    if not (math.isfinite(path_energy) and math.isfinite(transport_cost)) or transport_cost <= 0:
        return math.nan
    return abs(path_energy - transport_cost) / transport_cost


def straightness(energy: Tensor, displacement: Tensor, duration: float = 1.0) -> float:
    """Liu et al. 2023's straightness S = E ∫_a^b ‖(x_b − x_a) − v_t(x_t)‖² dt of trajectories on [a, b], from each
    trajectory's kinetic energy E_i = ∫ ‖v_t‖² dt and squared displacement D_i = ‖x_b − x_a‖²: since ∫ v_t dt =
    x_b − x_a, the integrand expands to S = E[E_i − (2 − (b − a)) D_i]. 0 exactly for straight paths at constant
    speed; NaN when either input is not finite."""
    values = energy.double() - (2.0 - duration) * displacement.double()
    if not bool(torch.isfinite(values).all()):
        return math.nan
    return float(values.mean())

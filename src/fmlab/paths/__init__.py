"""Probability paths: schedules (α_t, σ_t), the affine path built on them (every path quantity), training-time
distributions and the exact marginal field of a point set."""

from fmlab.paths.oracle import MarginalOracle
from fmlab.paths.path import AffinePath, broadcast_time
from fmlab.paths.schedules import CondOT, Linear, Schedule, VEGeometric, VPCosine, VPLinear

__all__ = [
    "AffinePath",
    "CondOT",
    "Linear",
    "MarginalOracle",
    "Schedule",
    "VEGeometric",
    "VPCosine",
    "VPLinear",
    "broadcast_time",
]

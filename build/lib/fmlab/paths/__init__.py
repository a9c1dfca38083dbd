"""Probability paths: schedules (α_t, σ_t), the affine path built on them, and minibatch couplings."""

from fmlab.paths.couplings import IndependentCoupling, MinibatchOTCoupling
from fmlab.paths.oracle import MarginalOracle
from fmlab.paths.path import AffinePath, broadcast_time
from fmlab.paths.schedules import CondOT, Linear, Schedule, VEGeometric, VPCosine, VPLinear

__all__ = [
    "AffinePath",
    "CondOT",
    "IndependentCoupling",
    "Linear",
    "MarginalOracle",
    "MinibatchOTCoupling",
    "Schedule",
    "VEGeometric",
    "VPCosine",
    "VPLinear",
    "broadcast_time",
]

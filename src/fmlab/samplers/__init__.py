"""Samplers: one protocol (`Sampler`), one grid loop, one registry.

`SAMPLERS` maps every name `solver=<name>` accepts (the files of conf/solver) to the class that file builds; the NFE
sweep and the command line read it, and a test checks conf/solver against it. Each sampler records every setting
that changes its samples (`describe`), and NFE is always the net calls the field counted.
"""

from fmlab.errors import SolverError
from fmlab.samplers.base import Sampler, SampleResult, denoised, marginal_score, run_grid, sample
from fmlab.samplers.diffusion import AncestralSampler, EulerMaruyama, PredictorCorrector, langevin_step
from fmlab.samplers.edm import EDMHeun
from fmlab.samplers.meanflow import MeanFlowSampler
from fmlab.samplers.ode import ADAPTIVE_METHODS, FIXED_STEP_METHODS, ODESolver, PathEnergyResult, path_energy

SAMPLERS: dict[str, type] = {
    **{method: ODESolver for method in ("euler", "midpoint", "heun", "rk4", "dopri5")},
    "ancestral": AncestralSampler,
    "euler_maruyama": EulerMaruyama,
    "pc": PredictorCorrector,
    "edm_heun": EDMHeun,
    "mean_flow": MeanFlowSampler,
}

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_STEP_METHODS",
    "MeanFlowSampler",
    "SAMPLERS",
    "AncestralSampler",
    "EDMHeun",
    "EulerMaruyama",
    "ODESolver",
    "PathEnergyResult",
    "PredictorCorrector",
    "SampleResult",
    "Sampler",
    "SolverError",
    "denoised",
    "langevin_step",
    "marginal_score",
    "path_energy",
    "run_grid",
    "sample",
]

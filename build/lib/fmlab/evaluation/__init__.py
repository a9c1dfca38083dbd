"""The evaluation engine: generation over fixed chunks, W2/MMD, FID, NLL/BPD, NFE, the NFE sweep. No Lightning."""

from fmlab.evaluation.engine import Evaluator, generate
from fmlab.evaluation.nfe_sweep import nfe_sweep, sweep_solvers

__all__ = ["Evaluator", "generate", "nfe_sweep", "sweep_solvers"]

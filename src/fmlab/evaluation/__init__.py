"""The evaluation engine: generation over fixed chunks, W2/MMD, FID, NLL/BPD, NFE, and the NFE and guidance sweeps.
Numbers only (no files), and no Lightning."""

from fmlab.evaluation.engine import Evaluator, generate
from fmlab.evaluation.guidance_sweep import guidance_sweep
from fmlab.evaluation.nfe_sweep import nfe_sweep

__all__ = ["Evaluator", "generate", "guidance_sweep", "nfe_sweep"]

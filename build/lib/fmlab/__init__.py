"""fmlab: flow matching and its diffusion baselines on one Lightning + Hydra harness."""

__version__ = "0.1.0"

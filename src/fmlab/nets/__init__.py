"""Plain backbones: they map (t, x) to a tensor shaped like x and know nothing of paths or objectives."""

from fmlab.nets.mlp import MLP
from fmlab.nets.resmlp import ResidualMLP
from fmlab.nets.unet import UNet

__all__ = ["MLP", "ResidualMLP", "UNet"]

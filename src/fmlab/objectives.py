"""Objectives: what the network predicts, its regression loss, and its conversion to a PF-ODE velocity.

Every objective turns the network output into the velocity of the probability-flow ODE (`to_velocity`), so every
method samples and evaluates likelihoods through the same ODE code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from fmlab.paths.path import AffinePath


class Objective(ABC):
    """loss = E_{t, x0, x1} w(t) ‖net(t, x_t) − target‖², averaged over batch and dimensions."""

    @abstractmethod
    def loss(self, net: nn.Module, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None) -> Tensor:
        """The regression loss of `net` on one (coupled) batch at times `t`."""

    @abstractmethod
    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        """The PF-ODE velocity v_t(x) implied by the network output at (t, x)."""


class VelocityObjective(Objective):
    """Conditional flow matching (seed 001, L_CFM of §3.2): E ‖v_θ(t, x_t) − u_t(x_t | x1)‖².

    The network predicts the velocity itself, so `to_velocity` is the identity.
    """

    def loss(self, net: nn.Module, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None) -> Tensor:
        x_t, u_t = path.sample_with_target(t, x0, x1, noise)
        return (net(t, x_t) - u_t).pow(2).mean()

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return output

    def __repr__(self) -> str:
        return "VelocityObjective()"

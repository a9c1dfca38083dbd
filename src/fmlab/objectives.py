"""Objectives: what the network predicts, its regression loss, and its conversion to a PF-ODE velocity; and
`VelocityField`, the drift of any net (with classifier-free guidance), which samplers, the likelihood and the
evaluation engine take.

Every objective turns the network output into the velocity of the probability-flow ODE (`to_velocity`), so every
method samples and evaluates likelihoods through the same ODE code.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fmlab.conditioning import null_condition
from fmlab.errors import SolverError, UserError
from fmlab.paths.path import AffinePath

# the net as an objective calls it, net(t, x_t): a plain nn.Module, or one bound to a batch's class labels
Net = Callable[[Tensor, Tensor], Tensor]
# what an objective regresses: (net output − target, the per-sample weight λ(t) or None)
Residual = tuple[Tensor, Tensor | None]


class Objective(ABC):
    """loss = E_{t, x0, x1} w(t) ‖net(t, x_t) − target‖², averaged over batch and dimensions."""

    # ε, score and x1 are interchangeable only when x0 ~ N(0, I): such objectives refuse a data source.
    needs_gaussian_source: bool = False

    def loss(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None,
             weights: Tensor | None = None) -> Tensor:  # fmt: skip
        """mean over samples of w λ(t) ‖residual‖² (mean over dimensions): the objective's weighting λ(t) and the
        per-sample `weights` (e.g. the time sampler's density ratio) where given."""
        residual, weight = self.residual(net, path, t, x0, x1, noise)
        if weight is None and weights is None:
            return residual.pow(2).mean()
        if weights is not None:
            weight = weights if weight is None else weight * weights
        return (weight * residual.pow(2).flatten(1).mean(1)).mean()

    @abstractmethod
    def residual(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor,
                 noise: Tensor | None) -> Residual:  # fmt: skip
        """(net output − target on one coupled batch at times `t`, the per-sample weight λ(t) or None)."""

    @abstractmethod
    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        """The PF-ODE velocity v_t(x) implied by the network output at (t, x)."""


class VelocityObjective(Objective):
    """Conditional flow matching (seed 001, L_CFM of §3.2): E ‖v_θ(t, x_t) − u_t(x_t | x1)‖².

    The network predicts the velocity itself, so `to_velocity` is the identity.
    """

    def residual(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor,
                 noise: Tensor | None) -> Residual:  # fmt: skip
        x_t, u_t = path.sample_with_target(t, x0, x1, noise)
        return net(t, x_t) - u_t, None

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return output

    def __repr__(self) -> str:
        return "VelocityObjective()"


def _require_gaussian_path(path: AffinePath, name: str) -> None:
    if path.has_smoothing:
        raise UserError(f"objective={name} needs a Gaussian path without smoothing noise; got {path!r}")


class EpsilonObjective(Objective):
    """DDPM's noise prediction (Ho et al. 2020): E ‖ε_θ(t, x_t) − ε‖² with x_t = α_t x1 + σ_t ε.

    PF-ODE velocity: v = α̇ x̂1 + σ̇ ε̂ with x̂1 = (x − σ ε̂)/α (`AffinePath.velocity_from_epsilon`).
    """

    needs_gaussian_source = True

    def residual(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor,
                 noise: Tensor | None) -> Residual:  # fmt: skip
        _require_gaussian_path(path, "epsilon")
        x_t, _ = path.sample_with_target(t, x0, x1)
        return net(t, x_t) - x0, None

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return path.velocity_from_epsilon(output, x, t)

    def __repr__(self) -> str:
        return "EpsilonObjective()"


class ScoreObjective(Objective):
    """Denoising score matching with λ(t) = σ_t² (Song & Ermon 2019; Song et al. 2021, eq. 7):

    E σ_t² ‖s_θ(t, x_t) − ∇ log p_t(x_t | x1)‖², with ∇ log p_t(x_t | x1) = −ε/σ_t. The score network's output
    is divided by σ_t (`scale_by_sigma`, NCSN's parameterisation), s_θ = −net/σ_t, which keeps its scale O(1).
    """

    needs_gaussian_source = True

    def __init__(self, scale_by_sigma: bool = True) -> None:
        self.scale_by_sigma = scale_by_sigma

    def score(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return path.score_from_epsilon(output, x, t) if self.scale_by_sigma else output

    def weight(self, path: AffinePath, t: Tensor) -> Tensor:
        return path.schedule.sigma(t) ** 2

    def residual(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor,
                 noise: Tensor | None) -> Residual:  # fmt: skip
        _require_gaussian_path(path, type(self).__name__)
        x_t, _ = path.sample_with_target(t, x0, x1)
        target_score = path.score_from_epsilon(x0, x_t, t)
        return self.score(net(t, x_t), x_t, t, path) - target_score, self.weight(path, t)

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        epsilon = path.epsilon_from_score(self.score(output, x, t, path), x, t)
        return path.velocity_from_epsilon(epsilon, x, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale_by_sigma={self.scale_by_sigma})"


class ScoreLikelihoodObjective(ScoreObjective):
    """ScoreFlow's likelihood weighting λ(t) = g(t)² (Song et al. 2021b, Thm. 1), which bounds the NLL:
    E g² ‖s_θ − ∇ log p_t(x | x1)‖².

    ScoreFlow draws t uniformly in log-SNR and reweights by the density ratio (`time_sampler=log_snr_uniform` with
    `loss_weight: density_ratio`, the method's default): since g²/σ² = d/dt log SNR, the weight becomes constant,
    σ² Z/(t_max − t_min) with Z = log SNR(t_max) − log SNR(t_min), and the estimate far lower in variance.
    """

    def weight(self, path: AffinePath, t: Tensor) -> Tensor:
        return path.diffusion_squared(t)


def mean_velocity_and_total_derivative(mean_velocity: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor,
                                       start: Tensor, end: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """ū(x, s, e) and its total derivative in s along the flow with end e held fixed,

        d/ds ū(x_s, s, e) = ∂_x ū · v + ∂_s ū,   dx_s/ds = v,

    in one forward-mode JVP of `mean_velocity(x, s, e)` along the tangent (v, 1, 0) (torch.func.jvp: one forward
    pass carrying the tangent, no second backward)."""
    return torch.func.jvp(mean_velocity, (x, start, end), (v, torch.ones_like(start), torch.zeros_like(end)))


def meanflow_target(v: Tensor, du_ds: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """The MeanFlow identity's right-hand side, ū(x_s, s, e) = v(x_s, s) + (e − s) d/ds ū(x_s, s, e): from
    differentiating (e − s) ū(x_s, s, e) = ∫_s^e v(x_τ, τ) dτ in s (Geng et al. 2025, eq. 6 in fmlab's clock)."""
    span = (end - start).reshape(-1, *([1] * (v.dim() - 1)))
    return v + span * du_ds


def adaptively_weighted(squared: Tensor, p: float, eps: float) -> Tensor:
    """MeanFlow's adaptive loss weighting (Geng et al. 2025, §4.3): sg(w) ‖Δ‖² with w = 1 / (‖Δ‖² + eps)^p, per sample.

    Its gradient is that of ‖Δ‖^(2 − 2p) up to eps, so p sets what the regression estimates: p = 0 the mean of the
    targets (plain squared error: the marginal field), p = ½ their geometric median (the loss is ≈ ‖Δ‖), p = 1 a mode
    (≈ log ‖Δ‖²). In high dimension ‖Δ‖² concentrates and w acts as a per-sample scale; in 2D it does not."""
    return squared / (squared.detach() + eps) ** p


class MeanFlowObjective(Objective):
    """MeanFlow (Geng, Deng, Bai, Kolter, He 2025): the net predicts the average velocity over an interval,
    ū_θ(x_s, s, e) ≈ (1/(e − s)) ∫_s^e v_τ(x_τ) dτ (fmlab's clock: `paths.time_samplers.meanflow_to_flow_times`), and
    is trained on the MeanFlow identity, which follows from differentiating (e − s) ū = ∫_s^e v dτ in s:

        ū(x_s, s, e) = v(x_s, s) + (e − s) d/ds ū(x_s, s, e),   d/ds ū = ∂_x ū · v + ∂_s ū,

    with the total derivative a forward-mode JVP of the net in (x, s, e) along (v, 1, 0) (torch.func.jvp; the
    duration h = e − s moves with s), v the path's conditional velocity, and the target's gradient stopped:
    Δ = ū_θ − sg(v + (e − s) dū_θ/ds). The loss is MeanFlow's adaptive weighting of ‖Δ‖² (summed over dimensions),
    sg(w) ‖Δ‖² with w = 1/(‖Δ‖² + `eps`)^`p` (`adaptively_weighted`: the paper's best on ImageNet is p = 1,
    py-meanflow's CIFAR-10 runs take 0.75; only p = 0 regresses on the conditional mean, see there). The times are
    pairs (s, e) from `MeanFlowTimes`; where e = s the loss is flow matching's. At h = 0 the net is the instantaneous
    velocity, so every ODE sampler and the likelihood read it as any velocity net; `solver=mean_flow` jumps with the
    average one.
    """

    def __init__(self, p: float = 1.0, eps: float = 1e-3) -> None:
        if not p >= 0 or not eps > 0:
            raise UserError(f"objective.p={p} must be >= 0 and objective.eps={eps} > 0")
        # the weight's extreme, eps^-p at a zero residual, must be a float32 number: beyond it the loss is inf at
        # small residuals and underflows to 0 at large ones (a loss that learns nothing)
        if not p * abs(math.log(eps)) <= math.log(torch.finfo(torch.float32).max):
            raise UserError(
                f"objective.p={p} with objective.eps={eps} puts the loss weight 1/(|delta|^2 + eps)^p beyond float32 "
                f"(eps^-p); keep p * |ln eps| <= {math.log(torch.finfo(torch.float32).max):.0f} (the paper's p: 0 to 2)"
            )
        self.p, self.eps = float(p), float(eps)

    def residual(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor,
                 noise: Tensor | None) -> Residual:  # fmt: skip
        if t.dim() != 2 or t.shape[1] != 2:
            raise UserError("objective=mean_flow trains on intervals (s, e): use time_sampler=mean_flow")
        start, end = t[:, 0], t[:, 1]
        x_s, v = path.sample_with_target(start, x0, x1, noise)
        u, du_ds = mean_velocity_and_total_derivative(lambda x, s, e: net(s, x, duration=e - s), x_s, start, end, v)
        return u - meanflow_target(v, du_ds, start, end).detach(), None

    def loss(self, net: Net, path: AffinePath, t: Tensor, x0: Tensor, x1: Tensor, noise: Tensor | None,
             weights: Tensor | None = None) -> Tensor:  # fmt: skip
        residual, _ = self.residual(net, path, t, x0, x1, noise)
        return adaptively_weighted(residual.pow(2).flatten(1).sum(1), self.p, self.eps).mean()

    def to_velocity(self, output: Tensor, x: Tensor, t: Tensor, path: AffinePath) -> Tensor:
        return output

    def __repr__(self) -> str:
        return f"MeanFlowObjective(p={self.p}, eps={self.eps})"


def guided_prediction(conditional: Tensor, unconditional: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): f̃ = (1 + w) f(x, t, y) − w f(x, t, ∅).

    w = 0 is the conditional model, w = −1 the unconditional one; SiT and diffusers write s = 1 + w. Applied to
    whatever the net predicts; every objective's `to_velocity` is affine in the prediction with coefficients that do
    not depend on it, so guiding the prediction or the velocity gives the same guided velocity.
    """
    return (1.0 + guidance_scale) * conditional - guidance_scale * unconditional


def _times(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).expand(x.shape[0])


class VelocityField(nn.Module):
    """v_t(x) = objective.to_velocity(net(t, x), x, t): the PF-ODE drift of any method. Counts net evaluations in
    `nfe` (one per call; two per guided call, whose conditional and unconditional halves run as one batch).

    A class-conditional net (`net.num_classes` = K > 0) or one with a continuous condition (`net.condition_dim` =
    k > 0) is asked for `labels` (class indices, or (batch, k) conditions) set with `conditioned_on(labels, w)`,
    guided with scale w; without labels it is the unconditional model (the null condition ∅: class K, or NaN)."""

    def __init__(self, net: nn.Module, objective: Objective, path: AffinePath, learned_null: bool = True) -> None:
        super().__init__()
        self.net, self.objective, self.path = net, objective, path
        # whether a class-conditional net learned the null class ∅ (label dropout p_uncond > 0): guidance and the
        # unconditional likelihood read it
        self.learned_null = bool(learned_null)
        self.nfe = 0
        self.labels: Tensor | None = None
        self.guidance_scale = 0.0

    @property
    def num_classes(self) -> int:
        """K for a class-conditional net, 0 otherwise."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    @property
    def condition_dim(self) -> int:
        """k for a net with a continuous condition, 0 otherwise."""
        return int(getattr(self.net, "condition_dim", 0) or 0)

    @property
    def is_conditional(self) -> bool:
        return bool(self.num_classes or self.condition_dim)

    def null_conditions(self, labels: Tensor) -> Tensor:
        """∅ for every row of `labels` (`fmlab.conditioning.null_condition`)."""
        return null_condition(labels, self.num_classes)

    @property
    def device(self) -> torch.device:
        """Where the net lives (its parameters, or its buffers for a parameter-free exact field)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @contextmanager
    def conditioned_on(self, labels: Tensor | None, guidance_scale: float = 0.0) -> Iterator[VelocityField]:
        """Within the block the field generates class (or condition) `labels[i]` for row i, guided with scale w."""
        if labels is not None and not self.is_conditional:
            raise UserError("conditions were given to an unconditional run; train it with conditioning=class or x")
        if guidance_scale and labels is None:
            raise UserError(f"eval.guidance_scale={guidance_scale} needs conditions to guide towards")
        saved = self.labels, self.guidance_scale
        self.labels, self.guidance_scale = labels, float(guidance_scale)
        try:
            yield self
        except SolverError as failure:
            if not guidance_scale:
                raise
            # the guided field (1 + w) f(x, y) − w f(x, ∅) grows with w: name the scale, not the training
            raise SolverError(
                f"eval.guidance_scale={guidance_scale:g} made the guided field too large to integrate "
                f"({str(failure).split(':')[0]}); the papers guide with w of 0 to about 10: lower eval.guidance_scale"
            ) from None
        finally:
            self.labels, self.guidance_scale = saved

    def prediction(self, t: Tensor, x: Tensor, **inputs: Tensor) -> Tensor:
        """What the net predicts at (t, x) (and its further `inputs`, such as a duration) for this field's labels,
        guided when a scale is set."""
        if self.labels is None:
            self.nfe += 1
            return self.net(t, x, **inputs)
        if self.guidance_scale == 0.0:
            self.nfe += 1
            return self.net(t, x, labels=self.labels, **inputs)
        self.nfe += 2
        null = self.null_conditions(self.labels)
        doubled = {name: torch.cat([value, value]) for name, value in inputs.items()}
        both = self.net(torch.cat([t, t]), torch.cat([x, x]), labels=torch.cat([self.labels, null]), **doubled)
        conditional, unconditional = both.chunk(2)
        return guided_prediction(conditional, unconditional, self.guidance_scale)

    def mean_velocity(self, t: Tensor, x: Tensor, duration: Tensor) -> Tensor:
        """The net's output for the interval [t, t + duration]: MeanFlow's average velocity ū (one net call)."""
        return self.prediction(_times(t, x), x, duration=_times(duration, x))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t_batch = _times(t, x)
        return self.objective.to_velocity(self.prediction(t_batch, x), x, t_batch, self.path)

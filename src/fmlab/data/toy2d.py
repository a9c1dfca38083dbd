"""2D toy distributions as vectorised torch samplers, and their datamodule.

Definitions follow the papers' code so figures compare: `moons` and `8gaussians` as in TorchCFM's tutorial
(Tong et al. 2024), `scurve` as in its 2D experiments, the rest as in FFJORD (Grathwohl et al. 2019).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fmlab.conditioning import CONTINUOUS_CONDITIONS, NEEDS_LABELS, kind_of
from fmlab.couplings import IndependentCoupling
from fmlab.data.streams import LabelledSampler, PairStream, PairStreamDataModule, Sampler, loader_workers
from fmlab.errors import UserError, choices_error
from fmlab.seeding import seeded_generator


def _uniform(n: int, g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g)


def _normal(n: int, g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g)


def sample_gaussian(n: int, g: torch.Generator) -> Tensor:
    """N(0, I) in 2D: the default source."""
    return _normal(n, g, 2)


def sample_moons(n: int, g: torch.Generator) -> Tensor:
    """TorchCFM's moons: evenly spaced angles a ∈ [0, π] on two half circles (outer cos a, sin a;
    inner 1 − cos a, 0.5 − sin a), one U(0, 0.2) offset added to both coordinates of a point, then × 3 − 1."""
    return sample_moons_labelled(n, g)[0]


def sample_moons_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """`sample_moons` and each point's moon: 0 outer, 1 inner."""
    n_outer = n // 2
    outer = torch.linspace(0, math.pi, n_outer)
    inner = torch.linspace(0, math.pi, n - n_outer)
    x = torch.cat([torch.cos(outer), 1 - torch.cos(inner)])
    y = torch.cat([torch.sin(outer), 0.5 - torch.sin(inner)])
    points = torch.stack([x, y], dim=1) + 0.2 * _uniform(n, g, 1)
    labels = torch.cat([torch.zeros(n_outer, dtype=torch.long), torch.ones(n - n_outer, dtype=torch.long)])
    return points * 3 - 1, labels


def sample_8gaussians(n: int, g: torch.Generator) -> Tensor:
    """TorchCFM's 8 Gaussians: centres 5 (cos kπ/4, sin kπ/4); its sampler passes √0.1 as the covariance,
    so each coordinate has standard deviation 0.1^(1/4)."""
    return sample_8gaussians_labelled(n, g)[0]


def sample_8gaussians_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """`sample_8gaussians` and each point's mode k (centre 5 (cos kπ/4, sin kπ/4))."""
    modes = torch.randint(0, 8, (n,), generator=g)
    angles = modes * (math.pi / 4)
    centres = 5.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return centres + 0.1**0.25 * _normal(n, g, 2), modes


def sample_checkerboard(n: int, g: torch.Generator) -> Tensor:
    """FFJORD's checkerboard: uniform on the 8 dark squares of a 4×4 board on [−4, 4]²."""
    x1 = _uniform(n, g) * 4 - 2
    x2 = _uniform(n, g) - torch.randint(0, 2, (n,), generator=g) * 2.0
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) * 2


def sample_scurve(n: int, g: torch.Generator) -> Tensor:
    """S curve (x, z) of scikit-learn's make_s_curve with noise 0.05, × 1.5, as in TorchCFM's 2D experiments."""
    t = 3 * math.pi * (_uniform(n, g) - 0.5)
    points = torch.stack([torch.sin(t), torch.sign(t) * (torch.cos(t) - 1)], dim=1)
    return (points + 0.05 * _normal(n, g, 2)) * 1.5


def sample_swissroll(n: int, g: torch.Generator) -> Tensor:
    """FFJORD's swiss roll: make_swiss_roll (t cos t, t sin t), t ~ U[1.5π, 4.5π], noise 1.0, divided by 5."""
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, g))
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (points + _normal(n, g, 2)) / 5


def sample_circles(n: int, g: torch.Generator) -> Tensor:
    """FFJORD's circles: two concentric circles (radii 1 and 0.5, equal mass), noise 0.08, × 3."""
    angles = 2 * math.pi * _uniform(n, g)
    radius = 1.0 - 0.5 * torch.randint(0, 2, (n,), generator=g)
    points = radius[:, None] * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return (points + 0.08 * _normal(n, g, 2)) * 3


def sample_pinwheel(n: int, g: torch.Generator) -> Tensor:
    """FFJORD's pinwheel: 5 arms, radial std 0.3, tangential std 0.1, rate 0.25, × 2."""
    num_arms, rate = 5, 0.25
    features = _normal(n, g, 2) * torch.tensor([0.3, 0.1])
    features[:, 0] += 1.0
    arm = torch.randint(0, num_arms, (n,), generator=g)
    angles = arm * (2 * math.pi / num_arms) + rate * torch.exp(features[:, 0])
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotations = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return 2 * torch.einsum("ni,nji->nj", features, rotations)


def sample_2spirals(n: int, g: torch.Generator) -> Tensor:
    """FFJORD's two spirals: r = √u · 540°, points (−r cos r, r sin r) and their reflection, / 3, noise 0.1."""
    r = torch.sqrt(_uniform(n, g)) * (540 * 2 * math.pi / 360)
    arm = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1) + 0.5 * _uniform(n, g, 2)
    sign = 1.0 - 2.0 * torch.randint(0, 2, (n, 1), generator=g)
    return sign * arm / 3 + 0.1 * _normal(n, g, 2)


DISTRIBUTIONS: dict[str, Sampler] = {
    "gaussian": sample_gaussian,
    "moons": sample_moons,
    "8gaussians": sample_8gaussians,
    "checkerboard": sample_checkerboard,
    "scurve": sample_scurve,
    "swissroll": sample_swissroll,
    "circles": sample_circles,
    "pinwheel": sample_pinwheel,
    "2spirals": sample_2spirals,
}


LABELLED_DISTRIBUTIONS: dict[str, LabelledSampler] = {
    "moons": sample_moons_labelled,
    "8gaussians": sample_8gaussians_labelled,
}
NUM_CLASSES = {"moons": 2, "8gaussians": 8}


def get_labelled_distribution(name: str) -> LabelledSampler:
    """The labelled sampler of `name`, or a one-line error naming the 2D datasets that have classes."""
    if name not in LABELLED_DISTRIBUTIONS:
        raise UserError(
            f"data.target={name} has no class labels, so conditioning=class cannot train on it; choose one of "
            f"{', '.join(LABELLED_DISTRIBUTIONS)} (2D), or digits, mnist, cifar10, imagenet32, imagenet64"
        )
    return LABELLED_DISTRIBUTIONS[name]


def conditioned_sampler(target: str, condition: str) -> LabelledSampler:
    """The sampler of `target` that also returns each point's `condition`: its class (`class`) or a continuous
    function of the point (`fmlab.conditioning.CONTINUOUS_CONDITIONS`), drawn from the same generator as the plain
    sampler's points."""
    if kind_of(condition) == "class":
        return get_labelled_distribution(target)
    points_of = get_labelled_distribution(target) if condition in NEEDS_LABELS else None
    plain = get_distribution(target)

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        points, labels = points_of(n, g) if points_of is not None else (plain(n, g), None)
        return points, CONTINUOUS_CONDITIONS[condition](points, labels)

    return sample


def get_distribution(name: str, role: str = "data.target") -> Sampler:
    """The sampler called `name`, or a one-line error listing the choices."""
    if name not in DISTRIBUTIONS:
        raise choices_error(role, name, DISTRIBUTIONS)
    return DISTRIBUTIONS[name]


class Toy2DDataModule(PairStreamDataModule):
    """(source → target) 2D data: training pairs, plus fixed held-out sets for evaluation (`EvaluationData`)."""

    variant = "fmlab.data.toy2d: a fresh draw per batch (moons and 8gaussians as TorchCFM's tutorial defines them)"

    def __init__(
        self,
        target: str = "moons",
        source: str = "gaussian",
        batch_size: int = 256,
        batches_per_epoch: int = 1000,
        num_eval_samples: int = 2000,
        num_workers: int | str = 0,
        seed: int = 0,
        shape: tuple[int, ...] = (2,),
        num_classes: int = 0,
        with_labels: bool = False,
        condition: str | None = None,
        coupling_group: int = 1,
    ) -> None:
        super().__init__()
        self.target_sampler = get_distribution(target, "data.target")
        # conditioning=class (with_labels) or a continuous condition: batches carry each target point's condition
        self.condition = "class" if with_labels and not condition else condition
        self.conditioned = conditioned_sampler(target, self.condition) if self.condition else None
        training_target = self.conditioned or self.target_sampler
        self.num_classes = NUM_CLASSES[target] if self.condition == "class" else 0
        # what this target can attach: its class where it has classes, and each continuous condition whose
        # number of classes (if it is computed from the class) is the target's
        classes = NUM_CLASSES.get(target, 0)
        continuous = [name for name in CONTINUOUS_CONDITIONS if NEEDS_LABELS.get(name, classes) == classes]
        self.conditions_available = (*(["class"] if classes else []), *continuous)
        self.source_sampler = get_distribution(source, "data.source")
        if batch_size < 1 or batches_per_epoch < 1 or num_eval_samples < 2:
            raise UserError(
                f"data.batch_size={batch_size}, data.batches_per_epoch={batches_per_epoch} and "
                f"data.num_eval_samples={num_eval_samples} must be positive (at least 2 evaluation samples)"
            )
        if tuple(shape) != (2,):
            raise UserError(f"data.shape={list(shape)} is invalid for 2D data; it must be [2]")
        self.target, self.source = target, source
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.num_eval_samples, self.num_workers, self.seed = num_eval_samples, num_workers, seed
        loader_workers(num_workers, IndependentCoupling())  # a bad value fails here, not when training starts
        self.data_shape: tuple[int, ...] = (2,)
        self._stream = PairStream(self.source_sampler, training_target, batch_size, batches_per_epoch, seed,
                                  coupling_group)  # fmt: skip

    def held_out(self, n: int | None = None, index: int = 0) -> Tensor:
        """A fixed set of `n` data samples per (dataset, seed, index), never seen in training."""
        return self.target_sampler(n or self.num_eval_samples, seeded_generator(self.seed, "held_out", index))

    def held_out_conditions(self, n: int | None = None, index: int = 0) -> Tensor:
        """The condition of each point of `held_out(n, index)` (the same draw): what a conditional model is asked to
        generate when it is compared with that set."""
        if self.conditioned is None:
            raise UserError(f"data={self.name} was built without a condition; it has no held-out conditions")
        return self.conditioned(n or self.num_eval_samples, seeded_generator(self.seed, "held_out", index))[1]

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        """Fixed batches of source samples x0 from which evaluation generates, one per (`draw`, `chunk`)."""
        g = seeded_generator(self.seed, "eval_source", draw, chunk)
        return self.source_sampler(n or self.num_eval_samples, g)

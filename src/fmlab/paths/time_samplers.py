"""Training-time distributions p(t) on a path's training range [t_min, t_max] (`time_sampler=`; the path's
`train_t_min`, `train_t_max`), and the density-ratio loss weight.

Each sampler draws u from its distribution on (0, 1) (or, for the noise-level samplers, through the path) and maps it
to t = t_min + (t_max − t_min) u, so every t stays inside the path's range. `log_density` is that of t, which
`loss_weight: density_ratio` uses to reweight a sample by p_uniform(t)/p(t) = 1/((t_max − t_min) p(t)): the
expected loss is then the uniform-time loss whatever the sampler (importance sampling), as ScoreFlow does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fmlab.errors import UserError, choices_error
from fmlab.paths.path import AffinePath, bisect_increasing

LOSS_WEIGHTS = ("none", "density_ratio")


class TimeSampler(ABC):
    """t ~ p(t) on [t_min, t_max]; `loss_weight="density_ratio"` weights each sample by 1/((t_max − t_min) p(t))."""

    def __init__(self, loss_weight: str = "none") -> None:
        if loss_weight not in LOSS_WEIGHTS:
            raise choices_error("time_sampler.loss_weight", loss_weight, LOSS_WEIGHTS)
        self.loss_weight = loss_weight

    @abstractmethod
    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        """u ∈ [0, 1] in float64, t = t_min + (t_max − t_min) u."""

    @abstractmethod
    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        """log of the density of u on [0, 1]."""

    # how many draws `check` looks at, and when it calls the distribution degenerate
    CHECK_DRAWS = 8192
    MOST_AT_AN_END = 0.5  # of the draws within 1e-6 of t_min or t_max
    WEIGHT_MEAN_RANGE = (0.1, 10.0)  # E_p[p_uniform/p] = 1
    MIN_EFFECTIVE_FRACTION = 1e-3  # (Σw)²/(n Σw²) of the density-ratio weights

    def check(self, path: AffinePath) -> None:
        """One line for a distribution that makes training degenerate on this path, before any step: a setting
        that is not a finite number, most draws piled at an end of [t_min, t_max] (e.g. noise levels beyond the
        path's range, all clipped to t_min), or density-ratio weights that are not finite or carry the loss on a
        handful of draws (their mean must be near E_p[p_uniform/p] = 1)."""
        name = f"time_sampler={type(self).__name__}({self._settings()})"
        for key, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"time_sampler.{key}={value} is invalid; it must be a finite number")
        with torch.random.fork_rng():  # a check leaves the run's random streams as they were
            torch.manual_seed(0)
            t = self.sample(path, self.CHECK_DRAWS, dtype=torch.float64)
        low, high = path.train_t_min, path.train_t_max
        at_ends = float(((t - low <= 1e-6 * (high - low)) | (high - t <= 1e-6 * (high - low))).double().mean())
        if not self.piles_at_ends_by_design and at_ends > self.MOST_AT_AN_END:
            raise UserError(
                f"{name} puts {at_ends:.0%} of training times at an end of {path!r}'s [t_min, t_max] (settings beyond "
                "the path's range are clipped there); choose settings inside it"
            )
        weights = self.weights(path, t)
        if weights is None:
            return
        mean = float(weights.mean())
        effective = float(weights.sum() ** 2 / (len(weights) * weights.pow(2).sum())) if math.isfinite(mean) else 0.0
        low, high = self.WEIGHT_MEAN_RANGE
        if not (low <= mean <= high and effective >= self.MIN_EFFECTIVE_FRACTION):
            raise UserError(
                f"{name} with loss_weight=density_ratio gives degenerate loss weights on {path!r} (mean {mean:.3g}, "
                f"should be near 1; {effective:.2%} effective draws): choose a distribution that covers the path, "
                "or loss_weight=none"
            )

    piles_at_ends_by_design = False

    def sample(self, path: AffinePath, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None):
        u = self.sample_unit(path, n).clamp(0.0, 1.0)
        t = path.train_t_min + (path.train_t_max - path.train_t_min) * u
        return t.to(device=device, dtype=dtype or torch.get_default_dtype())

    def log_density(self, path: AffinePath, t: Tensor) -> Tensor:
        """log p(t) on [t_min, t_max]."""
        width = path.train_t_max - path.train_t_min
        return self.unit_log_density(path, (t.double() - path.train_t_min) / width) - math.log(width)

    def weights(self, path: AffinePath, t: Tensor) -> Tensor | None:
        """Per-sample loss weights: None, or the density ratio to the uniform time distribution."""
        if self.loss_weight == "none":
            return None
        width = path.train_t_max - path.train_t_min
        return torch.exp(-self.log_density(path, t) - math.log(width)).to(t.dtype)

    def __repr__(self) -> str:
        weight = f", loss_weight={self.loss_weight}" if self.loss_weight != "none" else ""
        return f"{type(self).__name__}({self._settings()}{weight})"

    def _settings(self) -> str:
        return ""


class UniformTime(TimeSampler):
    """t ~ U[t_min, t_max]: the papers' default."""

    def sample(self, path: AffinePath, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None):
        return path.sample_time(n, device=device, dtype=dtype)  # the draws fmlab always made: runs stay as they were

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        return torch.rand(n, dtype=torch.float64)

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        return torch.zeros_like(u)


class LogitNormalTime(TimeSampler):
    """u = sigmoid(m + s z), z ~ N(0, 1) (Esser et al. 2024, SD3 §3.1, "logit-normal sampling"):
    π(u) = exp(−(logit u − m)²/(2s²)) / (s √(2π) u (1 − u))."""

    def __init__(self, m: float = 0.0, s: float = 1.0, loss_weight: str = "none") -> None:
        super().__init__(loss_weight)
        if s <= 0:
            raise UserError(f"time_sampler.s={s} must be > 0")
        self.m, self.s = float(m), float(s)

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        return torch.sigmoid(self.m + self.s * torch.randn(n, dtype=torch.float64))

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        logit = torch.log(u) - torch.log1p(-u)
        return (
            -0.5 * ((logit - self.m) / self.s) ** 2 - math.log(self.s * math.sqrt(2 * math.pi)) - torch.log(u * (1 - u))
        )

    def _settings(self) -> str:
        return f"m={self.m}, s={self.s}"


def mode_map(v: Tensor, scale: float) -> Tensor:
    """SD3's "mode sampling with heavy tails" (Esser et al. 2024, eq. 20) as a map from v ~ U(0, 1):
    f(v) = 1 − v − scale (cos²(π v / 2) − 1 + v), written for t growing towards the data (u = 1 − f)."""
    return 1 - v - scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)


class ModeTime(TimeSampler):
    """u = 1 − f_mode(v), v ~ U(0, 1), f_mode of SD3 (eq. 20); `scale` in [−1, 2/(π − 2)] keeps f monotone
    (scale > 0 puts more mass at mid times, < 0 at the ends). The density is 1/|f′(v)| at v = f⁻¹(1 − u)."""

    def __init__(self, scale: float = 1.29, loss_weight: str = "none") -> None:
        super().__init__(loss_weight)
        if not -1.0 <= scale <= 2 / (math.pi - 2):
            raise UserError(f"time_sampler.scale={scale} must lie in [-1, {2 / (math.pi - 2):.4f}] (f stays monotone)")
        self.scale = float(scale)

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        return 1 - mode_map(torch.rand(n, dtype=torch.float64), self.scale)

    def _inverse(self, u: Tensor) -> Tensor:
        """v with 1 − f(v) = u (f decreases)."""
        return bisect_increasing(lambda v: 1 - mode_map(v, self.scale), u, 0.0, 1.0)

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        v = self._inverse(u.double())
        derivative = -1 - self.scale * (-math.pi / 2 * torch.sin(math.pi * v) + 1)  # f′(v)
        return -torch.log(derivative.abs())

    def _settings(self) -> str:
        return f"scale={self.scale}"


class UShapedTime(TimeSampler):
    """π(u) ∝ cosh(a (u − ½)) on [0, 1]: more weight near both ends (the U-shaped distribution of Lee et al. 2024,
    "Improving the training of rectified flows"); sampled by inverting its CDF
    F(u) = (sinh(a (u − ½)) + sinh(a/2)) / (2 sinh(a/2))."""

    def __init__(self, a: float = 4.0, loss_weight: str = "none") -> None:
        super().__init__(loss_weight)
        if a <= 0:
            raise UserError(f"time_sampler.a={a} must be > 0")
        self.a = float(a)

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        half = math.sinh(self.a / 2)
        w = torch.rand(n, dtype=torch.float64)
        return 0.5 + torch.asinh((2 * w - 1) * half) / self.a

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        normaliser = 2 * math.sinh(self.a / 2) / self.a
        return torch.log(torch.cosh(self.a * (u - 0.5))) - math.log(normaliser)

    def _settings(self) -> str:
        return f"a={self.a}"


class LogNormalSigmaTime(TimeSampler):
    """EDM's training noise levels (Karras et al. 2022, Table 1): ln σ̃ ~ N(P_mean, P_std²) for the noise ratio
    σ̃ = σ_t/α_t of this path, mapped to t with σ̃(t) = σ̃ (clipped to the path's range [σ̃(t_max), σ̃(t_min)])."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, loss_weight: str = "none") -> None:
        super().__init__(loss_weight)
        if p_std <= 0:
            raise UserError(f"time_sampler.p_std={p_std} must be > 0")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        log_ratio = self.p_mean + self.p_std * torch.randn(n, dtype=torch.float64)
        t = path.time_of_log_snr(-2 * log_ratio)
        return (t - path.train_t_min) / (path.train_t_max - path.train_t_min)

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        """p(t) = N(log σ̃(t); P_mean, P_std²) |d log σ̃/dt| (by a central difference), in u."""
        width = path.train_t_max - path.train_t_min
        t = path.train_t_min + width * u.double()
        h = 1e-6 * width

        def log_ratio(s: Tensor) -> Tensor:  # log σ̃(s) = −½ log SNR(s)
            return -0.5 * path.log_snr(s)

        after, before = (t + h).clamp(max=path.train_t_max), (t - h).clamp(min=path.train_t_min)
        slope = (log_ratio(after) - log_ratio(before)) / (after - before)
        z = (log_ratio(t) - self.p_mean) / self.p_std
        return -0.5 * z**2 - math.log(self.p_std * math.sqrt(2 * math.pi)) + torch.log(slope.abs()) + math.log(width)

    def _settings(self) -> str:
        return f"p_mean={self.p_mean}, p_std={self.p_std}"


class LogSNRUniformTime(TimeSampler):
    """log SNR(t) ~ U[log SNR(t_min), log SNR(t_max)]: density p(t) = (g²/σ²)(t) / Z with Z = log SNR(t_max) −
    log SNR(t_min). ScoreFlow (Song et al. 2021b) samples so, with `loss_weight: density_ratio`, which makes the
    likelihood weight g² constant (σ² Z/(t_max − t_min)) and the estimate far lower in variance."""

    def _bounds(self, path: AffinePath) -> tuple[float, float]:
        ends = torch.tensor([path.train_t_min, path.train_t_max], dtype=torch.float64)
        low, high = path.log_snr(ends).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"time_sampler=log_snr_uniform needs a finite log-SNR on [t_min, t_max]; {path!r} has none")
        return low, high

    TABLE_SIZE = 4097

    def __init__(self, loss_weight: str = "none") -> None:
        super().__init__(loss_weight)
        self._tables: dict[int, tuple[AffinePath, Tensor]] = {}

    def _inverse_table(self, path: AffinePath) -> Tensor:
        """t at 4,097 equally spaced log-SNR values, found once per path by bisection (then interpolated)."""
        cached = self._tables.get(id(path))
        if cached is not None and cached[0] is path:
            return cached[1]
        low, high = self._bounds(path)
        targets = torch.linspace(low, high, self.TABLE_SIZE, dtype=torch.float64)
        table = path.time_of_log_snr(targets)
        table[0], table[-1] = path.train_t_min, path.train_t_max
        self._tables[id(path)] = (path, table)
        return table

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        table = self._inverse_table(path)
        position = torch.rand(n, dtype=torch.float64) * (self.TABLE_SIZE - 1)
        index = position.floor().long().clamp(max=self.TABLE_SIZE - 2)
        t = torch.lerp(table[index], table[index + 1], position - index)
        return (t - path.train_t_min) / (path.train_t_max - path.train_t_min)

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        low, high = self._bounds(path)
        width = path.train_t_max - path.train_t_min
        t = path.train_t_min + width * u.double()
        g2_over_sigma2 = path.diffusion_squared(t) / path.schedule.sigma(t) ** 2
        return torch.log(g2_over_sigma2) - math.log(high - low) + math.log(width)


class GridTime(TimeSampler):
    """t uniform on the k-step grid {t_min + (t_max − t_min) i/k : i = 0..k−1}: the times a k-step Euler sampler
    visits. Training a reflowed model on its own pairs at these times only is the k-step distillation of Liu et al.
    2023 (gnobitab/RectifiedFlow, `reflow_t_schedule` = k; k = 1: t = t_min alone, their "t0"). A discrete
    distribution: it has no density, so no density-ratio weight."""

    piles_at_ends_by_design = True  # k = 1 trains at t_min alone: the 1-step distillation

    def __init__(self, k: int = 1, loss_weight: str = "none") -> None:
        super().__init__(loss_weight)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"time_sampler.k={k!r} is invalid; it must be a whole number of steps >= 1")
        if loss_weight != "none":
            raise UserError("time_sampler=grid has no density, so time_sampler.loss_weight must be none")
        self.k = k

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        return torch.randint(0, self.k, (n,), dtype=torch.float64) / self.k

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        raise UserError("time_sampler=grid is discrete: it has no density")

    def _settings(self) -> str:
        return f"k={self.k}"


def meanflow_to_flow_times(t: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """MeanFlow's clock to fmlab's, the one place they meet. Geng et al. 2025 write z_t = (1 − t) x + t ε (t = 1
    is noise) and the average velocity u(z_t, r, t) over [r, t], r ≤ t; fmlab writes x_s = s x1 + (1 − s) x0
    (s = 1 is data). So s = 1 − t is where an interval starts (the noisier end) and e = 1 − r ≥ s where it ends,
    and fmlab's average velocity ū(x_s, s, e) = (1/(e − s)) ∫_s^e v dτ is −u: one jump x_e = x_s + (e − s) ū."""
    return 1.0 - t, 1.0 - r


class MeanFlowTimes(TimeSampler):
    """Intervals [s, e] for MeanFlow's training (Geng et al. 2025, §4.3): in MeanFlow's clock t, r ~ logit-normal
    (P_mean, P_std) independently (`p_mean_r`, `p_std_r` for r where they differ, as py-meanflow's CIFAR-10
    defaults do), (t, r) ← (max, min), then r ← t with probability 1 − `ratio` (the paper's best: 25% of pairs with
    r ≠ t; with r = t the MeanFlow loss is flow matching's), mapped to fmlab's [s, e] by `meanflow_to_flow_times`
    and onto the path's training range. `sample` returns (n, 2): s, then e. Not a density on t: no density-ratio
    weight (MeanFlow weighs its loss adaptively, `MeanFlowObjective`)."""

    def __init__(self, p_mean: float = -0.4, p_std: float = 1.0, ratio: float = 0.25, p_mean_r: float | None = None,
                 p_std_r: float | None = None, loss_weight: str = "none") -> None:  # fmt: skip
        super().__init__(loss_weight)
        if loss_weight != "none":
            raise UserError("time_sampler=mean_flow draws intervals, not a density on t: loss_weight must be none")
        if not p_std > 0 or (p_std_r is not None and not p_std_r > 0) or not 0 <= ratio <= 1:
            raise UserError(f"time_sampler.p_std={p_std} (and p_std_r) must be > 0 and ratio={ratio} in [0, 1]")
        self.p_mean, self.p_std, self.ratio = float(p_mean), float(p_std), float(ratio)
        self.p_mean_r = float(p_mean if p_mean_r is None else p_mean_r)
        self.p_std_r = float(p_std if p_std_r is None else p_std_r)

    def sample(self, path: AffinePath, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None):
        t = torch.sigmoid(self.p_mean + self.p_std * torch.randn(n, dtype=torch.float64))
        r = torch.sigmoid(self.p_mean_r + self.p_std_r * torch.randn(n, dtype=torch.float64))
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        r = torch.where(torch.rand(n, dtype=torch.float64) < 1 - self.ratio, t, r)
        start, end = meanflow_to_flow_times(t, r)
        width = path.train_t_max - path.train_t_min
        times = torch.stack([start, end], dim=1).clamp(0.0, 1.0) * width + path.train_t_min
        return times.to(device=device, dtype=dtype or torch.get_default_dtype())

    def sample_unit(self, path: AffinePath, n: int) -> Tensor:
        return (self.sample(path, n, dtype=torch.float64)[:, 0] - path.train_t_min) / (
            path.train_t_max - path.train_t_min
        )

    def unit_log_density(self, path: AffinePath, u: Tensor) -> Tensor:
        raise UserError("time_sampler=mean_flow draws intervals: it has no density on t")

    def _settings(self) -> str:
        return f"p_mean={self.p_mean}, p_std={self.p_std}, ratio={self.ratio}"

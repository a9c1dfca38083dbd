"""The exact marginal field of an affine Gaussian path when the data are K fixed points: the test oracle."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmlab.paths.path import AffinePath


class MarginalOracle(nn.Module):
    """Data p1 = Σ_k w_k δ(x1_k). By the marginalization trick (seed 001, eq. (11); seed 002) the marginal field is

        u_t(x) = Σ_k u_t(x | x1_k) p_t(x | x1_k) w_k / Σ_k p_t(x | x1_k) w_k,

    with p_t(x | x1_k) = N(α_t x1_k, σ_t² I) and u_t(x | x1_k) = (σ̇/σ)(x − α x1_k) + α̇ x1_k (Theorem 10). The
    marginal score is Σ_k r_k (−(x − α x1_k)/σ²) with the same posterior weights r_k. `forward` is the velocity, so
    the oracle can stand in for a trained velocity net; `score` and `epsilon` give the other parameterisations.

    With `point_labels` (the class of each point) it is also the exact class-conditional field: given `labels`, row
    i's mixture keeps only the points of class labels[i] (p1(x | y) = the data restricted to class y); the null
    class K = `num_classes` (or no labels) is the unconditional field. It then stands in for a class-conditional
    net trained with label dropout.
    """

    def __init__(self, path: AffinePath, points: Tensor, weights: Tensor | None = None,
                 point_labels: Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.path = path
        self.register_buffer("points", points.flatten(1))
        weights = torch.full((len(points),), 1.0 / len(points), dtype=points.dtype) if weights is None else weights
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.num_classes = 0 if point_labels is None else int(point_labels.max()) + 1
        self.register_buffer("point_labels", point_labels.long() if point_labels is not None else None)

    def _log_weights(self, labels: Tensor | None, batch: int) -> Tensor:
        """(B, K) log prior weights of the points for each row: −∞ off the row's class."""
        log_weights = self.log_weights[None].expand(batch, -1)
        if labels is None or self.point_labels is None:
            return log_weights
        keep = (self.point_labels[None] == labels[:, None]) | (labels[:, None] == self.num_classes)
        return log_weights.masked_fill(~keep, float("-inf"))

    def _posterior(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, ...]:
        t = t.to(x.dtype).expand(x.shape[0]).reshape(-1, 1, 1)
        s = self.path.schedule
        alpha, sigma = s.alpha(t), s.sigma(t)
        residual = x.flatten(1)[:, None, :] - alpha * self.points[None]  # (B, K, d): x − α_t x1_k
        log_r = -0.5 * residual.pow(2).sum(-1) / sigma[..., 0] ** 2 + self._log_weights(labels, x.shape[0])
        return torch.softmax(log_r, dim=1)[..., None], residual, sigma, s.d_sigma(t), s.d_alpha(t)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        r, residual, sigma, d_sigma, d_alpha = self._posterior(t, x, labels)
        conditional = d_sigma / sigma * residual + d_alpha * self.points[None]
        return (r * conditional).sum(1).reshape(x.shape)

    def score(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        r, residual, sigma, _, _ = self._posterior(t, x, labels)
        return (r * (-residual / sigma**2)).sum(1).reshape(x.shape)

    def epsilon(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[ε | x_t = x] = −σ_t ∇ log p_t(x)."""
        sigma = self.path.schedule.sigma(t.to(x.dtype).expand(x.shape[0])).reshape(-1, *([1] * (x.dim() - 1)))
        return -sigma * self.score(t, x, labels)

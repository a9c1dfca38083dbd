"""What a condition is, in one place: its kinds, its null value, how data computes it, how nets embed it, how
evaluation asks for it, and the one check that a run's parts can all carry the condition it asks for.

Kinds (`KINDS`):
- `none`: an unconditional run; nothing rides with the batches.
- `class`: a class index y ∈ {0..K−1} per data point (conditioning=class); the null condition ∅ is the index K.
- `continuous`: a vector c ∈ R^k computed from each data point (`CONTINUOUS_CONDITIONS`: its x or y coordinate, or
  its class as ±1, C²OT's conditions; conditioning=continuous|x); ∅ is a NaN row.

A batch carries the condition as its third tensor, (x0, x1, labels): long for classes, float (batch, k) for
continuous values. Training replaces it by ∅ with probability p_uncond (`drop_to_null`, classifier-free guidance's
dropout, Ho & Salimans 2022), nets add its embedding (`ClassEmbedding`, `ConditionEmbedding`, `condition_input`),
evaluation asks each generated row for one (`asked_conditions`). Each part declares what it can carry
(`conditions_available` and `condition` of a datamodule, `condition_kinds` of a net, `condition_kinds` of a coupling
that needs one) and `check_parts` compares them with what the run asks, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fmlab.errors import UserError, choices_error

KINDS = ("none", "class", "continuous")

# continuous conditions of a 2D point: a function of the point and its class (None where the data has no classes)
CONTINUOUS_CONDITIONS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "x": lambda points, labels: points[:, :1],  # C²OT's x-conditional moons: the point's first coordinate
    "y": lambda points, labels: points[:, 1:2],
    "class_sign": lambda points, labels: (2.0 * labels - 1.0)[:, None],  # C²OT's class condition: ±1, two classes
}
# the continuous conditions computed from a point's class, and the number of classes they need
NEEDS_LABELS = {"class_sign": 2}


def kind_of(name: str | None) -> str:
    """The kind of the condition called `name` (None or "none": unconditional)."""
    if name in (None, "none"):
        return "none"
    if name == "class":
        return "class"
    if name in CONTINUOUS_CONDITIONS:
        return "continuous"
    raise choices_error("conditioning.condition", name, ["class", *CONTINUOUS_CONDITIONS])


@dataclass(frozen=True)
class Conditioning:
    """What a run asks for (its `conditioning` group): the condition's `name` and `kind`, K classes or k numbers,
    the dropout probability to ∅, and what evaluation asks each sample for."""

    name: str = "none"
    num_classes: int = 0
    condition_dim: int = 0
    p_uncond: float = 0.0
    eval_labels: str | list[int] = "uniform"

    @property
    def kind(self) -> str:
        return kind_of(self.name)

    @classmethod
    def from_config(cls, node: Any) -> Conditioning:
        node = node or {}
        name = node.get("condition") or ("class" if node.get("labels") else "none")
        return cls(name=str(name), num_classes=int(node.get("num_classes") or 0),
                   condition_dim=int(node.get("condition_dim") or 0), p_uncond=float(node.get("p_uncond") or 0.0),
                   eval_labels=node.get("eval_labels", "uniform"))  # fmt: skip

    @property
    def setting(self) -> str:
        """How a user writes this choice on the command line."""
        if self.kind == "continuous":
            if self.name == "x":
                return "conditioning=x"
            return f"conditioning=continuous conditioning.condition={self.name}"
        return f"conditioning={self.name}"


def null_condition(labels: Tensor, num_classes: int) -> Tensor:
    """∅ for every row of `labels`: the index K of a K-class condition, NaN rows for a continuous one."""
    if labels.is_floating_point():
        return torch.full_like(labels, float("nan"))
    return torch.full_like(labels, num_classes)


def drop_to_null(labels: Tensor, p_uncond: float, num_classes: int = 0) -> Tensor:
    """Classifier-free guidance's condition dropout: each row's condition becomes ∅ (`null_condition`: the class
    index K = `num_classes`, or NaN for a continuous condition, all of a row's values at once) with probability
    `p_uncond`, independently."""
    if p_uncond == 0.0:
        return labels
    dropped = torch.rand(labels.shape[:1], device=labels.device) < p_uncond
    dropped = dropped.reshape(-1, *([1] * (labels.dim() - 1)))
    return torch.where(dropped, null_condition(labels, num_classes), labels)


# ---- how nets receive a condition -------------------------------------------------------------------------------
class ClassEmbedding(torch.nn.Embedding):
    """A learned vector per class plus one for the null class ∅ (index `num_classes`), the "no label" input of
    classifier-free guidance (Ho & Salimans 2022): one net is then both p(x | y) and p(x)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 for a class embedding")
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes
        torch.nn.init.normal_(self.weight, std=dim**-0.5)

    @property
    def null(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor | None, batch: int | None = None) -> Tensor:  # type: ignore[override]
        """The embedding of `labels` (a long tensor of class indices, `null` for ∅); None: ∅ for a whole batch."""
        if labels is None:
            labels = torch.full((batch or 1,), self.null, dtype=torch.long, device=self.weight.device)
        return super().forward(labels)


class ConditionEmbedding(torch.nn.Module):
    """A continuous condition c ∈ R^k (an x-coordinate, say) as the vector W c + b, and a learned vector for the
    null condition ∅: rows that hold NaN, or no conditions at all. Classifier-free guidance's "no condition" for
    continuous conditions, as `ClassEmbedding`'s null class is for classes."""

    def __init__(self, condition_dim: int, dim: int) -> None:
        super().__init__()
        if condition_dim < 1:
            raise ValueError(f"condition_dim={condition_dim} must be >= 1 for a condition embedding")
        self.condition_dim = condition_dim
        self.linear = torch.nn.Linear(condition_dim, dim)
        self.null = torch.nn.Parameter(torch.randn(dim) * dim**-0.5)

    def forward(self, conditions: Tensor | None, batch: int | None = None) -> Tensor:
        """(batch, dim): the embedding of each row's condition, ∅'s for NaN rows (and for every row without any)."""
        if conditions is None:
            return self.null.expand(batch or 1, -1)
        conditions = conditions.reshape(len(conditions), -1).to(self.linear.weight.dtype)
        missing = torch.isnan(conditions).any(1, keepdim=True)
        embedded = self.linear(torch.nan_to_num(conditions))
        return torch.where(missing, self.null.expand_as(embedded), embedded)


def condition_input(num_classes: int, condition_dim: int, dim: int) -> torch.nn.Module | None:
    """The embedding of a net's condition: a class table (`num_classes` > 0), a continuous one (`condition_dim`
    > 0), or None for an unconditional net."""
    if num_classes and condition_dim:
        raise UserError(f"net.num_classes={num_classes} and net.condition_dim={condition_dim}: a net takes one kind")
    if num_classes:
        return ClassEmbedding(num_classes, dim)
    return ConditionEmbedding(condition_dim, dim) if condition_dim else None


def net_kind(net: Any) -> str:
    """The kind of condition a built net reads: class (num_classes > 0), continuous (condition_dim > 0) or none."""
    if getattr(net, "num_classes", 0):
        return "class"
    return "continuous" if getattr(net, "condition_dim", 0) else "none"


# ---- how evaluation asks for conditions -------------------------------------------------------------------------
LABEL_CHOICES = ("uniform", "data", "a list of class indices")


def class_labels(labels: str | Sequence[int], num_classes: int, start: int, size: int) -> Tensor:
    """The classes asked of generated rows start .. start + size − 1: `uniform` cycles through 0..K−1 by row index
    (every class equally often, each row's class fixed whatever the chunking or the number of processes); a list
    cycles through its entries the same way."""
    rows = torch.arange(start, start + size)
    if isinstance(labels, str):
        if labels != "uniform":
            raise choices_error("eval.labels", labels, ("uniform", "a list of class indices"))
        return rows % num_classes
    chosen = torch.as_tensor(list(labels), dtype=torch.long)
    if chosen.numel() == 0 or bool((chosen < 0).any()) or bool((chosen >= num_classes).any()):
        raise UserError(f"eval.labels={list(labels)} must list class indices in 0..{num_classes - 1}")
    return chosen[rows % len(chosen)]


def asked_conditions(labels: str | list[int], field: Any, datamodule: Any, num_samples: int, start: int,
                     size: int) -> Tensor | None:  # fmt: skip
    """What generated rows start .. start + size − 1 are conditioned on: nothing for an unconditional field; with
    `labels="data"` the condition of the same row of the held-out set the samples are compared with (its class, or
    its continuous condition: C²OT's protocol); else the classes `class_labels` asks."""
    if not field.is_conditional:
        return None
    if labels == "data":
        return datamodule.held_out_conditions(num_samples)[start : start + size]
    return class_labels(labels, field.num_classes, start, size)


# ---- the one check: every part can carry what the run asks --------------------------------------------------------
def _listed(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def check_parts(asked: Conditioning, datamodule: Any, net: Any, coupling: Any, data_name: str, net_name: str,
                coupling_name: str) -> None:  # fmt: skip
    """One line naming both keys when a part cannot mean what the run's conditioning says: the data must attach the
    asked condition to its batches (`datamodule.condition`; `conditions_available` lists what it could), the net
    must read that kind (`net_kind`; `condition_kinds` lists what it can), and a coupling that pairs by condition
    (`condition_kinds` of the coupling) must get a kind it uses."""
    attached = getattr(datamodule, "condition", None) or "none"
    available = tuple(getattr(datamodule, "conditions_available", ()))
    if asked.kind != "none" and (attached != asked.name or asked.name not in available):
        raise UserError(
            f"{asked.setting} needs data that attach the {asked.name} condition to each point; {data_name} "
            f"provides: {_listed(available)}{' (conditioning=' + available[0] + ')' if available else ''}"
        )
    if asked.kind == "none" and attached != "none":
        raise UserError(f"{data_name} attaches a {attached} condition but conditioning=none trains without one")
    read = net_kind(net)
    if read != asked.kind:
        can = tuple(getattr(type(net), "condition_kinds", ()))
        if asked.kind != "none" and asked.kind not in can:
            raise UserError(
                f"{asked.setting} needs a net that reads a {asked.kind} condition; {net_name} reads: {_listed(can)}"
            )
        raise UserError(
            f"{asked.setting} asks a {asked.kind} condition but {net_name} was built to read {read} "
            "(net.num_classes / net.condition_dim come from the conditioning group: leave them unset)"
        )
    needs = tuple(getattr(coupling, "condition_kinds", ()) or ())
    if needs and asked.kind not in needs:
        raise UserError(
            f"{coupling_name} pairs by condition and needs a {' or '.join(needs)} condition; {asked.setting} "
            f"gives {'none' if asked.kind == 'none' else 'a ' + asked.kind + ' one'}"
        )

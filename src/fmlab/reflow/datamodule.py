"""The datamodule of a reflow run: the teacher's stored pairs as training batches, the run's own data for evaluation.

`ReflowDataModule` wraps the datamodule the run's `data` config builds: evaluation (held-out sets, evaluation noise,
FID references) reads that one, so a student is measured exactly like its teacher; training batches are stored
pairs (x0, ODE_teacher(x0)), generated at `setup` when missing (`fmlab.reflow.pairs`, spread over the ranks) and
shuffled per epoch with a seeded permutation, so a resumed run draws exactly the batches of an unbroken one. The
teacher (its velocity field, step and run dir) is loaded once, by whoever builds the run, and handed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fmlab.data.streams import PairStream, PairStreamDataModule
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.objectives import VelocityField
from fmlab.reflow.coupling import ReflowCoupling
from fmlab.reflow.pairs import generate_pairs, load_pairs
from fmlab.seeding import seeded_generator


@dataclass
class Teacher:
    """What a reflow run takes from its teacher: the net (EMA weights when asked for), its PF-ODE drift, the step it
    was saved at and its data's shape."""

    net: nn.Module
    field: VelocityField
    step: int
    data_shape: tuple[int, ...]


class StoredPairStream(PairStream):
    """Batches of stored (x0, x1) pairs: epoch e is a permutation of the pairs seeded by (seed, rank, e), cut into
    batches (the last partial one dropped); batch i is a pure function of (seed, rank, i)."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__(None, None, batch_size, 1, seed)  # type: ignore[arg-type]
        self.x0: Tensor | None = None
        self.x1: Tensor | None = None

    def set_pairs(self, x0: Tensor, x1: Tensor) -> None:
        if len(x0) < self.batch_size:
            raise UserError(f"coupling.num_pairs={len(x0)} is fewer than one batch (data.batch_size={self.batch_size})")
        self.x0, self.x1 = x0, x1
        self.batches_per_epoch = len(x0) // self.batch_size

    def draw(self, index: int) -> tuple[Tensor, Tensor]:
        assert self.x0 is not None and self.x1 is not None, "setup() loads the pairs first"
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.x0), generator=seeded_generator(self.seed, "reflow_train", self.rank, epoch))
        rows = order[position * self.batch_size : (position + 1) * self.batch_size]
        return self.x0[rows], self.x1[rows]


def init_student(net: nn.Module, teacher: Teacher, reflow: ReflowCoupling) -> None:
    """Start the student net from the teacher's weights (the same architecture is required)."""
    try:
        net.load_state_dict(teacher.net.state_dict())
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(
            f"coupling.init_from_teacher=true needs the teacher's net ({reflow.teacher}); this run's differs: "
            f"{first}. Use the teacher's net settings, or coupling.init_from_teacher=false"
        ) from None


class ReflowDataModule(PairStreamDataModule):
    """Training batches from the reflow pairs of `reflow` (the run's coupling, which passes them through), made by
    `teacher`; evaluation from `inner` (the run's own data), member by member of `EvaluationData`."""

    def __init__(self, inner: Any, reflow: ReflowCoupling, teacher: Teacher, batch_size: int, seed: int) -> None:
        super().__init__()
        if tuple(teacher.data_shape) != tuple(inner.data_shape):
            raise UserError(
                f"coupling.teacher={reflow.teacher} was trained on data shaped {list(teacher.data_shape)}; this run's "
                f"data={inner.name} is shaped {list(inner.data_shape)}: a student learns its teacher's data"
            )
        self.inner, self.reflow, self.teacher = inner, reflow, teacher
        self.batch_size, self.seed, self.num_workers = batch_size, seed, 0
        self._stream = StoredPairStream(batch_size, seed)
        self._stream.coupling = reflow
        self.generation: dict[str, float] = {}

    # EvaluationData: the run's own data
    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def target(self) -> str:
        return self.inner.target

    @property
    def source(self) -> str:
        return self.inner.source

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.inner.data_shape

    @property
    def is_image(self) -> bool:  # type: ignore[override]
        return self.inner.is_image

    @property
    def variant(self) -> str:  # type: ignore[override]
        return self.inner.variant

    @property
    def num_levels(self) -> int:  # type: ignore[override]
        return self.inner.num_levels

    @property
    def fid_feature(self) -> str | None:  # type: ignore[override]
        return self.inner.fid_feature

    def held_out(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.inner.held_out(*args, **kwargs)

    def eval_source(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.inner.eval_source(*args, **kwargs)

    def reference_images(self) -> Tensor:
        return self.inner.reference_images()

    def setup(self, stage: str | None = None) -> None:
        """Generate the missing pairs on every rank (chunks spread over them), wait for all, then load them all."""
        if self._stream.x0 is not None:
            return
        ranks = Ranks.of_trainer(self.trainer) if self.trainer is not None else Ranks()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        started = time.perf_counter()
        field = self.teacher.field.to(device)
        manifest = {"teacher": str(self.reflow.teacher), "teacher_step": self.teacher.step, "ema": self.reflow.use_ema}
        made = generate_pairs(field, self.inner, self.reflow.solver, self.reflow.num_pairs, self.reflow.batch_size,
                              self.reflow.pairs_dir, ranks, manifest)  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        x0, x1 = load_pairs(self.reflow.pairs_dir, self.inner, record=ranks.rank == 0)
        field.to("cpu")
        self._stream.set_pairs(x0, x1)
        self.batches_per_epoch = self._stream.batches_per_epoch
        self.generation = {
            "pair_generation_seconds": time.perf_counter() - started,
            "pair_chunks_made": made["pair_chunks_made"],
            "num_pairs": len(x0),
        }

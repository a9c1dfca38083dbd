"""The datamodule of a reflow run: the teacher's stored pairs as training batches, the run's own data for evaluation.

`ReflowDataModule` wraps the datamodule the run's `data` config builds: evaluation (held-out sets, evaluation noise,
FID references) reads that one, so a student is measured exactly like its teacher; training batches are stored
pairs (x0, ODE_teacher(x0)), generated at `setup` when missing (`fmlab.evaluation.reflow_pairs`, spread over the
ranks) and shuffled per epoch with a seeded permutation, so a resumed run draws exactly the batches of an unbroken one.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from fmlab.data.toy2d import PairStream, PairStreamDataModule
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.paths.couplings import ReflowCoupling
from fmlab.seeding import seeded_generator

# what evaluation reads from a datamodule: taken from the run's own data
EVALUATION_ATTRIBUTES = (
    "held_out", "eval_source", "source", "data_shape", "num_levels", "fid_feature", "reference_images", "seed",
    "num_eval_samples", "target",
)  # fmt: skip


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


def load_teacher(coupling: ReflowCoupling):
    """The teacher run (`fmlab.runs.LoadedRun`), with its EMA weights when asked for."""
    from fmlab.runs import load_run

    return load_run(coupling.teacher, coupling.use_ema)


def init_student(net: nn.Module, coupling: ReflowCoupling) -> None:
    """Start the student net from the teacher's weights (the same architecture is required)."""
    teacher = load_teacher(coupling)
    try:
        net.load_state_dict(teacher.net.state_dict())
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(
            f"coupling.init_from_teacher=true needs the teacher's net ({coupling.teacher}); this run's differs: "
            f"{first}. Use the teacher's net settings, or coupling.init_from_teacher=false"
        ) from None


class ReflowDataModule(PairStreamDataModule):
    """Training batches from the reflow pairs of `reflow` (the run's coupling, which passes them through);
    evaluation from `inner` (the run's own data)."""

    is_image = False  # replaced per instance by the inner datamodule's

    def __init__(self, inner: Any, reflow: ReflowCoupling, batch_size: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.inner, self.reflow, self.num_workers = inner, reflow, num_workers
        self.is_image = bool(inner.is_image)
        self.batch_size = batch_size
        self._stream = StoredPairStream(batch_size, seed)
        self._stream.coupling = reflow
        self.generation: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        if name in EVALUATION_ATTRIBUTES:
            return getattr(self.__dict__["inner"], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def name(self) -> str:
        return self.inner.name

    def setup(self, stage: str | None = None) -> None:
        """Generate the missing pairs on every rank (chunks spread over them), wait for all, then load them all."""
        if self._stream.x0 is not None:
            return
        from fmlab.evaluation.reflow_pairs import generate_pairs, load_pairs

        ranks = Ranks.of_trainer(self.trainer) if self.trainer is not None else Ranks()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        started = time.perf_counter()
        teacher = load_teacher(self.reflow)
        teacher.module.to(device)
        teacher.net.to(device)
        manifest = {"teacher": str(self.reflow.teacher), "teacher_step": teacher.step, "ema": self.reflow.use_ema}
        made = generate_pairs(
            teacher.velocity_field(),
            self.inner,
            self.reflow.solver,
            self.reflow.num_pairs,
            self.reflow.batch_size,
            self.reflow.pairs_dir,
            ranks,
            manifest,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        x0, x1 = load_pairs(self.reflow.pairs_dir)
        self._stream.set_pairs(x0, x1)
        self.batches_per_epoch = self._stream.batches_per_epoch
        self.generation = {
            "pair_generation_seconds": time.perf_counter() - started,
            "pair_chunks_made": made["pair_chunks_made"],
            "num_pairs": len(x0),
        }

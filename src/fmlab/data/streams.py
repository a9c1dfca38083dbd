"""Seeded, coupled training batches: `PairStream` makes batch i as a pure function of (seed, rank, i) and couples it
as it is made; `PairStreamDataModule` streams it through loader workers ahead of the step and saves the stream's
position in checkpoints (exact resume). Every fmlab datamodule is one."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from fmlab.couplings import Coupling, IndependentCoupling
from fmlab.distributed import own_cpus
from fmlab.errors import UserError
from fmlab.seeding import seeded_generator

Sampler = Callable[[int, torch.Generator], Tensor]
# a sampler that also returns each point's class (long tensor): the labels of conditioning=class
LabelledSampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]

# PairStream splits its batches between loader workers itself, so its __len__ is exact; Lightning warns regardless.
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")


class PairStream(IterableDataset):
    """An endless stream of coupled (x0, x1) batches cut into epochs of `batches_per_epoch` batches.

    Batch i (counted over the whole run) is drawn from its own generator seeded by (seed, rank, i) and coupled by
    `coupling` with a generator seeded by (seed, "coupling", rank, i), so it is a pure function of (seed, rank, i):
    each DDP rank draws its own data, loader workers (which take every `num_workers`-th batch, in order) change
    nothing, and a run resumed at step k draws exactly the batches k, k + 1, ... of an unbroken run. An epoch's
    iterator starts at `next_index` and ends at the next multiple of `batches_per_epoch`, so an epoch resumed half-way
    yields only its remaining batches.

    Where an iterator starts is shared memory that its loader (`PairStreamLoader`) sets from the training step each
    time an iterator is made, never state a worker advances: persistent workers keep their copy of the stream across
    epochs, and the batches they made ahead for an iterator that was dropped (Lightning drops the first one of a run
    resumed from an epoch-end checkpoint) would otherwise shift every later batch.
    A `target` that returns (points, labels) (a `LabelledSampler`) makes the batches (x0, x1, labels).

    `coupling_group` = k > 1 couples k batches at once: draw g (k · batch_size points, seeded by (seed, rank, g)) is
    coupled as one batch and cut into the training batches gk, ..., gk + k − 1 (C²OT's OT batch of 1,024 split into
    batches of 256); a worker keeps the draw it coupled last, so each is coupled once per worker.
    """

    def __init__(self, source: Sampler, target: Sampler | LabelledSampler, batch_size: int, batches_per_epoch: int,
                 seed: int, coupling_group: int = 1) -> None:  # fmt: skip
        if isinstance(coupling_group, bool) or not isinstance(coupling_group, int) or coupling_group < 1:
            raise UserError(f"data.coupling_group={coupling_group!r} must be a whole number of batches >= 1")
        self.source, self.target = source, target
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.coupling_group = coupling_group
        self._coupled: tuple[int, tuple[Tensor, ...]] | None = None  # (draw index, its coupled rows)
        self.coupling: Coupling = IndependentCoupling()
        self.rank = 0
        self._start = torch.zeros((), dtype=torch.long).share_memory_()  # seen by every worker, set by the main process

    @property
    def next_index(self) -> int:
        """The batch the next iterator starts at."""
        return int(self._start)

    @next_index.setter
    def next_index(self, index: int) -> None:
        self._start.fill_(int(index))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def shard(self, rank: int, world_size: int) -> None:
        """Make the batches of DDP rank `rank` of `world_size`."""
        self.rank = rank

    def draw(self, index: int) -> tuple[Tensor, ...]:
        """Draw `index` as sampled, before the coupling: `coupling_group` batches' worth of points."""
        g = seeded_generator(self.seed, "train", self.rank, index)
        size = self.batch_size * self.coupling_group
        x0, target = self.source(size, g), self.target(size, g)
        return (x0, *target) if isinstance(target, tuple) else (x0, target)

    def batch(self, index: int) -> tuple[Tensor, ...]:
        """Batch `index` coupled: what the training step gets."""
        if self.coupling_group == 1:
            return self.coupling(*self.draw(index), generator=seeded_generator(self.seed, "coupling", self.rank, index))
        group, position = divmod(index, self.coupling_group)
        if self._coupled is None or self._coupled[0] != group:
            generator = seeded_generator(self.seed, "coupling", self.rank, group)
            self._coupled = (group, self.coupling(*self.draw(group), generator=generator))
        rows = slice(position * self.batch_size, (position + 1) * self.batch_size)
        return tuple(t[rows] for t in self._coupled[1])

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        start = self.next_index
        end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        for index in range(start + worker, end, workers):
            yield self.batch(index)
        if info is None:  # the stream iterated in this process (no trainer to say where): the next epoch follows
            self.next_index = end


def ignore_interrupts(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C (SIGINT, sent to the whole terminal's process group) to its training process,
    which checkpoints and stops them; a worker ended by it would fail the step in progress instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PairStreamLoader(DataLoader):
    """The DataLoader of a `PairStream`: every new iterator (each epoch, and the first of a resumed run) starts at
    the batch `position()` names, the training step, in the main process and in every worker."""

    def __init__(self, stream: PairStream, position: Callable[[], int], num_workers: int = 0) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                         worker_init_fn=ignore_interrupts if num_workers > 0 else None)  # fmt: skip
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        self.dataset.next_index = self.position()
        return super().__iter__()


# loader workers "auto" starts at most, for a coupling that solves OT per batch: enough to keep up with a step that
# costs a third of one OT solve (2D MLP steps ~2 ms, exact OT of 256 points ~5 ms)
AUTO_OT_WORKERS = 4


def available_cpus() -> int:
    """How many CPUs this process may run on (its affinity set: its share under a scheduler or a table)."""
    return len(own_cpus())


def loader_workers(num_workers: int | str, coupling: Coupling, cpus: int | None = None,
                   heavy_batches: bool = False) -> int:  # fmt: skip
    """`data.num_workers`: a count (at most the CPUs the process may use), or "auto": where making a batch is work
    worth a process (a coupling that solves a problem per batch, minibatch OT; or `heavy_batches`, images), one
    worker per spare CPU of the process's share (`cpus`, default all available) up to `AUTO_OT_WORKERS`, so it runs
    beside the training step on the other cores; none otherwise (a worker costs more in inter-process copies than
    it saves on a 2D batch draw)."""
    if num_workers == "auto":
        cpus = available_cpus() if cpus is None else cpus
        return min(AUTO_OT_WORKERS, cpus - 1) if coupling.solves_per_batch or heavy_batches else 0
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"data.num_workers={num_workers!r} is invalid; it must be auto or a whole number >= 0")
    if num_workers > available_cpus():
        raise UserError(
            f"data.num_workers={num_workers} is more than the {available_cpus()} CPUs this process may use (each "
            "worker is a process); choose auto or at most that many"
        )
    return num_workers


class PairStreamDataModule(L.LightningDataModule):
    """A datamodule whose training batches come from a `PairStream` (`self._stream`), coupled by `coupling` as they
    are made: its loader (`loader_workers` processes ahead of the step), and the stream position saved in
    checkpoints for exact resume."""

    is_image = False
    num_levels = 0  # point data: no quantisation, no FID feature space
    fid_feature: str | None = None
    variant = "fmlab's generator of this distribution"
    heavy_batches = False  # whether data.num_workers=auto gives batch-making its own workers whatever the coupling
    target: str
    source: str
    seed: int
    num_workers: int | str
    _stream: PairStream
    # what the last training loader had (metrics.json records them beside train_seconds)
    loader_workers: int = 0
    training_threads: int | None = None
    generation: Mapping[str, float] = MappingProxyType({})  # what making the training data cost (reflow's pairs)
    # the condition its batches carry (None, "class", or a continuous one: fmlab.conditioning) and those it could
    condition: str | None = None
    conditions_available: tuple[str, ...] = ()

    def reference_images(self) -> Tensor:
        raise UserError(f"data={self.name} is point data: it has no FID reference images")

    @property
    def name(self) -> str:
        return self.target if self.source == "gaussian" else f"{self.source}-{self.target}"

    @property
    def coupling(self) -> Coupling:
        return self._stream.coupling

    def couple_with(self, coupling: Coupling | None) -> None:
        """Couple every training batch with `coupling` (the run's `coupling` group) as it is made."""
        self._stream.coupling = coupling or IndependentCoupling()

    def train_dataloader(self) -> DataLoader:
        cpus = available_cpus()
        if self.trainer is not None:
            self._stream.shard(self.trainer.global_rank, self.trainer.world_size)
            cpus = max(1, cpus // max(1, self.trainer.num_devices))  # this node's processes share its CPUs
        workers = loader_workers(self.num_workers, self._stream.coupling, cpus, self.heavy_batches)
        if workers > 0:
            self._leave_cpus_to_workers(workers, cpus)
        self.loader_workers, self.training_threads = workers, torch.get_num_threads()  # for metrics.json
        return PairStreamLoader(self._stream, self._position, workers)

    def _position(self) -> int:
        """The first batch not yet trained on: one batch per optimiser step."""
        return self.trainer.global_step if self.trainer is not None else self._stream.next_index

    def _leave_cpus_to_workers(self, workers: int, cpus: int) -> None:
        """Cap this process's intra-op threads at the CPUs the loader workers leave free: torch's idle threads spin
        and would take the workers' cores (measured: exact-OT steps twice as slow on 2 CPUs with 2 threads beside one
        worker). `teardown` gives the threads back."""
        spare = max(1, cpus - workers)
        if torch.get_num_threads() > spare:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(spare)

    def teardown(self, stage: str) -> None:
        threads = getattr(self, "_threads_before", None)
        if threads is not None:
            torch.set_num_threads(threads)
            self._threads_before = None

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints: the first batch not yet trained on."""
        return {"next_index": int(self._position())}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._stream.next_index = int(state_dict["next_index"])

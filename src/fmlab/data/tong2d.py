"""The 2D datasets of Tong et al. 2024 (TMLR), Table 2, as their released runner builds them.

Source: atong01/conditional-flow-matching (branch v0), `runner/src/datamodules/distribution_datamodule.py`
(`SKLearnDataModule` for moons and scurve, `TorchDynDataModule` for the 8 Gaussians, `TwoDimDataModule` for the
moons → 8 Gaussians pair task) and `runner/src/datamodules/components/two_dim.py` (the pair task's datasets).

Unlike `fmlab.data.toy2d`, these are finite datasets: N = 12,000 points drawn once (at `data_seed`, fixed across
training seeds), split 10,000 / 1,000 / 1,000 by `torch.utils.data.random_split` with a generator seeded 42, as the
runner does. Training shuffles the train split every epoch and drops the last partial batch (19 batches of 512);
validation is the val split; evaluation generates from fresh N(0, I) draws (the pair task: the source's test split)
and compares with the test split.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn import datasets as sklearn_datasets
from torch import Tensor
from torch.utils.data import DataLoader, random_split

from fmlab.couplings import Coupling, IndependentCoupling
from fmlab.data.streams import PairStream, PairStreamDataModule, loader_workers
from fmlab.errors import UserError, choices_error
from fmlab.seeding import seeded_generator

# the runner's split sizes and the seed of its random_split generator
SPLIT = (10_000, 1_000, 1_000)
SPLIT_SEED = 42

Dataset = Callable[[int, int], np.ndarray]


def tong_8gaussians(n: int, seed: int) -> np.ndarray:
    """torchdyn's ToyDataset "gaussians" as the runner asks for it: n // 8 points around each of 8 centres
    5 (cos 2πk/8, sin 2πk/8), each coordinate N(0, 1) about its centre (radius 5, std 1)."""
    rng = np.random.RandomState(seed)
    per_mode = n // 8
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 5.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.concatenate([centre + rng.randn(per_mode, 2) for centre in centres])


def tong_moons(n: int, seed: int) -> np.ndarray:
    """sklearn's make_moons(n, noise=0.05) × 2, then x − 1 (the runner's SKLearnDataModule "moons")."""
    points, _ = sklearn_datasets.make_moons(n_samples=n, noise=0.05, random_state=seed)
    points = points * 2
    points[:, 0] -= 1
    return points


def tong_scurve(n: int, seed: int) -> np.ndarray:
    """sklearn's make_s_curve(n, noise=0.05), its (x, z) coordinates × 1.5 (SKLearnDataModule "scurve")."""
    points, _ = sklearn_datasets.make_s_curve(n_samples=n, noise=0.05, random_state=seed)
    return points[:, [0, 2]] * 1.5


def tong_pair_moons(n: int, seed: int) -> np.ndarray:
    """The pair task's source (two_dim.py "moon"): make_moons(n, noise=0.1) standardised by the mean and std of all
    its coordinates together, then × 7."""
    points, _ = sklearn_datasets.make_moons(n_samples=n, noise=0.1, random_state=seed)
    return (points - points.mean()) / points.std() * 7.0


def tong_pair_8gaussians(n: int, seed: int) -> np.ndarray:
    """The pair task's target (two_dim.py "8gaussians"): a uniformly chosen one of 8 centres at radius 4 (the 4
    axis and 4 diagonal directions) plus N(0, 0.5²) noise, all × 3: radius 12, std 1.5."""
    rng = np.random.RandomState(seed)
    diagonal = 1 / np.sqrt(2)
    centres = 4.0 * np.array(
        [
            [1, 0],
            [-1, 0],
            [0, 1],
            [0, -1],
            [diagonal, diagonal],
            [diagonal, -diagonal],
            [-diagonal, diagonal],
            [-diagonal, -diagonal],
        ]  # fmt: skip
    )
    noise = rng.randn(n, 2) * 0.5
    return (centres[rng.randint(8, size=n)] + noise) * 3


def tong_8gaussians_labels(n: int) -> np.ndarray:
    """The mode of each `tong_8gaussians` point: its points come in 8 blocks of n // 8, one per centre."""
    return np.repeat(np.arange(8), n // 8)


def tong_moons_labels(n: int, seed: int) -> np.ndarray:
    """make_moons' own labels for the `tong_moons` points: 0 for the upper moon, 1 for the lower."""
    return sklearn_datasets.make_moons(n_samples=n, noise=0.05, random_state=seed)[1]


# conditioning=class: each labelled dataset's labels (n, seed) -> classes, and how many classes there are
LABELS: dict[str, Callable[[int, int], np.ndarray]] = {
    "tong_8gaussians": lambda n, seed: tong_8gaussians_labels(n),
    "tong_moons": tong_moons_labels,
}
NUM_CLASSES = {"tong_8gaussians": 8, "tong_moons": 2}

DATASETS: dict[str, Dataset] = {
    "tong_8gaussians": tong_8gaussians,
    "tong_moons": tong_moons,
    "tong_scurve": tong_scurve,
    "tong_pair_moons": tong_pair_moons,
    "tong_pair_8gaussians": tong_pair_8gaussians,
}
SOURCES = ("gaussian", "tong_pair_moons")


def split_dataset(points: np.ndarray, lengths: tuple[int, ...] = SPLIT, seed: int = SPLIT_SEED) -> list[Tensor]:
    """train / val / test as `torch.utils.data.random_split(points, lengths, Generator().manual_seed(seed))`
    (float32 points; integer arrays such as labels keep an integer type)."""
    data = torch.from_numpy(points.astype(np.float32) if points.dtype.kind == "f" else points.astype(np.int64))
    parts = random_split(range(len(data)), list(lengths), generator=torch.Generator().manual_seed(seed))
    return [data[torch.tensor(part.indices, dtype=torch.long)] for part in parts]


class EpochStream(PairStream):
    """Batches of a finite train split: epoch e is a permutation of the split seeded by (seed, rank, e), cut into
    `batches_per_epoch` batches (the last partial batch dropped). The source is a fresh N(0, I) batch per step, or
    the source dataset's train split shuffled the same way on its own stream. Batch i is a pure function of
    (seed, rank, i), so resumed runs draw exactly the batches of an unbroken one."""

    def __init__(self, target: Tensor, source: Tensor | None, batch_size: int, seed: int,
                 labels: Tensor | None = None) -> None:  # fmt: skip
        super().__init__(None, None, batch_size, len(target) // batch_size, seed)  # type: ignore[arg-type]
        self.target_points, self.source_points, self.labels = target, source, labels

    def _epoch_order(self, role: str, epoch: int, size: int) -> Tensor:
        return torch.randperm(size, generator=seeded_generator(self.seed, f"train_{role}", self.rank, epoch))

    def draw(self, index: int) -> tuple[Tensor, ...]:
        epoch, position = divmod(index, self.batches_per_epoch)
        rows = slice(position * self.batch_size, (position + 1) * self.batch_size)
        chosen = self._epoch_order("target", epoch, len(self.target_points))[rows]
        x1 = self.target_points[chosen]
        if self.source_points is None:
            x0 = torch.randn(x1.shape, generator=seeded_generator(self.seed, "train_source", self.rank, index))
        else:
            x0 = self.source_points[self._epoch_order("source", epoch, len(self.source_points))[rows]]
        return (x0, x1) if self.labels is None else (x0, x1, self.labels[chosen])


class TongDataModule(PairStreamDataModule):
    """(source → target) on Tong et al.'s finite 2D datasets (`EvaluationData`), with a validation split.

    `held_out(n)` is the test split's first n points; `held_out(n, index=k)` for k ≥ 1 is the test split of the
    dataset drawn again at `data_seed + k` (an independent draw: the floor W2 compares the two).
    """

    variant = "Tong et al. 2024's runner datasets: 12,000 points drawn once at data_seed, split 10,000/1,000/1,000"

    def __init__(
        self,
        target: str = "tong_moons",
        source: str = "gaussian",
        batch_size: int = 512,
        num_eval_samples: int = 1000,
        data_seed: int = 42,
        num_workers: int | str = 0,
        seed: int = 0,
        shape: tuple[int, ...] = (2,),
        num_classes: int = 0,
        with_labels: bool = False,
    ) -> None:
        super().__init__()
        if target not in DATASETS:
            raise choices_error("data.target", target, DATASETS)
        if source not in SOURCES:
            raise choices_error("data.source", source, SOURCES)
        if tuple(shape) != (2,):
            raise UserError(f"data.shape={list(shape)} is invalid for 2D data; it must be [2]")
        if not 1 <= batch_size <= SPLIT[0] or not 2 <= num_eval_samples <= SPLIT[2]:
            raise UserError(
                f"data.batch_size={batch_size} must be in [1, {SPLIT[0]}] and data.num_eval_samples="
                f"{num_eval_samples} in [2, {SPLIT[2]}] (the split is {'/'.join(map(str, SPLIT))})"
            )
        self.target, self.source = target, source
        self.batch_size, self.num_eval_samples = batch_size, num_eval_samples
        self.data_seed, self.num_workers, self.seed = data_seed, num_workers, seed
        loader_workers(num_workers, IndependentCoupling())  # a bad value fails here, not when training starts
        self.data_shape: tuple[int, ...] = (2,)
        self.train_split, self.val_split, self.test_split = self.splits(target)
        self.source_splits = self.splits(source) if source != "gaussian" else None
        source_train = self.source_splits[0] if self.source_splits is not None else None
        train_labels, self.val_labels = None, None
        if with_labels:
            if target not in LABELS or source != "gaussian":
                raise UserError(
                    f"data={target} (source {source}) has no class labels, so conditioning=class cannot train on it; "
                    f"choose one of {', '.join(LABELS)} from the gaussian source"
                )
            labels = LABELS[target](sum(SPLIT), data_seed)
            train_labels, self.val_labels, _ = split_dataset(labels)
        self.num_classes = NUM_CLASSES[target] if with_labels else 0
        self.condition = "class" if with_labels else None
        self.conditions_available = ("class",) if target in LABELS and source == "gaussian" else ()
        self._stream = EpochStream(self.train_split, source_train, batch_size, seed, train_labels)
        self._validation_pairs: tuple[Tensor, ...] | None = None
        self.batches_per_epoch = self._stream.batches_per_epoch

    def splits(self, name: str, index: int = 0) -> list[Tensor]:
        """train / val / test of dataset `name` drawn at `data_seed + index`."""
        return split_dataset(DATASETS[name](sum(SPLIT), self.data_seed + index))

    def validation_pairs(self) -> tuple[Tensor, ...]:
        """(x0, x1): the whole val split, with a fixed N(0, I) draw (or the source's val split) beside it; with
        labels, (x0, x1, labels). Coupled once, with a fixed generator, by the training batches' coupling: the pairs
        read no weights, so every validation scores the same pairs."""
        x1 = self.val_split
        if self.source_splits is not None:
            pairs: tuple[Tensor, ...] = (self.source_splits[1], x1)
        else:
            x0 = torch.randn(x1.shape, generator=seeded_generator(self.seed, "val_source"))
            pairs = (x0, x1) if self.val_labels is None else (x0, x1, self.val_labels)
        return self.coupling(*pairs, generator=seeded_generator(self.seed, "val_coupling"))

    def couple_with(self, coupling: Coupling | None) -> None:
        super().couple_with(coupling)
        self._validation_pairs = None  # coupled again by the new coupling

    def val_dataloader(self) -> DataLoader:
        if self._validation_pairs is None:
            self._validation_pairs = self.validation_pairs()
        return DataLoader([self._validation_pairs], batch_size=None)

    def held_out(self, n: int | None = None, index: int = 0) -> Tensor:
        n = n or self.num_eval_samples
        if n > SPLIT[2]:
            raise UserError(f"eval.num_samples={n} is more than the {SPLIT[2]} test points of data={self.target}")
        test = self.test_split if index == 0 else self.splits(self.target, index)[2]
        return test[:n]

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        """Fresh N(0, I) points fixed per (`draw`, `chunk`); the pair task: its source's test points from `start`."""
        n = n or self.num_eval_samples
        if self.source_splits is None:
            return torch.randn(n, 2, generator=seeded_generator(self.seed, "eval_source", draw, chunk))
        test = self.source_splits[2]
        if start + n > len(test):
            raise UserError(f"eval.num_samples={start + n} is more than the {len(test)} test points of {self.source}")
        return test[start : start + n]

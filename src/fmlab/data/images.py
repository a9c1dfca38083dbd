"""Image datamodules: quantised images held as integer levels, dequantised to [-1, 1] for training and likelihood.

Every image dataset subclasses `ImageDataModule` and only loads its arrays; dequantisation, flips, the noise source,
held-out sets and the FID reference set are shared.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from fmlab.couplings import IndependentCoupling
from fmlab.data.streams import PairStream, PairStreamDataModule, loader_workers
from fmlab.errors import UserError, first_detail
from fmlab.seeding import seeded_generator


def dequantize(levels: Tensor, num_levels: int, noise: Tensor) -> Tensor:
    """x = (k + u) / (L/2) − 1 ∈ [-1, 1) for integer levels k ∈ {0..L−1} and u ~ U[0, 1): uniform dequantisation
    (Theis et al. 2016) scaled to [-1, 1]; the scale L/2 is what `likelihood.bits_per_dim` takes as `data_scale`."""
    return (levels.to(noise.dtype) + noise) / (num_levels / 2.0) - 1.0


def quantize(x: Tensor, num_levels: int) -> Tensor:
    """The inverse of `dequantize`: k = ⌊(x + 1) L/2⌋ clipped to {0..L−1}, as uint8 (for L ≤ 256). Exact except
    within float32 precision (~1e-5 of a level) of a bin edge."""
    return torch.floor((x + 1.0) * (num_levels / 2.0)).clamp(0, num_levels - 1).to(torch.uint8)


def bin_centers(levels: Tensor, num_levels: int) -> Tensor:
    """The centre of each level's dequantisation bin, (k + ½)/(L/2) − 1: deterministic images for FID references."""
    return dequantize(levels, num_levels, torch.full(levels.shape, 0.5))


class ImageStream(PairStream):
    """Batches of a finite image set, sharded over DDP ranks: epoch e is one permutation of the set seeded by
    (seed, e), rank r of R takes its rows r, r + R, ... and cuts them into batches (the last partial batch dropped).
    Batch i is x1 = the dequantised images (uniform noise, and a horizontal flip with probability ½ if `flip`) and
    x0 ~ N(0, I), all drawn from a generator seeded by (seed, rank, i): a pure function of (seed, rank, i), as
    every `PairStream` batch."""

    def __init__(self, levels: Tensor, labels: Tensor | None, num_levels: int, flip: bool, batch_size: int,
                 seed: int) -> None:  # fmt: skip
        super().__init__(None, None, batch_size, len(levels) // batch_size, seed)  # type: ignore[arg-type]
        self.levels, self.labels, self.num_levels, self.flip = levels, labels, num_levels, flip
        self.world_size = 1
        self._order: tuple[int, Tensor] | None = None  # (epoch, its permutation): one randperm per epoch

    def shard(self, rank: int, world_size: int) -> None:
        super().shard(rank, world_size)
        self.world_size = world_size
        self.batches_per_epoch = len(self.levels) // world_size // self.batch_size
        if self.batches_per_epoch < 1:
            raise UserError(
                f"data.batch_size={self.batch_size} is more than the {len(self.levels) // world_size} training "
                f"images each of {world_size} processes gets"
            )

    def epoch_order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            g = seeded_generator(self.seed, "order", epoch)
            self._order = (epoch, torch.randperm(len(self.levels), generator=g))
        return self._order[1]

    def draw(self, index: int) -> tuple[Tensor, ...]:
        epoch, position = divmod(index, self.batches_per_epoch)
        mine = self.epoch_order(epoch)[self.rank :: self.world_size]
        rows = mine[position * self.batch_size : (position + 1) * self.batch_size]
        g = seeded_generator(self.seed, "train", self.rank, index)
        levels = self.levels[rows]
        x1 = dequantize(levels, self.num_levels, torch.rand(levels.shape, generator=g))
        if self.flip:
            flipped = torch.rand(len(x1), generator=g) < 0.5
            x1[flipped] = x1[flipped].flip(-1)
        x0 = torch.randn(x1.shape, generator=g)
        return (x0, x1) if self.labels is None else (x0, x1, self.labels[rows])


class ImageDataModule(PairStreamDataModule):
    """Images as uint8 levels (N, C, H, W). Training batches are (x0, x1) from an `ImageStream`: x0 ~ N(0, I) and
    x1 the dequantised images (fresh uniform noise every batch, random horizontal flips if `flip`).

    Subclasses set `name`, `num_levels`, `data_shape`, `fid_feature` and return (train, test) levels from `load()`;
    one that has labels stores them as `self.labels_found = (train labels, test labels)` while loading. With
    `with_labels` (conditioning=class) the batches are (x0, x1, labels).
    """

    name = "images"
    fid_feature = "inception"
    num_levels = 256
    data_shape: tuple[int, int, int] = (3, 32, 32)
    is_image = True
    heavy_batches = True  # dequantising and flipping a batch of images: worth loader workers on spare CPUs
    source = "gaussian"

    def __init__(
        self,
        target: str | None = None,
        batch_size: int = 128,
        num_eval_samples: int = 2000,
        flip: bool = False,
        num_workers: int | str = 0,
        seed: int = 0,
        data_dir: str | None = None,
        shape: tuple[int, ...] | None = None,
        num_classes: int = 0,
        with_labels: bool = False,
    ) -> None:
        super().__init__()
        if target is not None and target != self.name:
            raise UserError(f"data.target={target} does not match {type(self).__name__}; it loads {self.name}")
        if batch_size < 1 or num_eval_samples < 2:
            raise UserError(
                f"data.batch_size={batch_size} must be >= 1 and data.num_eval_samples={num_eval_samples} >= 2"
            )
        if shape is not None and tuple(shape) != tuple(self.data_shape):
            raise UserError(f"data.shape={list(shape)} is invalid for data={self.name}; it is {list(self.data_shape)}")
        self.batch_size, self.num_eval_samples, self.flip = batch_size, num_eval_samples, flip
        self.num_workers, self.seed = num_workers, seed
        loader_workers(num_workers, IndependentCoupling())  # a bad value fails here, before any data is read
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.labels_found: tuple[Tensor, Tensor] | None = None
        self.train_levels, self.test_levels = self.load()
        self.train_labels: Tensor | None = None
        self.num_classes = 0
        self.conditions_available = ("class",) if self.labels_found is not None else ()
        self.condition = "class" if with_labels else None
        if with_labels:
            if self.labels_found is None:
                raise UserError(f"data={self.name} has no class labels, so conditioning=class cannot train on it")
            self.train_labels = self.labels_found[0].long()
            self.num_classes = int(num_classes) or int(self.train_labels.max()) + 1
            if self.train_labels.min() < 0 or self.train_labels.max() >= self.num_classes:
                raise UserError(
                    f"data={self.name}: labels span {int(self.train_labels.min())}..{int(self.train_labels.max())}, "
                    f"outside the data.num_classes={self.num_classes} classes 0..{self.num_classes - 1}"
                )
        self._stream = ImageStream(self.train_levels, self.train_labels, self.num_levels, flip, batch_size, seed)

    def load(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def held_out(self, n: int | None = None, index: int = 0, dequantization: int = 0) -> Tensor:
        """The first `n` test images (all of them at most), dequantised with noise fixed per (seed, index); further
        `dequantization` draws of the same images (k = 1, 2, ...) take noise fixed per (seed, index, k)."""
        levels = self.test_levels[: n or len(self.test_levels)]
        stream = (self.seed, "held_out", index, *([dequantization] if dequantization else []))
        noise = torch.rand(levels.shape, generator=seeded_generator(*stream))
        return dequantize(levels, self.num_levels, noise)

    def reference_images(self) -> Tensor:
        """The FID reference set: every training image at its bin centre."""
        return bin_centers(self.train_levels, self.num_levels)

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        """Fixed N(0, I) noise from which evaluation generates, one batch per (draw, chunk)."""
        g = seeded_generator(self.seed, "eval_source", draw, chunk)
        return torch.randn(n or self.num_eval_samples, *self.data_shape, generator=g)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits: 1,797 greyscale images with 17 levels (0..16), works offline.

    A fixed split (independent of the run's seed): 1,437 training and 360 test images. No flips (digits are not
    mirror-symmetric).
    """

    name = "digits"
    heavy_batches = False  # 8x8 images: a worker's copies cost more than making the batch
    variant = "scikit-learn's 8x8 digits (17 levels), fixed 1,437 train / 360 test split"
    fid_feature = "digits"
    num_levels = 17
    data_shape = (1, 8, 8)
    test_fraction = 0.2

    def load(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        self.labels_found = self.labels()
        return self._split(torch.from_numpy(load_digits().images).to(torch.uint8).unsqueeze(1))

    def labels(self) -> tuple[Tensor, Tensor]:
        """Class labels in the same split, for the FID feature classifier."""
        from sklearn.datasets import load_digits

        return self._split(torch.from_numpy(load_digits().target))

    def _split(self, values: Tensor) -> tuple[Tensor, Tensor]:
        order = torch.randperm(len(values), generator=torch.Generator().manual_seed(0))
        num_test = round(self.test_fraction * len(values))
        return values[order[num_test:]], values[order[:num_test]]


def _missing(data: str, where: Path, files: list[str], error: Exception | None = None) -> UserError:
    listed = ", ".join(files)
    why = f" (download failed: {first_detail(error)})" if error is not None else ""
    return UserError(f"data={data}: expected {listed} under {where}{why}; set data.data_dir=<folder holding them>")


def _corrupt(data: str, path: Path, expected: str, error: Exception | None = None) -> UserError:
    found = f" ({type(error).__name__}: {first_detail(error) or 'no detail'})" if error is not None else ""
    return UserError(f"data={data}: {path} is not a valid file: expected {expected}{found}; replace it")


IDX_MAGIC = {3: 0x0803, 1: 0x0801}  # MNIST idx files: ubyte images (3 dims), ubyte labels (1 dim)


def check_idx_file(path: Path, dims: int) -> None:
    """An MNIST idx file: the magic number for `dims` dimensions, then that many sizes whose product is the rest."""
    import struct

    expected = f"an idx file (magic 0x{IDX_MAGIC[dims]:04x}, {dims} sizes, then the bytes they count)"
    data = path.read_bytes()
    if len(data) < 4 + 4 * dims or struct.unpack(">I", data[:4])[0] != IDX_MAGIC[dims]:
        raise _corrupt("mnist", path, expected)
    sizes = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    if len(data) != 4 + 4 * dims + math.prod(sizes):
        raise _corrupt("mnist", path, f"{expected}; its sizes {list(sizes)} do not match its {len(data)} bytes")


class MNISTDataModule(ImageDataModule):
    """MNIST through torchvision: the idx files under `<data_dir>/MNIST/raw/` (downloaded there when possible)."""

    name = "mnist"
    variant = "MNIST idx files (60,000 train / 10,000 test), 28x28, 256 levels"
    data_shape = (1, 28, 28)
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def load(self) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import MNIST

        root = self.data_dir or Path("data")
        raw = root / "MNIST" / "raw"
        for name in self.files:  # name a corrupt file instead of torchvision's bare AssertionError
            if (raw / name).is_file():
                check_idx_file(raw / name, 3 if "images" in name else 1)
        try:
            train, test = (MNIST(root, train=split, download=False) for split in (True, False))
        except RuntimeError:
            try:
                train, test = (MNIST(root, train=split, download=True) for split in (True, False))
            except Exception as error:
                raise _missing("mnist", root / "MNIST" / "raw", self.files, error) from None
        self.labels_found = (train.targets, test.targets)
        return train.data.unsqueeze(1), test.data.unsqueeze(1)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10's python batches (`cifar-10-batches-py/data_batch_1..5`, `test_batch`: pickled dicts of uint8 rows
    in CHW order), downloaded by torchvision when missing and possible. Random horizontal flips by default."""

    name = "cifar10"
    variant = "CIFAR-10 python batches (50,000 train / 10,000 test), 32x32, 256 levels"
    data_shape = (3, 32, 32)
    folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]

    def __init__(self, *args, flip: bool = True, **kwargs) -> None:
        super().__init__(*args, flip=flip, **kwargs)

    def load(self) -> tuple[Tensor, Tensor]:
        root = self.data_dir or Path("data")
        folder = root / self.folder
        if not all((folder / f).is_file() for f in [*self.train_files, "test_batch"]):
            try:
                from torchvision.datasets import CIFAR10

                CIFAR10(root, download=True)
            except Exception as error:
                files = [*self.train_files, "test_batch"]
                raise _missing("cifar10", folder, files, error) from None
        train = [self._read(folder / f) for f in self.train_files]
        test = self._read(folder / "test_batch")
        self.labels_found = (torch.cat([labels for _, labels in train]), test[1])
        return torch.cat([images for images, _ in train]), test[0]

    @staticmethod
    def _read(path: Path) -> tuple[Tensor, Tensor]:
        """(images, labels) of one batch file."""
        import pickle

        try:
            with path.open("rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images = torch.from_numpy(batch[b"data"]).reshape(-1, 3, 32, 32)
            return images, torch.as_tensor(batch[b"labels"], dtype=torch.long)
        except Exception as error:
            expected = "a pickled dict whose b'data' holds N x 3072 uint8 rows and b'labels' N class indices"
            raise _corrupt("cifar10", path, expected, error) from None


class DownsampledImageNetDataModule(ImageDataModule):
    """Downsampled ImageNet (Chrabaszcz et al. 2017) as distributed: `train_data_batch_*.npz` and `val_data.npz`
    (arrays `data`, N × 3·R·R uint8 in CHW order, and `labels`) anywhere under `data_dir`. It needs a login to
    download, so it is never downloaded here. Held entirely in memory (ImageNet64 train: 15.7 GB)."""

    def __init__(self, *args, resolution: int = 32, **kwargs) -> None:
        if resolution not in (32, 64):
            from fmlab.errors import choices_error

            raise choices_error("data.resolution", resolution, (32, 64))
        self.name, self.data_shape = f"imagenet{resolution}", (3, resolution, resolution)
        # the Chrabaszcz et al. 2017 release (npz batches), not the Oord et al. 2016 downsampling: they differ
        self.variant = f"Chrabaszcz et al. 2017 downsampled ImageNet {resolution}x{resolution} (train_data_batch_*.npz)"
        super().__init__(*args, **kwargs)

    def load(self) -> tuple[Tensor, Tensor]:
        import numpy as np

        root = self.data_dir or Path("data")
        train_files = sorted(root.rglob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        val_files = sorted(root.rglob("val_data.npz"))
        if not train_files or not val_files:
            raise _missing(self.name, root, ["train_data_batch_1.npz ... train_data_batch_10.npz", "val_data.npz"])

        def read(path: Path) -> tuple[Tensor, Tensor | None]:
            """(images, labels counted from 0; None when the file has no labels)."""
            try:
                arrays = np.load(path)
                images = torch.from_numpy(arrays["data"]).reshape(-1, *self.data_shape)
                # the distributed files count classes 1..1000
                labels = torch.from_numpy(np.asarray(arrays["labels"])).long() - 1 if "labels" in arrays else None
                return images, labels
            except Exception as error:
                expected = f"an .npz file whose 'data' holds N x {math.prod(self.data_shape)} uint8 rows"
                raise _corrupt(self.name, path, expected, error) from None

        train, test = [read(p) for p in train_files], read(val_files[0])
        if all(labels is not None for _, labels in [*train, test]):
            self.labels_found = (torch.cat([labels for _, labels in train]), test[1])  # type: ignore[misc]
        return torch.cat([images for images, _ in train]), test[0]

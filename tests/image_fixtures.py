"""Small image datasets written in their real on-disk formats (MNIST idx, CIFAR-10 python pickles, downsampled
ImageNet npz), so the real loaders run without downloads."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def pixels(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def write_mnist(root: Path, train: int = 12, test: int = 5) -> dict[str, np.ndarray]:
    """idx3 images (magic 2051, big-endian counts) and idx1 labels (magic 2049) under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = pixels(count, (28, 28), seed), np.arange(count, dtype=np.uint8) % 10
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.tobytes())
        arrays[split] = images
    return arrays


def write_cifar10(root: Path, per_batch: int = 4, test: int = 3) -> dict[str, np.ndarray]:
    """Pickled dicts {b"data": N × 3072 uint8 (CHW rows), b"labels": [...]} in root/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        count = test if name == "test_batch" else per_batch
        rows = pixels(count, (3072,), seed)
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": rows, b"labels": list(range(count)), b"batch_label": name.encode()}, handle)
        arrays[name] = rows.reshape(-1, 3, 32, 32)
    return arrays


def write_imagenet(root: Path, resolution: int = 32, batches: int = 2, per_batch: int = 3) -> dict[str, np.ndarray]:
    """train_data_batch_<i>.npz and val_data.npz with `data` (N × 3·R·R uint8) and 1-based `labels`."""
    arrays = {}
    train_dir, val_dir = root / f"Imagenet{resolution}_train_npz", root / f"Imagenet{resolution}_val_npz"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, batches + 1):
        rows = pixels(per_batch, (3 * resolution * resolution,), i)
        np.savez(train_dir / f"train_data_batch_{i}.npz", data=rows, labels=np.arange(1, per_batch + 1))
        arrays[f"train_{i}"] = rows.reshape(-1, 3, resolution, resolution)
    rows = pixels(2, (3 * resolution * resolution,), 99)
    np.savez(val_dir / "val_data.npz", data=rows, labels=np.array([1, 2]))
    arrays["val"] = rows.reshape(-1, 3, resolution, resolution)
    return arrays


WRITERS = {
    "mnist": write_mnist,
    "cifar10": write_cifar10,
    "imagenet32": lambda root: write_imagenet(root, 32),
    "imagenet64": lambda root: write_imagenet(root, 64),
}

"""Image datamodules on format-true fixtures: shapes, value ranges, flips, (de)quantisation, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmlab.data.images import (
    CIFAR10DataModule,
    DigitsDataModule,
    DownsampledImageNetDataModule,
    ImageStream,
    MNISTDataModule,
    dequantize,
    quantize,
)
from fmlab.errors import UserError
from tests.image_fixtures import write_cifar10, write_imagenet, write_mnist


def test_mnist_idx_files_load_through_torchvision(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    data = MNISTDataModule(data_dir=str(tmp_path))
    assert data.train_levels.shape == (12, 1, 28, 28) and data.test_levels.shape == (5, 1, 28, 28)
    assert torch.equal(data.train_levels[:, 0], torch.from_numpy(arrays["train"]))


def test_cifar10_pickled_batches_load_in_order_with_channels_first(tmp_path: Path) -> None:
    arrays = write_cifar10(tmp_path)
    data = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4)
    assert data.train_levels.shape == (20, 3, 32, 32) and data.test_levels.shape == (3, 3, 32, 32)
    assert torch.equal(data.train_levels[4:8], torch.from_numpy(arrays["data_batch_2"]))
    assert torch.equal(data.test_levels, torch.from_numpy(arrays["test_batch"]))
    assert data.flip


@pytest.mark.parametrize("resolution", [32, 64])
def test_downsampled_imagenet_npz_batches_load_in_numeric_order(tmp_path: Path, resolution: int) -> None:
    arrays = write_imagenet(tmp_path, resolution, batches=2)
    data = DownsampledImageNetDataModule(resolution=resolution, data_dir=str(tmp_path))
    assert data.name == f"imagenet{resolution}" and data.train_levels.shape == (6, 3, resolution, resolution)
    assert torch.equal(data.train_levels[3:], torch.from_numpy(arrays["train_2"]))
    assert torch.equal(data.test_levels, torch.from_numpy(arrays["val"]))


def test_training_batches_are_dequantised_into_minus_one_one_and_flips_mirror(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    data = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=20, flip=False)
    torch.manual_seed(0)
    x0, x1 = next(iter(data.train_dataloader()))
    assert x0.shape == x1.shape == (20, 3, 32, 32) and x1.min() >= -1 and x1.max() < 1
    # the dequantised value stays in its level's bin: quantize inverts dequantize
    assert torch.equal(quantize(x1, 256).sort(0).values, data.train_levels.sort(0).values)
    one_image = ImageStream(data.train_levels[:1].repeat(64, 1, 1, 1), None, 256, flip=True, batch_size=64, seed=0)
    batch = one_image.batch(0)[1]
    scaled = (batch + 1) * 128  # level + uniform noise

    def matches(levels: torch.Tensor) -> torch.Tensor:
        offset = scaled - levels.float()
        return ((offset > -1e-4) & (offset < 1 + 1e-4)).flatten(1).all(1)

    is_original, is_mirrored = matches(data.train_levels[0]), matches(data.train_levels[0].flip(-1))
    assert (is_original | is_mirrored).all() and 10 < int(is_mirrored.sum()) < 54  # about half of 64 flipped


def test_dequantize_and_quantize_round_trip_every_level() -> None:
    levels = torch.arange(17, dtype=torch.uint8).repeat(50)
    # away from the bin edges (float32 cannot place x within ~1e-5 of an edge on either side)
    for noise in (
        torch.full(levels.shape, 0.01),
        torch.full(levels.shape, 0.99),
        0.01 + 0.98 * torch.rand(levels.shape),
    ):
        assert torch.equal(quantize(dequantize(levels, 17, noise), 17), levels)
    assert DigitsDataModule().reference_images().abs().max() < 1


def test_missing_files_stop_with_one_line_naming_them(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        DownsampledImageNetDataModule(resolution=32, data_dir=str(tmp_path))
    assert "val_data.npz" in str(error.value) and str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="data.resolution=16"):
        DownsampledImageNetDataModule(resolution=16, data_dir=str(tmp_path))
    with pytest.raises(UserError, match="data.target=cifar10 does not match"):
        DigitsDataModule(target="cifar10")


@pytest.mark.slow
def test_a_short_digits_unet_run_reaches_a_fid_far_below_the_untrained_nets(train_config) -> None:
    from hydra.utils import instantiate

    from fmlab.module import FlowModule
    from fmlab.train import train

    overrides = ["experiment=digits_fm_ot", "logger=none", "trainer.max_steps=1000", "eval.nll_samples=0"]
    cfg = train_config(*overrides, "callbacks.sample_logger=null")
    torch.manual_seed(cfg.seed)
    untrained = instantiate(cfg.eval).evaluate(FlowModule.from_config(cfg).velocity_field(), instantiate(cfg.data))[
        "fid"
    ]
    metrics = train(cfg)
    assert metrics["fid"] < 0.25 * untrained, (metrics["fid"], untrained)

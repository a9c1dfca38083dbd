"""Backbones: shapes, time conditioning, and clear errors for the wrong data."""

from __future__ import annotations

import pytest
import torch

from fmlab.nets import MLP
from fmlab.utils.errors import UserError


def test_mlp_maps_time_and_points_to_vectors_of_the_same_shape() -> None:
    net = MLP((2,), width=32, depth=2, activation="silu")
    x = torch.randn(10, 2)
    out = net(torch.rand(10), x)
    assert out.shape == x.shape
    assert not torch.allclose(net(torch.zeros(10), x), net(torch.ones(10), x))  # time matters
    assert torch.equal(net(torch.tensor(0.3), x), net(torch.full((10,), 0.3), x))  # scalar t broadcasts
    assert sum(p.numel() for p in net.parameters()) == (3 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)


def test_mlp_flattens_images_and_rejects_an_unknown_activation() -> None:
    net = MLP((1, 8, 8), width=16, depth=1)
    x = torch.randn(5, 1, 8, 8)
    assert net(torch.rand(5), x).shape == x.shape
    assert sum(p.numel() for p in net.parameters()) == (65 * 16 + 16) + (16 * 64 + 64)
    with pytest.raises(UserError, match="net.activation='swish'.*selu"):
        MLP((2,), activation="swish")


def test_fourier_time_features_widen_the_input_and_vary_with_time() -> None:
    plain, fourier = MLP((2,), width=8, depth=1), MLP((2,), width=8, depth=1, time_frequencies=4)
    count = sum(p.numel() for p in fourier.parameters()) - sum(p.numel() for p in plain.parameters())
    assert count == 8 * 8  # 2K extra inputs into the first layer of width 8
    x = torch.zeros(3, 2)
    assert not torch.allclose(fourier(torch.full((3,), 0.5), x), fourier(torch.zeros(3), x))
    with pytest.raises(UserError, match="net.time_frequencies=-1"):
        MLP((2,), time_frequencies=-1)

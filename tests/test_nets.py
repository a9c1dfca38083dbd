"""Backbones: shapes, time conditioning, and clear errors for the wrong data."""

from __future__ import annotations

import pytest
import torch

from fmlab.errors import UserError
from fmlab.nets import MLP, UNet


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


# ADM U-Net ---------------------------------------------------------------------------------------------------


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def adm_parameter_count(
    in_channels: int, channels: int, num_res_blocks: int, channel_mult: list[int], attention_levels: set[int]
) -> int:
    """The parameter count of the ADM recipe, counted layer by layer from its description (not from the module)."""
    group_norm, emb = (lambda c: 2 * c), 4 * channels

    def res(c_in: int, c_out: int) -> int:
        skip = conv(c_in, c_out, 1) if c_in != c_out else 0
        return (
            group_norm(c_in)
            + conv(c_in, c_out, 3)
            + (emb * 2 * c_out + 2 * c_out)
            + group_norm(c_out)
            + conv(c_out, c_out, 3)
            + skip
        )

    def attention(c: int) -> int:
        return group_norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = (channels * emb + emb) + (emb * emb + emb) + conv(in_channels, channels, 3)
    skips, current = [channels], channels
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            total += res(current, channels * mult) + (attention(channels * mult) if level in attention_levels else 0)
            current = channels * mult
            skips.append(current)
        if level < len(channel_mult) - 1:
            total += conv(current, current, 3)
            skips.append(current)
    total += 2 * res(current, current) + attention(current)
    for level in reversed(range(len(channel_mult))):
        for block in range(num_res_blocks + 1):
            out = channels * channel_mult[level]
            total += res(current + skips.pop(), out) + (attention(out) if level in attention_levels else 0)
            current = out
            if level > 0 and block == num_res_blocks:
                total += conv(current, current, 3)
    return total + group_norm(current) + conv(current, in_channels, 3)


@pytest.mark.parametrize(
    ("net_name", "data_name", "attention_levels"),
    [
        ("unet_small", "digits", {1}),
        ("unet_cifar10", "cifar10", {1}),
        ("unet_imagenet32", "imagenet32", {1, 2}),
        ("unet_imagenet64", "imagenet64", {1, 2, 3}),
    ],
)
def test_unet_configs_keep_the_image_shape_and_have_the_recipes_parameter_count(
    net_name: str, data_name: str, attention_levels: set[int]
) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fmlab.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"net={net_name}", f"data={data_name}"])
    # the paper-sized nets (150M+ parameters) are built on the meta device: shapes without memory or random init
    device = torch.device("cpu" if net_name == "unet_small" else "meta")
    with device:
        net = instantiate(cfg.net)
        x, t = torch.randn(2, *cfg.data.shape), torch.rand(2)
    expected = adm_parameter_count(
        cfg.data.shape[0], cfg.net.channels, cfg.net.num_res_blocks, list(cfg.net.channel_mult), attention_levels
    )
    assert sum(p.numel() for p in net.parameters()) == expected
    with torch.no_grad():
        assert net(t, x).shape == x.shape


def small_unet(**overrides: object) -> UNet:
    options = dict(channels=16, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(4,), num_head_channels=16)
    return UNet((1, 8, 8), **{**options, "norm_groups": 4, **overrides})


def test_unet_depends_on_time_broadcasts_scalar_time_and_channels_last_gives_the_same_field() -> None:
    torch.manual_seed(0)
    net = small_unet()
    for parameter in net.parameters():  # the zero-initialised output layers would hide everything else
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(net(torch.zeros(4), x), net(torch.ones(4), x), atol=1e-4)
        assert torch.equal(net(torch.tensor(0.3), x), net(torch.full((4,), 0.3), x))
        last = small_unet(channels_last=True)
        last.load_state_dict(net.state_dict())
        assert torch.allclose(last(torch.full((4,), 0.3), x), net(torch.full((4,), 0.3), x), atol=1e-5)


def test_unet_starts_at_zero_and_a_few_adam_steps_reduce_the_flow_matching_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    net = small_unet()
    x1, x0, t = torch.rand(32, 1, 8, 8) * 2 - 1, torch.randn(32, 1, 8, 8), torch.rand(32)
    assert torch.count_nonzero(net(t, x0)) == 0  # zero output layer: every block starts as the identity
    x_t, target = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0, x1 - x0
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (net(t, x_t) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_unet_rejects_2d_data_and_unreachable_attention_in_one_line() -> None:
    with pytest.raises(UserError, match=r"needs image data .* data.shape=\[2\]; use net=mlp"):
        UNet((2,))
    with pytest.raises(UserError, match=r"attention_resolutions=\[16\]: \[16\] is not one of .* \[8, 4\]"):
        small_unet(attention_resolutions=(16,))
    with pytest.raises(UserError, match="divisible by 4"):
        UNet((1, 6, 6), channels=16, channel_mult=(1, 2, 2), attention_resolutions=(), norm_groups=4)

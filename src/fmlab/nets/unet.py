"""ADM-style U-Net (Dhariwal & Nichol 2021), the backbone of Lipman et al. 2023's image experiments.

Residual blocks whose GroupNorm is modulated by the time embedding (scale-shift norm), multi-head self-attention
at chosen resolutions, dropout inside the residual blocks, skip connections from every encoder block to the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmlab.conditioning import ClassEmbedding
from fmlab.errors import UserError
from fmlab.nets.embeddings import check_time_inputs, duration_input, sinusoidal_embedding


def _zero(module: nn.Module) -> nn.Module:
    """Zero the last layer of a residual branch: each block starts as the identity (ADM's initialisation)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = conv(drop(SiLU(GN(h)·(1 + s) + b))) with (s, b) = Linear(SiLU(emb));
    out = skip(x) + h, skip a 1×1 conv when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.embedding = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, 2 * out_channels))
        self.out_norm = nn.GroupNorm(groups, out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.embedding(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """x + proj(MHA(GN(x))) over the H·W positions, heads of `head_channels` channels each."""

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        if channels % head_channels:
            raise UserError(f"net.num_head_channels={head_channels} must divide every level's channels ({channels})")
        self.num_heads = channels // head_channels
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        # (b, heads, positions, head_channels): scaled_dot_product_attention picks the fused kernel it can
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution's residual block, with attention when the resolution is listed."""

    def __init__(self, res: ResBlock, attention: AttentionBlock | None) -> None:
        super().__init__()
        self.res, self.attention = res, attention

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        x = self.res(x, embedding)
        return x if self.attention is None else self.attention(x)


class UNet(nn.Module):
    """v(t, x) for images x of shape (C, H, W).

    Encoder: per level ℓ, `num_res_blocks` residual blocks of `channels · channel_mult[ℓ]` channels (attention
    where H / 2^ℓ is in `attention_resolutions`), then a stride-2 conv except at the last level. Middle: residual,
    attention, residual. Decoder: the mirror image with `num_res_blocks + 1` blocks per level, each taking an
    encoder activation as a skip connection, nearest ×2 upsampling + conv between levels. Time enters every
    residual block through e = MLP(sinusoidal(1000 t)) of 4·`channels` features; with `time_inputs=2` a second
    time, the duration h of an interval (MeanFlow's u(x, t, t + h)), adds its own MLP(sinusoidal(1000 h)).
    """

    condition_kinds = ("class",)  # what fmlab.conditioning.check_parts may ask of it

    def __init__(
        self,
        data_shape: Sequence[int],
        channels: int = 128,
        num_res_blocks: int = 2,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        attention_resolutions: Sequence[int] = (16,),
        num_head_channels: int = 64,
        dropout: float = 0.0,
        norm_groups: int = 32,
        time_scale: float = 1000.0,
        channels_last: bool = False,
        num_classes: int = 0,
        time_inputs: int = 1,
    ) -> None:
        super().__init__()
        shape = tuple(int(d) for d in data_shape)
        if len(shape) != 3:
            raise UserError(
                f"the U-Net needs image data shaped (channels, height, width) but data.shape={list(shape)}; "
                "use net=mlp for low-dimensional data"
            )
        in_channels, height, width = shape
        downsamplings = len(channel_mult) - 1
        if height != width or height % 2**downsamplings:
            raise UserError(
                f"net.channel_mult={list(channel_mult)} halves the image {downsamplings} times, which needs a square "
                f"image with a side divisible by {2**downsamplings}; data.shape={list(shape)}"
            )
        resolutions = [height // 2**level for level in range(len(channel_mult))]
        unreached = sorted(set(attention_resolutions) - set(resolutions))
        if unreached:
            raise UserError(
                f"net.attention_resolutions={list(attention_resolutions)}: {unreached} is not one of this net's "
                f"resolutions {resolutions}"
            )
        widths = [channels * m for m in channel_mult]
        if any(w % norm_groups for w in widths):
            raise UserError(f"net.norm_groups={norm_groups} must divide every level's channels {widths}")
        if num_classes < 0:
            raise UserError(f"net.num_classes={num_classes} must be >= 0 (0: unconditional)")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"net.dropout={dropout} must satisfy 0 <= dropout < 1")

        self.data_shape, self.time_scale, self.channels = shape, float(time_scale), channels
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        embedding_dim = 4 * channels
        self.time_embedding = nn.Sequential(
            nn.Linear(channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        # MeanFlow's second time, the duration h of an interval: its own embedding, added to the time's
        self.time_inputs = check_time_inputs(time_inputs)
        self.duration_embedding = (
            nn.Sequential(nn.Linear(channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
            if time_inputs == 2
            else None
        )
        # ADM's class conditioning: a label embedding added to the time embedding (null class ∅ for guidance)
        self.num_classes = num_classes
        self.class_embedding = ClassEmbedding(num_classes, embedding_dim) if num_classes else None

        def level(c_in: int, c_out: int, resolution: int) -> Level:
            attention = (
                AttentionBlock(c_out, num_head_channels, norm_groups) if resolution in attention_resolutions else None
            )
            return Level(ResBlock(c_in, c_out, embedding_dim, dropout, norm_groups), attention)

        self.input_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        skip_channels, current = [channels], channels
        for index, (width_out, resolution) in enumerate(zip(widths, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                self.encoder.append(level(current, width_out, resolution))
                current = width_out
                skip_channels.append(current)
            if index < downsamplings:
                self.encoder.append(Downsample(current))
                skip_channels.append(current)
        self.middle = nn.ModuleList(
            [
                ResBlock(current, current, embedding_dim, dropout, norm_groups),
                AttentionBlock(current, num_head_channels, norm_groups),
                ResBlock(current, current, embedding_dim, dropout, norm_groups),
            ]
        )
        self.decoder = nn.ModuleList()
        for index in reversed(range(len(widths))):
            for block in range(num_res_blocks + 1):
                self.decoder.append(level(current + skip_channels.pop(), widths[index], resolutions[index]))
                current = widths[index]
                if index > 0 and block == num_res_blocks:
                    self.decoder.append(Upsample(current))
        self.output = nn.Sequential(
            nn.GroupNorm(norm_groups, current), nn.SiLU(), _zero(nn.Conv2d(current, in_channels, 3, padding=1))
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None, duration: Tensor | None = None) -> Tensor:
        t = t.to(x.dtype).expand(x.shape[0])
        embedding = self.time_embedding(sinusoidal_embedding(t, self.channels, self.time_scale).to(x.dtype))
        h = duration_input(duration, t, x, self.time_inputs, "U-Net")
        if h is not None:
            embedding = embedding + self.duration_embedding(sinusoidal_embedding(h, self.channels, self.time_scale))
        if self.class_embedding is not None:
            embedding = embedding + self.class_embedding(labels, x.shape[0]).to(x.dtype)
        elif labels is not None:
            raise ValueError("labels given to an unconditional U-Net (net.num_classes=0)")
        h = self.input_conv(x.contiguous(memory_format=self.memory_format))
        skips = [h]
        for block in self.encoder:
            h = block(h, embedding) if isinstance(block, Level) else block(h)
            skips.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, embedding)), embedding)
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), embedding) if isinstance(block, Level) else block(h)
        return self.output(h).contiguous()

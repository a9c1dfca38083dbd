"""Throughput switches for accelerators: TF32 matmuls and `torch.compile` (mixed precision is Lightning's
`trainer.precision`, channels-last memory is the U-Net's `channels_last`)."""

from __future__ import annotations

import torch
from torch import nn

from fmlab.errors import choices_error

MATMUL_PRECISIONS = ("highest", "high", "medium")


def configure_throughput(net: nn.Module, matmul_precision: str = "highest", compile: bool = False) -> nn.Module:
    """`matmul_precision="high"` lets float32 matmuls and convolutions use TF32 on Ampere and newer GPUs;
    `compile=True` compiles the net's forward in place (its state-dict keys, hence checkpoints, are unchanged;
    the EMA copy runs uncompiled)."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise choices_error("performance.matmul_precision", matmul_precision, MATMUL_PRECISIONS)
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"
    if compile:
        net.compile()
    return net

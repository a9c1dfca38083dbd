"""Learning-rate schedules and throughput switches."""

from __future__ import annotations

import pytest
import torch

from fmlab.errors import UserError
from fmlab.nets.performance import configure_throughput
from fmlab.optim import warmup_polynomial, warmup_polynomial_factor


def test_warmup_polynomial_rises_linearly_then_decays_to_zero_at_the_last_step() -> None:
    warmup, total = 10, 110
    assert warmup_polynomial_factor(0, warmup, total) == pytest.approx(0.1)
    assert warmup_polynomial_factor(9, warmup, total) == pytest.approx(1.0)
    assert warmup_polynomial_factor(60, warmup, total) == pytest.approx(0.5)
    assert warmup_polynomial_factor(60, warmup, total, power=2.0) == pytest.approx(0.25)
    assert warmup_polynomial_factor(110, warmup, total) == 0.0 == warmup_polynomial_factor(500, warmup, total)

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    scheduler = warmup_polynomial(optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.05) and max(rates) == pytest.approx(0.5) and rates.index(max(rates)) == 9
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))  # never rises after the warm-up
    with pytest.raises(UserError, match="warmup_steps=200 must satisfy 0 <= warmup_steps < total_steps=100"):
        warmup_polynomial(optimizer, 200, 100)


def test_throughput_switches_reject_an_unknown_precision_and_set_the_chosen_one() -> None:
    net = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="performance.matmul_precision='tf32'.*high, highest, medium"):
        configure_throughput(net, matmul_precision="tf32")
    try:
        configure_throughput(net, matmul_precision="high")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        configure_throughput(net, matmul_precision="highest")
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.slow
def test_compiled_net_keeps_its_state_dict_keys_and_its_outputs() -> None:
    from fmlab.nets import UNet

    torch.manual_seed(0)
    options = dict(channels=16, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(4,), norm_groups=4)
    eager = UNet((1, 8, 8), num_head_channels=16, **options)
    for parameter in eager.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    compiled = UNet((1, 8, 8), num_head_channels=16, **options)
    compiled.load_state_dict(eager.state_dict())
    configure_throughput(compiled, compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        assert torch.allclose(compiled(t, x), eager(t, x), atol=1e-4)

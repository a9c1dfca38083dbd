"""What only a GPU can show: CUDA kernels give the CPU's numbers, bf16 and channels-last and compiled U-Nets train and
agree with the plain one. Marked `gpu` and skipped without CUDA (scripts/gpu_check.sh runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from fmlab.data.images import DigitsDataModule
from fmlab.evaluation import Evaluator
from fmlab.metrics.fid import build_fid
from fmlab.nets import UNet
from fmlab.objectives import VelocityField, VelocityObjective
from fmlab.paths import AffinePath, CondOT, MarginalOracle
from fmlab.samplers import ODESolver

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def small_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet((3, 32, 32), channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
                num_head_channels=32, norm_groups=8, **kwargs)  # fmt: skip


def fm_loss(net: UNet, generator: torch.Generator) -> torch.Tensor:
    x1 = torch.rand(32, 3, 32, 32, generator=generator).to(CUDA) * 2 - 1
    x0 = torch.randn(x1.shape, generator=generator).to(CUDA)
    t = torch.rand(32, generator=generator).to(CUDA)
    return VelocityObjective().loss(net, AffinePath(CondOT()), t, x0, x1, None)


def test_bf16_mixed_training_on_cuda_is_finite_and_lowers_the_loss() -> None:
    net = small_unet().to(CUDA)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fm_loss(net, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("variant", ["channels_last", "compile"])
def test_channels_last_and_compiled_unets_agree_with_the_plain_one_on_cuda(variant: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    plain = small_unet().to(CUDA).eval()
    other = small_unet(channels_last=variant == "channels_last").to(CUDA).eval()
    other.load_state_dict(plain.state_dict())
    if variant == "compile":
        other.compile()
    x, t = torch.randn(8, 3, 32, 32, device=CUDA), torch.rand(8, device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(other(t, x), plain(t, x), rtol=1e-4, atol=1e-5)


def test_the_evaluator_on_cuda_gives_the_cpu_numbers() -> None:
    class Points:
        name, data_shape, is_image, source, seed, variant = "points", (2,), False, "gaussian", 0, "3 points"
        num_levels, fid_feature = 0, None

        def held_out(self, n=None, index=0):
            return POINTS.repeat(1 + (n or 300) // 3, 1)[: n or 300]

        def eval_source(self, n=None, draw=0, chunk=0, start=0):
            return torch.randn(n or 300, 2, generator=torch.Generator().manual_seed(10 * draw + chunk),
                               dtype=torch.float64)  # fmt: skip

    POINTS = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
    path = AffinePath(CondOT())
    evaluator = Evaluator(ODESolver("dopri5", atol=1e-7, rtol=1e-7), 300, num_draws=2, batch_size=100,
                          nll_samples=30)  # fmt: skip
    results = {}
    for device in ("cpu", "cuda"):
        field = VelocityField(MarginalOracle(path, POINTS).to(device), VelocityObjective(), path)
        results[device] = evaluator.evaluate(field, Points())
    for key in ("w2", "mmd", "nll"):
        assert results["cuda"][key] == pytest.approx(results["cpu"][key], rel=1e-6, abs=1e-9), key


def test_fid_features_on_cuda_equal_the_cpu_ones() -> None:
    images = DigitsDataModule().reference_images()[:256]
    values = []
    for device in ("cpu", "cuda"):
        metric, prepare = build_fid("digits")
        metric = metric.to(device)
        metric.update(prepare(images.to(device)), real=True)
        metric.update(prepare((images.flip(-1)).to(device)), real=False)
        values.append(float(metric.compute()))
    assert values[1] == pytest.approx(values[0], rel=1e-4)

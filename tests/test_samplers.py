"""One contract, every registered sampler: it is what conf/solver builds, it refuses the paths it cannot integrate in
one line, its NFE is the net calls the field counted (and what it announces), a deterministic sampler gives the
same samples however the batch is chunked, a stochastic one the same samples for the same seed, and its record
names every setting that changes its samples."""

from __future__ import annotations

import inspect

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from fmlab.cli import CONFIG_DIR, group_options
from fmlab.errors import UserError
from fmlab.objectives import VelocityField, VelocityObjective
from fmlab.paths import AffinePath, CondOT, MarginalOracle, VPLinear
from fmlab.samplers import SAMPLERS, Sampler, sample

F64 = torch.float64
POINTS = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, -1.0]], dtype=F64)
LABELS = torch.tensor([0, 1, 1])
# a few steps each: the contract, not the accuracy (test_sampling and test_stochastic measure that)
SMALL = {"num_steps": 6}


class CountingNet(MarginalOracle):
    """The exact field of three points (class-conditional: two classes), counting its calls. It takes a duration
    too and ignores it (the average velocity is the instantaneous one), so solver=mean_flow runs on it as Euler."""

    time_inputs = 2

    def __init__(self, path: AffinePath) -> None:
        super().__init__(path, POINTS, point_labels=LABELS)
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None, duration: Tensor | None = None) -> Tensor:
        self.calls += 1
        return super().forward(t.expand(x.shape[0]), x, labels)


def build(name: str) -> Sampler:
    """The sampler conf/solver/<name>.yaml builds, with few steps."""
    node = OmegaConf.load(CONFIG_DIR / "solver" / f"{name}.yaml")
    settings = SMALL if "num_steps" in node and not str(node.get("method", "")).startswith("dopri") else {}
    return instantiate(OmegaConf.merge(node, settings))


def field_of(path: AffinePath) -> tuple[VelocityField, CountingNet]:
    net = CountingNet(path)
    return VelocityField(net, VelocityObjective(), path), net


def test_the_registry_is_conf_solver() -> None:
    assert set(SAMPLERS) == set(group_options("solver"))
    for name, cls in SAMPLERS.items():
        sampler = build(name)
        assert type(sampler) is cls and sampler.method == name and isinstance(sampler, Sampler)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_is_the_net_calls_and_what_the_sampler_announces(name: str) -> None:
    sampler = build(name)
    field, net = field_of(AffinePath(VPLinear()))
    x0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.manual_seed(0)
    result = sample(field, x0, sampler)
    assert result.nfe == net.calls > 0 and torch.isfinite(result.samples).all()
    if not sampler.is_adaptive:
        assert sampler.expected_nfe() == net.calls
    # guided: conditional and unconditional halves in one batch, counted twice
    net.calls = 0
    with field.conditioned_on(torch.zeros(40, dtype=torch.long), guidance_scale=1.0):
        guided = sample(field, x0, sampler)
    assert guided.nfe == 2 * net.calls
    if not sampler.is_adaptive:
        assert sampler.expected_nfe(guided=True) == guided.nfe


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_do_not_depend_on_the_chunking_or_repeat_for_a_seed(name: str) -> None:
    sampler = build(name)
    field, _ = field_of(AffinePath(VPLinear()))
    x0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(1), dtype=F64)

    def run(*chunks: slice) -> Tensor:
        torch.manual_seed(7)
        return torch.cat([sample(field, x0[c], sampler).samples for c in chunks])

    whole = run(slice(None))
    assert torch.equal(whole, run(slice(None)))  # same seed, same samples
    if not sampler.is_stochastic:
        split = run(slice(0, 15), slice(15, None))
        tolerance = 1e-3 if sampler.is_adaptive else 1e-10  # adaptive steps follow each chunk's own error
        assert torch.allclose(whole, split, atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_trajectories_end_at_the_samples(name: str) -> None:
    sampler = build(name)
    field, _ = field_of(AffinePath(VPLinear()))
    x0 = torch.randn(10, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.manual_seed(3)
    result = sample(field, x0, sampler, num_trajectory_times=4)
    torch.manual_seed(3)
    assert result.trajectory.shape == (4, 10, 2)
    assert torch.allclose(result.trajectory[-1], sample(field, x0, sampler).samples, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_the_record_names_every_setting_that_changes_the_samples(name: str) -> None:
    """A setting the record leaves out must not change the samples (e.g. the tolerances of a fixed-step solver)."""
    sampler = build(name)
    described = sampler.describe()
    assert described["method"] == name and repr(sampler).startswith(type(sampler).__name__)
    field, _ = field_of(AffinePath(VPLinear()))
    x0 = torch.randn(20, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.manual_seed(5)
    reference = sample(field, x0, sampler).samples
    parameters = inspect.signature(type(sampler).__init__).parameters
    recorded = {k: v for k, v in described.items() if k in parameters}
    for setting, parameter in parameters.items():
        if setting == "self" or setting in described:
            continue
        default = parameter.default
        other = type(sampler)(**recorded, **{setting: default * 2 if isinstance(default, int | float) else default})
        torch.manual_seed(5)
        assert torch.equal(sample(field, x0, other).samples, reference), setting


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_sampler_that_cannot_convert_the_ot_path_refuses_it_in_one_line(name: str) -> None:
    sampler = build(name)
    path = AffinePath(CondOT())
    try:
        sampler.check_path(path)
    except UserError as refusal:  # the score (or x1) of the OT path is infinite at t = 0
        assert "\n" not in str(refusal) and f"solver={name}" in str(refusal) and "CondOT" in str(refusal)
        assert sampler.is_stochastic
        return
    field, net = field_of(path)
    assert torch.isfinite(sample(field, torch.randn(8, 2, dtype=F64), sampler).samples).all()

"""Class conditioning and classifier-free guidance: exact class-conditional oracle fields, label dropout, the
parameterisation-independence of guidance, per-class minibatch OT, row-indexed labels, the conditional nets."""

from __future__ import annotations

import math
from pathlib import Path

import ot
import pytest
import torch
from torch import Tensor, nn

from fmlab.conditioning import class_labels, drop_to_null
from fmlab.couplings import MinibatchOTCoupling
from fmlab.data.images import DigitsDataModule
from fmlab.data.tong2d import TongDataModule
from fmlab.data.toy2d import Toy2DDataModule
from fmlab.distributed import Ranks
from fmlab.errors import UserError
from fmlab.evaluation.engine import Evaluator
from fmlab.nets import MLP, UNet
from fmlab.objectives import EpsilonObjective, ScoreObjective, VelocityField, VelocityObjective, guided_prediction
from fmlab.paths import AffinePath, CondOT, MarginalOracle, VPLinear
from fmlab.samplers import ODESolver, sample
from tests.conftest import cli_error, run_cli

# K = 6 points in 2D, two per class
POINTS = torch.tensor([[3.0, 0.0], [2.0, 2.0], [-2.0, 2.0], [-3.0, 0.0], [0.0, -3.0], [1.0, -2.5]], dtype=torch.float64)
POINT_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def class_oracle(path: AffinePath) -> MarginalOracle:
    return MarginalOracle(path, POINTS, point_labels=POINT_LABELS)


def test_the_class_oracle_at_w_0_is_the_marginal_oracle_of_that_class_alone() -> None:
    path = AffinePath(CondOT())
    field = VelocityField(class_oracle(path), VelocityObjective(), path)
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(60, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    for t in (0.1, 0.5, 0.9):
        time = torch.tensor(t, dtype=torch.float64)
        with field.conditioned_on(labels, guidance_scale=0.0):
            guided = field(time, x)
        for c in range(3):
            restricted = MarginalOracle(path, POINTS[POINT_LABELS.eq(c)])
            rows = labels == c
            torch.testing.assert_close(guided[rows], restricted(time, x[rows]), rtol=1e-10, atol=1e-10)
    # no labels (or the null class) is the unconditional marginal field
    null = torch.full((60,), 3)
    time = torch.tensor(0.5, dtype=torch.float64)
    with field.conditioned_on(null):
        torch.testing.assert_close(field(time, x), MarginalOracle(path, POINTS)(time, x))


def test_guided_sampling_at_w_0_with_exact_fields_lands_on_the_asked_class_only() -> None:
    path = AffinePath(CondOT(sigma_min=1e-3))
    field = VelocityField(class_oracle(path), VelocityObjective(), path)
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.arange(300) % 3
    with field.conditioned_on(labels, guidance_scale=0.0):
        result = sample(field, x0, ODESolver("dopri5", atol=1e-7, rtol=1e-7))
    distance, nearest = torch.cdist(result.samples, POINTS).min(1)
    assert distance.max() < 0.05  # on a data point
    assert torch.equal(POINT_LABELS[nearest], labels)  # of the asked class
    # unguided without labels, the same noise reaches points of every class (the labels decide, not x0)
    result = sample(field, x0, ODESolver("dopri5", atol=1e-7, rtol=1e-7))
    reached = POINT_LABELS[torch.cdist(result.samples, POINTS).argmin(1)]
    assert (reached != labels).float().mean() > 0.3


class Parameterised(nn.Module):
    """The class oracle as a net that predicts velocity, ε or the score."""

    def __init__(self, oracle: MarginalOracle, predicts: str) -> None:
        super().__init__()
        self.oracle, self.predicts, self.num_classes = oracle, predicts, oracle.num_classes

    def forward(self, t: Tensor, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.predicts == "velocity":
            return self.oracle(t, x, labels)
        return self.oracle.epsilon(t, x, labels) if self.predicts == "epsilon" else self.oracle.score(t, x, labels)


@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
def test_guidance_gives_the_same_velocity_whatever_the_net_predicts(w: float) -> None:
    path = AffinePath(VPLinear())
    oracle = class_oracle(path)
    objectives = {
        "velocity": VelocityObjective(),
        "epsilon": EpsilonObjective(),
        "score": ScoreObjective(scale_by_sigma=False),
    }
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(30) % 3
    for t in (0.2, 0.6, 0.95):
        time = torch.tensor(t, dtype=torch.float64)
        velocities = {}
        for name, objective in objectives.items():
            field = VelocityField(Parameterised(oracle, name), objective, path)
            with field.conditioned_on(labels, guidance_scale=w):
                velocities[name] = field(time, x)
            assert field.nfe == (2 if w else 1)  # a guided call evaluates the net twice
        torch.testing.assert_close(velocities["epsilon"], velocities["velocity"], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(velocities["score"], velocities["velocity"], rtol=1e-7, atol=1e-7)
        # and it is the guidance of the two velocities themselves
        conditional = oracle(time, x, labels)
        unconditional = oracle(time, x)
        torch.testing.assert_close(velocities["velocity"], guided_prediction(conditional, unconditional, w))


def test_label_dropout_rate_is_p_uncond_within_binomial_error() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    for p in (0.1, 0.2, 0.5):
        dropped = drop_to_null(labels, p, num_classes=10)
        rate = (dropped == 10).float().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(labels))
        kept = dropped != 10
        assert torch.equal(dropped[kept], labels[kept])  # kept labels are untouched
    assert drop_to_null(labels, 0.0, num_classes=10) is labels


def test_loaders_yield_true_labels_never_the_null_class() -> None:
    toy = Toy2DDataModule("8gaussians", batch_size=512, batches_per_epoch=3, with_labels=True)
    for x0, x1, y in toy.train_dataloader():
        assert y.min() >= 0 and y.max() < 8 and y.dtype == torch.long
        centres = 5.0 * torch.stack([torch.cos(y * math.pi / 4), torch.sin(y * math.pi / 4)], 1)
        assert (x1 - centres).norm(dim=1).max() < 4.0  # each point sits by its own mode's centre
        assert x0.shape == x1.shape
    moons = Toy2DDataModule("moons", batch_size=512, batches_per_epoch=1, with_labels=True)
    _, x1, y = next(iter(moons.train_dataloader()))
    assert set(y.tolist()) == {0, 1} and (x1[y == 1, 1].mean() < x1[y == 0, 1].mean())  # the inner moon is lower
    digits = DigitsDataModule(batch_size=256, with_labels=True, num_classes=10)
    x0, x1, y = next(iter(digits.train_dataloader()))
    assert y.min() >= 0 and y.max() <= 9 and len(y) == len(x1) == 256
    tong = TongDataModule("tong_8gaussians", with_labels=True)
    _, x1, y = tong._stream.batch(0)
    angles = torch.atan2(x1[:, 1], x1[:, 0]) % (2 * math.pi)
    nearest_mode = torch.round(angles / (math.pi / 4)).long() % 8
    assert (nearest_mode == y).float().mean() > 0.85  # std-1 modes at radius 5 overlap a little


def test_data_without_labels_refuses_class_conditioning_in_one_line() -> None:
    with pytest.raises(UserError, match="checkerboard has no class labels"):
        Toy2DDataModule("checkerboard", with_labels=True)
    with pytest.raises(UserError, match="tong_scurve"):
        TongDataModule("tong_scurve", with_labels=True)


def test_per_class_ot_pairs_never_cross_classes_and_are_optimal_within_each() -> None:
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(90, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (90,), generator=g)
    x1 = torch.randn(90, 2, generator=g, dtype=torch.float64) + 4 * labels[:, None]
    a, b, y = MinibatchOTCoupling("exact", per_class=True)(x0, x1, labels)
    # every returned x1 keeps its own label, and each class's x0 rows come from that class's positions
    origin = torch.cdist(b, x1).argmin(1)
    assert torch.equal(labels[origin], y)
    source_origin = torch.cdist(a, x0).argmin(1)
    assert torch.equal(labels[source_origin], y)
    assert sorted(source_origin.tolist()) == list(range(90))  # a permutation: every point once
    for c in range(3):
        rows = labels == c
        cost = torch.cdist(x0[rows], x1[rows]).pow(2).numpy()
        optimum = ot.emd2([], [], cost) * int(rows.sum())
        paired = (a[y == c] - b[y == c]).pow(2).sum(1).sum().item()
        assert paired == pytest.approx(optimum, rel=1e-9)
    # without per_class the plan crosses classes, and the labels still follow their x1
    a, b, y = MinibatchOTCoupling("exact")(x0, x1, labels)
    assert torch.equal(labels[torch.cdist(b, x1).argmin(1)], y)
    assert not torch.equal(labels[torch.cdist(a, x0).argmin(1)], y)


def test_uniform_labels_follow_the_row_index_so_any_chunking_asks_the_same_classes() -> None:
    whole = class_labels("uniform", 10, 0, 1000)
    chunks = torch.cat([class_labels("uniform", 10, start, 300) for start in (0, 300, 600)] + [
        class_labels("uniform", 10, 900, 100)])  # fmt: skip
    assert torch.equal(whole, chunks)
    assert torch.bincount(whole).tolist() == [100] * 10
    assert class_labels([3, 7], 10, 5, 4).tolist() == [7, 3, 7, 3]
    with pytest.raises(UserError, match=r"eval.labels=\[12\]"):
        class_labels([12], 10, 0, 4)
    with pytest.raises(UserError, match="eval.labels=.balanced. is not a valid choice"):
        class_labels("balanced", 10, 0, 4)


class PointData:
    """A minimal EvaluationData: the class points, and N(0, I) sources fixed per row (so chunking cannot change
    them: what is left to differ is the labels' assignment)."""

    name, data_shape, is_image, source, seed, variant = "points", (2,), False, "gaussian", 0, "three points"

    def held_out(self, n: int | None = None, index: int = 0) -> Tensor:
        return POINTS.float().repeat(1 + (n or 60) // 6, 1)[: n or 60]

    def eval_source(self, n: int | None = None, draw: int = 0, chunk: int = 0, start: int = 0) -> Tensor:
        rows = torch.randn(1000, 2, generator=torch.Generator().manual_seed(draw))
        return rows[start : start + (n or 60)]


def test_guided_generation_is_the_same_under_any_batch_size_and_refused_for_unconditional_runs() -> None:
    path = AffinePath(CondOT())
    field = VelocityField(class_oracle(path).float(), VelocityObjective(), path)
    solver = ODESolver("euler", num_steps=20)
    samples = {}
    for batch_size in (60, 25):
        evaluator = Evaluator(solver, num_samples=60, num_draws=1, batch_size=batch_size, nll_samples=0,
                              guidance_scale=1.0)  # fmt: skip
        results = evaluator.evaluate(field, PointData())
        assert results["nfe"] == 40 and results["guidance_scale"] == 1.0
        samples[batch_size] = results["w2"]
    assert samples[60] == pytest.approx(samples[25], rel=1e-6)
    unconditional = VelocityField(MarginalOracle(path, POINTS.float()), VelocityObjective(), path)
    refusal = r"eval.guidance_scale=1.0 needs a conditional run \(conditioning=class or x\); this one is unconditional"
    with pytest.raises(UserError, match=refusal):
        Evaluator(solver, num_samples=60, num_draws=1, nll_samples=0, guidance_scale=1.0).evaluate(
            unconditional, PointData()
        )


@pytest.mark.parametrize("make", [
    lambda k: MLP((2,), width=32, num_classes=k),
    lambda k: UNet((1, 8, 8), channels=16, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(4,),
                   num_head_channels=16, norm_groups=8, num_classes=k),
])  # fmt: skip
def test_conditional_nets_read_the_label_and_none_is_the_null_class(make) -> None:
    torch.manual_seed(0)
    net = make(3)
    for parameter in net.parameters():  # the U-Net starts as the identity on its residual branches: wake it up
        nn.init.normal_(parameter, std=0.1)
    x = torch.randn(4, *((2,) if isinstance(net, MLP) else (1, 8, 8)))
    t = torch.full((4,), 0.3)
    outputs = [net(t, x, torch.full((4,), c)) for c in range(4)]  # classes 0..2 and the null class 3
    assert all(not torch.allclose(outputs[0], other) for other in outputs[1:])
    torch.testing.assert_close(net(t, x), outputs[3])
    with pytest.raises(ValueError, match="unconditional"):
        make(0)(t, x, torch.zeros(4, dtype=torch.long))


def test_cli_refuses_class_conditioning_on_unlabelled_data_and_guidance_sweeps_of_unconditional_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["conditioning=class", "data=checkerboard", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    status, _, err = cli_error("train", args, capsys)
    assert status == 2
    assert "conditioning=class needs data with class labels; data=checkerboard has none" in err


@pytest.mark.slow
def test_a_conditional_digits_net_generates_its_classes_and_guidance_raises_the_accuracy(tmp_path: Path) -> None:
    import csv

    run = tmp_path / "run"
    trained = run_cli("fmlab.train", "experiment=digits_cond_fm_ot", "trainer.max_steps=300", "logger=csv",
                      "eval.nll_samples=0", "eval.num_samples=500", f"hydra.run.dir={run}", cwd=tmp_path,
                      timeout=900)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    swept = run_cli("fmlab.evaluate", f"ckpt_path={run}", "sweep=guidance", "sweep.guidance_scales=[0,2]",
                    "sweep.adaptive_methods=[]", f"hydra.run.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                    timeout=900)  # fmt: skip
    assert swept.returncode == 0, swept.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "guidance_sweep.csv").open()))
    accuracy = {float(r["guidance_scale"]): float(r["class_accuracy"]) for r in rows}
    assert accuracy[0.0] > 0.5  # chance is 0.1
    assert accuracy[2.0] > accuracy[0.0]
    assert [float(r["nfe"]) for r in rows] == [20.0, 40.0]  # a guided Euler step calls the net twice
    assert (tmp_path / "sweep" / "guidance_sweep.png").stat().st_size > 0


def test_the_guidance_sweep_writes_one_row_per_solver_and_scale_with_both_net_calls_counted(tmp_path: Path) -> None:
    from fmlab.evaluation import guidance_sweep
    from fmlab.plotting import plot_guidance_sweep

    path = AffinePath(CondOT())
    field = VelocityField(class_oracle(path).float(), VelocityObjective(), path)
    evaluator = Evaluator(ODESolver("euler", num_steps=5), num_samples=60, num_draws=1, nll_samples=0)
    solvers = [ODESolver("euler", num_steps=5), ODESolver("midpoint", num_steps=5)]
    rows = guidance_sweep(evaluator, field, PointData(), solvers, [0.0, 1.0], Ranks())
    assert [(r["method"], r["guidance_scale"], r["nfe"]) for r in rows] == [
        ("euler", 0.0, 5), ("euler", 1.0, 10), ("midpoint", 0.0, 10), ("midpoint", 1.0, 20)]  # fmt: skip
    assert evaluator.guidance_scale == 0.0 and evaluator.solver.method == "euler"  # the caller's evaluator is kept
    assert all(r["metric"] == "w2" and math.isfinite(r["value"]) for r in rows)
    plot_guidance_sweep(rows, tmp_path / "guidance.png")
    assert (tmp_path / "guidance.png").read_bytes()[:4] == b"\x89PNG"
    unconditional = VelocityField(MarginalOracle(path, POINTS.float()), VelocityObjective(), path)
    with pytest.raises(UserError, match="sweep=guidance needs a class-conditional run"):
        guidance_sweep(evaluator, unconditional, PointData(), solvers, [0.0], Ranks())


def test_image_loaders_read_their_real_label_files(tmp_path: Path) -> None:
    from fmlab.data.images import CIFAR10DataModule, DownsampledImageNetDataModule, MNISTDataModule
    from tests.image_fixtures import write_cifar10, write_imagenet, write_mnist

    write_mnist(tmp_path)
    write_cifar10(tmp_path, per_batch=2)
    write_imagenet(tmp_path)
    mnist = MNISTDataModule(data_dir=str(tmp_path), batch_size=4, with_labels=True, num_classes=10)
    assert mnist.train_labels.tolist() == [k % 10 for k in range(12)]  # the idx1 file's bytes
    cifar = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, with_labels=True, num_classes=10)
    assert cifar.train_labels.tolist() == [0, 1] * 5  # b"labels" of data_batch_1..5, in order
    _, x1, y = next(iter(cifar.train_dataloader()))
    assert x1.shape == (4, 3, 32, 32) and y.dtype == torch.long
    imagenet = DownsampledImageNetDataModule(data_dir=str(tmp_path), batch_size=2, with_labels=True, num_classes=1000)
    assert imagenet.train_labels.tolist() == [0, 1, 2, 0, 1, 2]  # the files' 1-based labels, counted from 0
    with pytest.raises(UserError, match=r"labels span 0\.\.2, outside the data.num_classes=2"):
        DownsampledImageNetDataModule(data_dir=str(tmp_path), batch_size=2, with_labels=True, num_classes=2)


def test_a_guidance_scale_too_large_to_integrate_is_named_as_the_cause() -> None:
    """A huge w makes the guided field (1 + w) f(x, y) − w f(x, ∅) too stiff for dopri5: the one line names
    eval.guidance_scale, not the training (the unguided field integrates in a few dozen calls)."""
    from fmlab.errors import SolverError

    path = AffinePath(CondOT())
    field = VelocityField(class_oracle(path), VelocityObjective(), path)
    solver = ODESolver("dopri5", atol=1e-5, rtol=1e-5, max_nfe=100)
    x0 = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(30) % 3
    with field.conditioned_on(labels, guidance_scale=0.0):
        assert sample(field, x0, solver).nfe < 100  # field calls; a guided call is one call, two NFE
    too_large = pytest.raises(SolverError, match=r"^eval.guidance_scale=1e\+06 made the guided field too large")
    with too_large, field.conditioned_on(labels, guidance_scale=1e6):
        sample(field, x0, solver)
